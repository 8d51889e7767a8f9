"""Key files, epochs, grants, signatures, passphrase sources and AEAD behaviour."""

from __future__ import annotations

import base64
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from dedupe.crypto import (
    EpochSecrets,
    HolderSecrets,
    KdfParams,
    aead,
    canonical_json,
    create_key_file,
    key_file_info,
    meta_check,
    open_grant,
    open_key_file,
    open_sealed,
    seal,
    seal_grant,
    sign,
    sign_record,
    verify,
    verify_record,
)
from dedupe.crypto.aead import seal_into
from dedupe.crypto.passphrase import get_new_passphrase, get_passphrase
from dedupe.crypto.signing import CONFIG_DOMAIN, KEYMAP_DOMAIN, KEYRING_DOMAIN, verify_key_of
from dedupe.errors import (
    IntegrityError,
    KeyNotAvailable,
    PassphraseMissing,
    UnsupportedFormat,
    WrongPassphrase,
)

REPO_ID = bytes(range(32))
WEAK = KdfParams.weakest()


def _secrets_in(blob: bytes, holder: HolderSecrets) -> list[bytes]:
    return [
        s
        for s in (holder.id_key, holder.chunker_key, holder.box_secret, holder.sign_secret)
        if s in blob or s.hex().encode() in blob
    ]


def test_key_file_opens_with_its_passphrase_only() -> None:
    admin = HolderSecrets.first_admin(REPO_ID)
    blob = create_key_file(admin, b"pw", "default", kdf=WEAK)
    assert open_key_file(blob, REPO_ID, b"pw") == admin
    with pytest.raises(WrongPassphrase):
        open_key_file(blob, REPO_ID, b"pw ")
    # The key file is bound to its repository id.
    with pytest.raises(WrongPassphrase):
        open_key_file(blob, bytes(32), b"pw")
    # No key material is readable in the file.
    assert not _secrets_in(blob, admin)
    info = key_file_info(blob)
    assert (info.key_id, info.role, info.name) == (admin.key_id, "admin", "default")


def test_a_key_file_is_bound_to_its_key_id_and_role() -> None:
    """Editing the plain fields (to pose as another key, or as an admin) breaks it."""
    writer = HolderSecrets.first_admin(REPO_ID).new_holder("writer")
    record = json.loads(create_key_file(writer, b"pw", "w", kdf=WEAK))
    for field, value in (("role", "admin"), ("id", os.urandom(16).hex())):
        forged = json.dumps(dict(record, **{field: value})).encode()
        with pytest.raises(WrongPassphrase):
            open_key_file(forged, REPO_ID, b"pw")


def test_a_file_that_is_not_a_key_file_of_this_format_is_refused_before_any_kdf() -> None:
    """Whatever is in a key file's place is identified before it is trusted or costs a
    key derivation: another format (or none), another version or KDF is UnsupportedFormat;
    a key file whose id, role or salt cannot be right is damaged. The plain fields read
    back as written."""
    blob = create_key_file(HolderSecrets.first_admin(REPO_ID), b"pw", "d", kdf=WEAK)
    record = json.loads(blob)
    info = key_file_info(blob)
    assert (info.created, info.kdf) == (record["created"], WEAK)
    without_format = {k: v for k, v in record.items() if k != "format"}
    unsupported: list[object] = [
        [record],
        dict(record, format="dedupe-config"),
        without_format,
        dict(record, version=1),
        dict(record, kdf=dict(record["kdf"], algorithm="argon2i13")),
    ]
    damaged: list[object] = [
        dict(record, id=record["id"][:-2]),
        dict(record, role="root"),
        dict(record, kdf=dict(record["kdf"], salt=base64.b64encode(bytes(15)).decode())),
    ]
    for planted, error in [(p, UnsupportedFormat) for p in unsupported] + [
        (p, IntegrityError) for p in damaged
    ]:
        data = json.dumps(planted).encode()
        with pytest.raises(error):
            key_file_info(data)
        with pytest.raises(error):
            open_key_file(data, REPO_ID, b"pw")


def test_roles_hold_what_they_should() -> None:
    admin = HolderSecrets.first_admin(REPO_ID)
    assert admin.admin_sign is not None
    for role in ("reader", "writer"):
        other = admin.new_holder(role)
        assert other.admin_sign is None and other.role == role
        assert other.admin_verify_key == admin.admin_verify_key
        assert (other.id_key, other.chunker_key) == (admin.id_key, admin.chunker_key)
        assert other.box_secret != admin.box_secret and other.key_id != admin.key_id
        with pytest.raises(ValueError):
            other.new_holder("writer")  # only an admin makes key holders
    assert admin.new_holder("admin").admin_sign == admin.admin_sign


def test_damaged_key_file_is_not_a_wrong_passphrase() -> None:
    blob = create_key_file(HolderSecrets.first_admin(REPO_ID), b"pw", "d", kdf=WEAK)
    with pytest.raises(IntegrityError):
        open_key_file(blob[: len(blob) // 2], REPO_ID, b"pw")


@pytest.mark.parametrize(
    ("field", "value"),
    [("memlimit", 4 << 40), ("memlimit", 1024), ("opslimit", 1 << 30), ("opslimit", 0)],
)
def test_a_planted_key_file_cannot_ask_for_any_kdf_cost(field: str, value: int) -> None:
    """Refused before the KDF runs: 4 TiB of memory or a billion passes would otherwise
    be spent by every open that tries the file."""
    record = json.loads(create_key_file(HolderSecrets.first_admin(REPO_ID), b"pw", "d", WEAK))
    record["kdf"][field] = value
    started = time.monotonic()
    with pytest.raises(IntegrityError, match="KDF cost"):
        open_key_file(json.dumps(record).encode(), REPO_ID, b"pw")
    assert time.monotonic() - started < 5  # a bound on a failure, not a benchmark
    with pytest.raises(ValueError):
        KdfParams(**{"opslimit": 3, "memlimit": 64 << 20, field: value})


def test_epoch_wraps() -> None:
    secrets = EpochSecrets.generate(4)
    keys = secrets.keys()
    data_key, oid = os.urandom(32), os.urandom(32)
    assert keys.unwrap_read(keys.wrap_read(data_key), "x") == data_key
    meta = keys.wrap_meta(data_key, 2, oid)
    assert len(meta) == 72 and keys.unwrap_meta(meta, 2, oid, "x") == data_key
    # A meta wrap is bound to the kind and id it was made for.
    for kind, other in ((3, oid), (2, os.urandom(32))):
        with pytest.raises(IntegrityError):
            keys.unwrap_meta(meta, kind, other, "x")
    # Another epoch's keys open nothing of this one.
    stranger = EpochSecrets.generate(4).keys()
    with pytest.raises(IntegrityError):
        stranger.unwrap_read(keys.wrap_read(data_key), "x")
    with pytest.raises(IntegrityError):
        stranger.unwrap_meta(meta, 2, oid, "x")
    # A writer's view has no read secret.
    writer_view = secrets.keys(with_read=False)
    with pytest.raises(KeyNotAvailable):
        writer_view.unwrap_read(keys.wrap_read(data_key), "x")
    assert writer_view.unwrap_meta(meta, 2, oid, "x") == data_key
    assert secrets.read_secret.hex() not in repr(keys) and secrets.meta.hex() not in repr(keys)


def test_grants_are_bound_and_checked() -> None:
    admin = HolderSecrets.first_admin(REPO_ID)
    writer = admin.new_holder("writer")
    secrets = EpochSecrets.generate(2)
    check = meta_check(secrets.meta)
    grant = seal_grant(writer.box_public, REPO_ID, writer.key_id, secrets, with_read=False)
    keys = open_grant(
        writer.box_secret, grant, REPO_ID, writer.key_id, 2, secrets.read_public, check
    )
    assert keys.read_secret is None and keys.meta == secrets.meta
    # The admin cannot open the writer's grant; the grant names its key and epoch.
    with pytest.raises(IntegrityError):
        open_grant(admin.box_secret, grant, REPO_ID, admin.key_id, 2, secrets.read_public, check)
    with pytest.raises(IntegrityError, match="names another"):
        open_grant(writer.box_secret, grant, REPO_ID, writer.key_id, 3, secrets.read_public, check)
    # A grant with secrets the keyring does not know is refused.
    other = EpochSecrets.generate(2)
    planted = seal_grant(writer.box_public, REPO_ID, writer.key_id, other, with_read=True)
    with pytest.raises(IntegrityError, match="meta secret"):
        open_grant(
            writer.box_secret, planted, REPO_ID, writer.key_id, 2, secrets.read_public, check
        )
    mixed = EpochSecrets(2, other.read_secret, secrets.meta)
    planted = seal_grant(writer.box_public, REPO_ID, writer.key_id, mixed, with_read=True)
    with pytest.raises(IntegrityError, match="read secret"):
        open_grant(
            writer.box_secret, planted, REPO_ID, writer.key_id, 2, secrets.read_public, check
        )


def test_signatures_are_bound_to_their_domain_and_key() -> None:
    seed, other = os.urandom(32), os.urandom(32)
    public = verify_key_of(seed)
    sig = sign(seed, KEYMAP_DOMAIN, b"data")
    assert verify(public, KEYMAP_DOMAIN, b"data", sig)
    assert not verify(public, KEYRING_DOMAIN, b"data", sig)
    assert not verify(public, KEYMAP_DOMAIN, b"datA", sig)
    assert not verify(verify_key_of(other), KEYMAP_DOMAIN, b"data", sig)
    record = sign_record(seed, CONFIG_DOMAIN, {"a": 1, "b": [1, 2]})
    assert verify_record(public, CONFIG_DOMAIN, record)
    assert not verify_record(public, KEYRING_DOMAIN, record)
    assert not verify_record(public, CONFIG_DOMAIN, dict(record, a=2))
    assert not verify_record(public, CONFIG_DOMAIN, dict(record, signature="!!"))


def test_a_signature_or_verify_key_of_the_wrong_length_never_verifies() -> None:
    """A forger who cannot make a signature may still write any bytes in its place: an
    empty, short, long or truncated signature (or a verify key cut or padded) is no
    signature, for raw data and for a signed record alike."""
    seed = os.urandom(32)
    public = verify_key_of(seed)
    sig = sign(seed, KEYMAP_DOMAIN, b"data")
    assert verify(public, KEYMAP_DOMAIN, b"data", sig)
    for bad in (b"", sig[:1], sig[:32], sig[:63], sig + b"\0", bytes(64)):
        assert not verify(public, KEYMAP_DOMAIN, b"data", bad), len(bad)
    for key in (b"", public[:31], public + b"\0"):
        assert not verify(key, KEYMAP_DOMAIN, b"data", sig), len(key)
    record = sign_record(seed, CONFIG_DOMAIN, {"a": 1})
    assert verify_record(public, CONFIG_DOMAIN, record)
    unsigned = {"a": 1}
    assert not verify_record(public, CONFIG_DOMAIN, unsigned)
    for bad in (b"", sig[:48], sig + b"\0\0\0"):
        forged = dict(record, signature=base64.b64encode(bad).decode())
        assert not verify_record(public, CONFIG_DOMAIN, forged), len(bad)


def test_canonical_json_is_the_spec_s() -> None:
    """docs/FORMAT.md 1: keys sorted, separators `,` and `:` without whitespace, UTF-8 (not
    \\u escapes). The signed bytes of every keyring, config and grant are these, so another
    spelling would make every repository written before (or by another implementation)
    fail its signatures."""
    record = {"b": [1, 2], "a": "\u00e9t\u00e9", "c": {"z": None, "y": "x"}}
    expected = '{"a":"\u00e9t\u00e9","b":[1,2],"c":{"y":"x","z":null}}'
    assert canonical_json(record) == expected.encode("utf-8")


def test_aead_binds_associated_data() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"payload", b"id-1")
    assert open_sealed(key, sealed, b"id-1", "x") == b"payload"
    with pytest.raises(IntegrityError):
        open_sealed(key, sealed, b"id-2", "x")
    flipped = bytearray(sealed)
    flipped[30] ^= 1
    with pytest.raises(IntegrityError):
        open_sealed(key, bytes(flipped), b"id-1", "x")


def test_both_aead_paths_open_only_what_was_sealed_and_interoperate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled libsodium call and PyNaCl's public wrapper (the fallback should the
    private module move) write and read the same `nonce || ciphertext || tag`, and
    either refuses a wrong key, wrong associated data, a flipped bit or a cut item."""
    key = os.urandom(32)
    payloads = [b"", b"x", os.urandom(1000)]

    def sealed_by_each() -> list[bytes]:
        out = [seal(key, p, b"id-1") for p in payloads]
        buffer = bytearray(b"\xee" * 7 + bytes(len(payloads[2]) + 40) + b"\xff" * 5)
        assert seal_into(key, payloads[2], b"id-1", buffer, 7) == 7 + len(payloads[2]) + 40
        assert buffer[:7] == b"\xee" * 7 and buffer[-5:] == b"\xff" * 5
        with pytest.raises(ValueError):
            seal_into(key, payloads[2], b"id-1", buffer, 13)  # 1 byte over
        return [*out, bytes(buffer[7:-5])]

    compiled = sealed_by_each()
    monkeypatch.setattr(aead, "_lib", None)
    public = sealed_by_each()
    for path in ("public", "compiled"):
        for sealed, payload in zip(compiled + public, 2 * [*payloads, payloads[2]], strict=True):
            assert len(sealed) == len(payload) + 40
            assert open_sealed(key, sealed, b"id-1", "x") == payload, path
            assert open_sealed(key, bytearray(sealed), b"id-1", "x") == payload, path
            assert open_sealed(key, memoryview(sealed), b"id-1", "x") == payload, path
            flipped = bytearray(sealed)
            flipped[len(sealed) // 2] ^= 1
            for bad_key, item, aad in (
                (os.urandom(32), sealed, b"id-1"),
                (key, sealed, b"id-2"),
                (key, bytes(flipped), b"id-1"),
                (key, sealed[:-1], b"id-1"),
                (key, sealed[1:], b"id-1"),
            ):
                with pytest.raises(IntegrityError, match="failed authentication|too short"):
                    open_sealed(bad_key, item, aad, "x")
        for short in (b"", sealed[:39]):
            with pytest.raises(IntegrityError, match="too short"):
                open_sealed(key, short, b"id-1", "x")
        monkeypatch.undo()


def test_passphrase_sources(tmp_path: Path) -> None:
    assert get_passphrase(env={"DEDUPE_PASSWORD": "a"}) == b"a"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(f)}) == b"from-file"
    script = tmp_path / "pw.sh"
    script.write_text("#!/bin/sh\necho from-command\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    assert get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": str(script)}) == b"from-command"
    with pytest.raises(PassphraseMissing):
        get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": "false"})
    with pytest.raises(PassphraseMissing):
        get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(tmp_path / "absent")})
    # A new key's passphrase has its own variables, never the repository's.
    assert get_new_passphrase(env={"DEDUPE_NEW_PASSWORD": "n", "DEDUPE_PASSWORD": "a"}) == b"n"
    with pytest.raises(PassphraseMissing, match="DEDUPE_NEW_PASSWORD"):
        get_new_passphrase(env={"DEDUPE_PASSWORD": "a"})


def test_a_passphrase_comes_from_exactly_one_source_and_is_never_empty(tmp_path: Path) -> None:
    """Two sources set together are refused before either is read (which one was meant?);
    an empty passphrase from any source is refused; a file or command keeps every byte
    of its passphrase but the line end."""
    ran = tmp_path / "ran"
    command = f"touch {ran}"
    secret = tmp_path / "pw"
    secret.write_bytes(b" pass word X\r\n")
    for env in (
        {"DEDUPE_PASSWORD": "a", "DEDUPE_PASSWORD_FILE": str(secret)},
        {"DEDUPE_PASSWORD": "a", "DEDUPE_PASSWORD_COMMAND": command},
        {"DEDUPE_PASSWORD_FILE": str(secret), "DEDUPE_PASSWORD_COMMAND": command},
    ):
        with pytest.raises(PassphraseMissing, match=" and .* set together"):
            get_passphrase(env=env)
    assert not ran.exists()
    for kept in (b" pass word X", b" pass word "):  # what a strip of too much would lose
        secret.write_bytes(kept + b"\r\n")
        assert get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(secret)}) == kept
        command = f"cat {secret}"
        assert get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": command}) == kept
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    for env in (
        {"DEDUPE_PASSWORD": ""},
        {"DEDUPE_PASSWORD_FILE": str(empty)},
        {"DEDUPE_PASSWORD_COMMAND": "true"},
    ):
        (name,) = env
        with pytest.raises(PassphraseMissing, match=f"^{name} is empty"):
            get_passphrase(env=env)
    with pytest.raises(PassphraseMissing, match="no passphrase given"):
        get_passphrase(env={})
    with pytest.raises(PassphraseMissing, match="cannot read DEDUPE_PASSWORD_FILE"):
        get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(tmp_path / "absent")})
    for bad, why in (
        ("sh -c 'echo nope >&2; exit 3'", "exit status 3: nope"),
        ("sh -c 'printf \"\\\\377\" >&2; exit 4'", "exit status 4: \ufffd"),  # not UTF-8
        ("'unbalanced", "cannot be parsed"),
        (str(tmp_path / "absent"), "could not be run"),
    ):
        with pytest.raises(PassphraseMissing, match=why):
            get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": bad})


def test_the_passphrase_comes_from_the_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DEDUPE_PASSWORD", "DEDUPE_PASSWORD_FILE", "DEDUPE_PASSWORD_COMMAND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DEDUPE_PASSWORD", "from the environment")
    assert get_passphrase() == b"from the environment"


def test_a_typed_new_passphrase_must_be_typed_twice_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a terminal: a new passphrase is asked twice, and two that differ make nothing (a
    key file under a mistyped passphrase would lock its holder out); an existing one is
    asked once."""

    class Terminal:
        def isatty(self) -> bool:
            return True

    typed: list[str] = []
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return typed.pop(0)

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", fake_getpass)
    typed[:] = ["one", "two"]
    with pytest.raises(WrongPassphrase, match="differ"):
        get_new_passphrase(env={})
    assert prompts == ["New passphrase: ", "Repeat passphrase: "]
    typed[:] = ["same", "same"]
    assert get_new_passphrase(env={}) == b"same"
    prompts.clear()
    typed[:] = ["once", "never asked"]
    assert get_passphrase(env={}) == b"once"
    assert prompts == ["Repository passphrase: "] and typed == ["never asked"]
    typed[:] = [""]
    with pytest.raises(PassphraseMissing, match="the passphrase typed is empty"):
        get_passphrase(env={})
