"""Forgery (docs/FORMAT.md section 11): an attacker with write access to the repository
directory and no key, and key holders acting beyond their role (a writer, a reader).

The keyless attacker's code in this file only reads, writes and deletes files under the
repository directory, uses public facts (the keyring's public keys, the config) and
generic crypto (PyNaCl, blake3, zstandard). It lays its objects out by hand from
docs/FORMAT.md, never with dedupe's encoders, and never touches a secret of a store.
It is handed the chunk ids and pack ids of real generations (they leak to every writer
key), which makes it stronger, never weaker. The legitimate side uses the public API to
make real generations first and to observe the outcome.

Each forged or planted object must be refused by name and for the right reason: not
listed by `generations()` (and reported in `problems`), not restored (an error naming
it, no byte written out), reported by `verify(read_data=True)`, never the parent of the
next backup; and the legitimate generations still restore byte for byte. Where several
checks would each refuse an object, the assertions name the check under test (its
message), so that a test fails if that check alone is removed.

Three defects this file found when it was written (one forged keyring copy stopped the
repository from opening; verify raised on a pack of format version 1; a file under
packs/ not named as an object stopped open and prune) are fixed; their tests stay.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest
import zstandard
from conftest import PASSPHRASE, make_repo
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

import dedupe
from dedupe.crypto import KdfParams, sign_record
from dedupe.crypto.signing import CONFIG_DOMAIN, KEYRING_DOMAIN
from dedupe.engine.verify import (
    AUTH_FAILED,
    ID_MISMATCH,
    MALFORMED,
    MISSING,
    NOT_AUTHENTICATED,
    SIZE_MISMATCH,
    VerifyReport,
)
from dedupe.errors import (
    GenerationNotFound,
    IntegrityError,
    MissingObject,
    RoleNotPermitted,
    RollbackDetected,
    UnsupportedFormat,
)
from dedupe.format.keymap import GENERATION, PACK, QUARANTINE

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
KiB = 1024
MARKER = b"<<bytes the attacker wants restored>>"
REFUSED = (IntegrityError, UnsupportedFormat, GenerationNotFound)
FAR_FUTURE = "2099-01-01T00:00:00.000000Z"  # a forged generation would be everyone's latest


# --- the attacker's tools: public facts and generic crypto, nothing else -------------------


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def aead(key: bytes, plain: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305-IETF as FORMAT.md section 2 lays it out: nonce || ct || tag."""
    nonce = os.urandom(24)
    return nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, nonce, key)


def sealed_box(public: bytes, secret: bytes) -> bytes:
    """Anyone can make one to a public key (FORMAT.md section 2)."""
    return bytes(SealedBox(PublicKey(public)).encrypt(secret))


def zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)  # records its content size


def plant(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def public_keyring(root: Path, copy: str = "keyring/1") -> dict[str, Any]:
    record: dict[str, Any] = json.loads((root / copy).read_bytes())
    return record


def repository_id(root: Path) -> bytes:
    return bytes.fromhex(public_keyring(root)["repository"])


def current_epoch(root: Path) -> int:
    return int(public_keyring(root)["current_epoch"])


def read_public(root: Path, epoch: int) -> bytes:
    for e in public_keyring(root)["epochs"]:
        if e["number"] == epoch:
            return base64.b64decode(e["read_public"])
    raise KeyError(epoch)


def admin_key_id(root: Path) -> bytes:
    return next(
        bytes.fromhex(k["id"]) for k in public_keyring(root)["keys"] if k["role"] == "admin"
    )


def body_frames(body_key: bytes, records: bytes, meta: dict[str, Any]) -> bytes:
    """A manifest body (FORMAT.md section 8): table frames, then the meta frame."""
    payloads = [records[i : i + 16384 * 36] for i in range(0, len(records), 16384 * 36)]
    payloads.append(json.dumps(meta).encode())
    out = b""
    for i, payload in enumerate(payloads):
        sealed = aead(body_key, zstd(payload), b"dedupe-generation-frame v3" + struct.pack("<I", i))
        out += struct.pack("<I", len(sealed)) + sealed
    return out


def manifest(
    header: dict[str, Any], records: bytes, meta: dict[str, Any], header_key: bytes, body_key: bytes
) -> tuple[str, bytes]:
    """(generation id, bytes) of a version 3 manifest made with keys of one's own."""
    body = body_frames(body_key, records, meta)
    header = {**header, "version": 3, "body": b3(body)}
    sealed = aead(header_key, json.dumps(header).encode(), b"dedupe-generation-header v3")
    prefix = b"DDPGEN03" + struct.pack("<I", len(sealed)) + sealed
    return b3(prefix), prefix + body


def forged_header(root: Path, name: str, size: int, chunks: int) -> dict[str, Any]:
    config = json.loads((root / "config").read_bytes())
    return {
        "name": name,
        "kind": "full",
        "parent": None,
        "created": FAR_FUTURE,
        "source": {"type": "stream", "label": "forged"},
        "chunker": config["chunker"],
        "size": size,
        "chunks": chunks,
        "new_chunks": 0,
        "new_bytes": 0,
        "stored_bytes": 0,
        "seconds": 0.0,
    }


def prefix_end(data: bytes) -> int:
    """Where a version 3 manifest's prefix (what its id hashes) ends."""
    (n,) = struct.unpack_from("<I", data, 8)
    return 12 + n


def a_meta_wrap(data_key: bytes, kind: int, oid: bytes, epoch: int) -> bytes:
    """The best a keyless attacker can do for a meta_wrap: the right layout and associated
    data, under a key of its own (it has no epoch's meta secret)."""
    aad = b"dedupe-keymap-wrap v2\x00" + struct.pack("<B", kind) + oid + struct.pack("<I", epoch)
    return aead(os.urandom(32), data_key, aad)


def entry(kind: int, oid: bytes, epoch: int, *wraps: bytes) -> bytes:
    return struct.pack("<B32sI", kind, oid, epoch) + b"".join(wraps)


def generation_entry(oid: bytes, epoch: int, meta_wrap: bytes, read_wrap: bytes) -> bytes:
    return entry(GENERATION, oid, epoch, meta_wrap, read_wrap, bytes(16), bytes(80))


def signed_keymap(
    root: Path, epoch: int, signer_id: bytes, entries: list[bytes], key: SigningKey
) -> tuple[str, bytes]:
    """(name, bytes) of a key map (FORMAT.md 4.5) signed with `key`."""
    unsigned = struct.pack("<8sI16sI", b"DDPKMAP2", epoch, signer_id, len(entries))
    unsigned += b"".join(entries)
    signature = key.sign(b"dedupe-keymap v2\x00" + repository_id(root) + unsigned).signature
    data = unsigned + signature
    return f"keymaps/{epoch:08d}/{b3(data)}", data


def pack(key: bytes, blobs: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[Any, ...]]]:
    """(bytes, entries) of a version 2 pack: (chunk id, content) blobs sealed under `key`
    with the chunk id as associated data. Entries: (chunk id, offset, stored, raw)."""
    data = b"DDPACK02"
    entries = []
    for chunk_id, content in blobs:
        sealed = aead(key, b"\x00" + content, chunk_id)
        entries.append((chunk_id, len(data), len(sealed), len(content)))
        data += sealed
    trailer_plain = struct.pack("<I", len(entries)) + b"".join(
        struct.pack("<32sIII", *e) for e in entries
    )
    trailer = aead(key, trailer_plain, b"dedupe-pack-trailer v2")
    return data + trailer + struct.pack("<I8s", len(trailer), b"DDPKEND2"), entries


def index_object(
    key: bytes, packs: list[tuple[bytes, int]], entries: list[tuple[bytes, int, int, int, int]]
) -> bytes:
    """A version 2 index object (FORMAT.md section 7) sealed under `key`."""
    plain = struct.pack("<Q", len(packs)) + b"".join(struct.pack("<32sQ", *p) for p in packs)
    plain += struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<32sIIII", *e) for e in entries
    )
    return b"DDPIDX02" + aead(key, zstd(plain), b"dedupe-index v2")


def marker(n: int) -> bytes:
    """`n` bytes of the attacker's marker: a blob as long as the real one it replaces."""
    return (MARKER * (n // len(MARKER) + 1))[:n]


def pack_path(pack_id: bytes) -> str:
    return f"packs/{pack_id.hex()[:2]}/{pack_id.hex()}"


def keymap_wraps(root: Path) -> list[tuple[int, bytes]]:
    """(epoch, read_wrap) of every pack and generation entry of every key map present:
    key maps are laid out in the clear (FORMAT.md 4.5), only their wraps are sealed."""
    out = []
    for path in sorted((root / "keymaps").rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        data = path.read_bytes()
        _magic, epoch, _signer, count = struct.unpack_from("<8sI16sI", data)
        pos = 32
        for _ in range(count):
            kind = data[pos]
            pos += 37  # kind, object id, born
            if kind == PACK:
                out.append((epoch, data[pos : pos + 80]))
                pos += 80
            elif kind == GENERATION:
                out.append((epoch, data[pos + 72 : pos + 152]))
                pos += 72 + 80 + 16 + 80
            else:
                pos += 72
        assert pos == len(data) - 64
    return out


def opens_with(secret: bytes, wrap: bytes) -> bool:
    try:
        SealedBox(PrivateKey(secret)).decrypt(wrap)
    except CryptoError:
        return False
    return True


# --- the legitimate side: real generations made through the public API ----------------------


@dataclass
class Legit:
    root: Path
    a1: str  # "a", full
    a2: str  # "a", incremental on a1
    b1: str  # "b", full
    data: dict[str, bytes]  # generation id -> its bytes
    index_of: dict[str, str]  # generation id -> the index object its backup wrote
    latest: dict[str, str] = field(default_factory=dict)  # name -> latest generation


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def legit_repo(root: Path) -> tuple[dedupe.Repository, Legit]:
    repo = await make_repo(root)
    a = random_bytes(48 * KiB, 1)
    sources = [("a", a), ("a", a + random_bytes(8 * KiB, 2)), ("b", random_bytes(48 * KiB, 3))]
    ids, data, index_of = [], {}, {}
    for name, content in sources:
        before = (
            {p.name for p in (root / "index").glob("*")} if (root / "index").exists() else set()
        )
        stats = await repo.backup(io.BytesIO(content), name=name, kind="incremental")
        (new_index,) = {p.name for p in (root / "index").glob("*")} - before
        ids.append(stats.id)
        data[stats.id] = content
        index_of[stats.id] = new_index
    a1, a2, b1 = ids
    return repo, Legit(root, a1, a2, b1, data, index_of, {"a": a2, "b": b1})


async def leaked_places(repo: dedupe.Repository, gen_id: str) -> list[tuple[bytes, int, bytes]]:
    """(chunk id, raw length, pack id) of each chunk of a generation: what the attacker is
    handed (chunk and pack ids leak to writer keys)."""
    store = repo._store
    await store.refresh_index()
    _meta, table = await store.generation_chunks(gen_id)
    out = []
    for chunk_id, raw in struct.iter_unpack("<32sI", table):
        loc = store.index.get(chunk_id)
        assert loc is not None
        out.append((chunk_id, raw, store.index.packs[loc.pack_no].pack_id))
    return out


def has_problem(repo: dedupe.Repository, *parts: str) -> bool:
    return any(all(p in m for p in parts) for m in repo.problems)


async def assert_not_listed(repo: dedupe.Repository, gen_id: str, *why: str) -> None:
    listed = [g.id for g in await repo.generations()]
    assert gen_id not in listed
    assert has_problem(repo, gen_id, *why), repo.problems


async def assert_restore_refused(
    repo: dedupe.Repository,
    gen_id: str,
    out_dir: Path,
    *why: str,
    error: type[Exception] = IntegrityError,
) -> str:
    """Restoring `gen_id` fails with `error` naming it (and `why`); nothing is written.
    Returns the error's message."""
    out_dir.mkdir()
    with pytest.raises(REFUSED) as e:
        await repo.restore(gen_id, out_dir / "restored")
    assert isinstance(e.value, error), e.value
    for part in (gen_id, *why):
        assert part in e.value.message, e.value.message
    assert list(out_dir.iterdir()) == []  # no file, no temporary left behind
    buf = io.BytesIO()
    with pytest.raises(error):
        await repo.restore(gen_id, buf)
    assert buf.getvalue() == b""
    return e.value.message


async def assert_intact(repo: dedupe.Repository, legit: Legit, skip: tuple[str, ...] = ()) -> None:
    """Every legitimate generation is listed and restores to its exact bytes."""
    listed = {g.id for g in await repo.generations()}
    for gen_id, data in legit.data.items():
        if gen_id in skip:
            continue
        assert gen_id in listed
        buf = io.BytesIO()
        await repo.restore(gen_id, buf)
        assert buf.getvalue() == data


async def assert_next_backup_sound(
    repo: dedupe.Repository, legit: Legit, name: str = "a"
) -> dedupe.BackupStats:
    """The next incremental of `name` is based on its latest legitimate generation and
    restores correctly."""
    parent = legit.latest[name]
    # A tail of its own: no chunk of it is in the repository already.
    data = legit.data[parent] + random_bytes(4 * KiB, 1000 + len(legit.data))
    stats = await repo.backup(io.BytesIO(data), name=name, kind="incremental")
    assert stats.parent == parent
    buf = io.BytesIO()
    await repo.restore(stats.id, buf)
    assert buf.getvalue() == data
    legit.data[stats.id] = data
    legit.latest[name] = stats.id
    return stats


def damaged(report: VerifyReport, name: str, reason: str | set[str], *why: str) -> None:
    """The report names object `name`, for `reason` (or one of them), with a detail
    holding every `why`."""
    assert not report.ok
    found = {d.name: d for d in report.damaged}
    assert name in found, [d.name for d in report.damaged]
    d = found[name]
    assert d.reason in ({reason} if isinstance(reason, str) else reason), d
    assert any(all(w in detail for w in why) for detail in d.details), d.details


def keymap_refusal(kind: str, signer: bytes) -> str:
    """What the key directory says of a key map the attacker signed as `kind`."""
    if kind == "stranger":
        return f"is signed by key {signer.hex()}, which is not in the keyring"
    return f"fails the signature of key {signer.hex()}"


def attacker_signer(root: Path, kind: str) -> bytes:
    """The key id an attacker's key map claims: its own (a stranger's) or the admin's."""
    return os.urandom(16) if kind == "stranger" else admin_key_id(root)


NOT_AUTH = "is not authenticated"


# --- 1. a manifest forged from scratch -------------------------------------------------------


@pytest.mark.parametrize("keymap", [None, "stranger", "admin"])
def test_a_manifest_forged_from_scratch_is_refused(
    run: Run[None], repo_path: Path, tmp_path: Path, keymap: str | None
) -> None:
    """The attacker seals a header and frames under keys it invents; its table is b's,
    named "a" and dated in the future (it would be a's latest, restoring as b's bytes).
    Variants: with a key map of its own, holding a read_wrap of its body key sealed to the
    epoch's public read key (a sealed box anyone can make), signed with its own Ed25519
    key under a stranger's key id or under the admin's."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.b1)
            records = b"".join(struct.pack("<32sI", c, n) for c, n, _ in places)
            meta = {"type": "stream", "digest": os.urandom(32).hex(), "delta": None}
            meta["chunk_count"] = len(places)
            header = forged_header(repo_path, "a", len(legit.data[legit.b1]), len(places))
            header_key, body_key = os.urandom(32), os.urandom(32)
            gen_id, data = manifest(header, records, meta, header_key, body_key)
            plant(repo_path, f"generations/{gen_id}", data)
            keymap_name = None
            if keymap is not None:
                epoch = current_epoch(repo_path)
                oid = bytes.fromhex(gen_id)
                signer = attacker_signer(repo_path, keymap)
                keymap_name, km = signed_keymap(
                    repo_path,
                    epoch,
                    signer,
                    [
                        generation_entry(
                            oid,
                            epoch,
                            a_meta_wrap(header_key, GENERATION, oid, epoch),
                            sealed_box(read_public(repo_path, epoch), body_key),
                        )
                    ],
                    SigningKey.generate(),
                )
                plant(repo_path, keymap_name, km)

            await assert_not_listed(repo, gen_id, NOT_AUTH)
            if keymap_name is not None:
                assert has_problem(repo, keymap_name, keymap_refusal(keymap, signer))
            await assert_restore_refused(repo, gen_id, tmp_path / "out", NOT_AUTH)
            with pytest.raises(IntegrityError, match=NOT_AUTH):
                await repo.restore(gen_id[:12], io.BytesIO())  # by a prefix of its id
            latest = await repo.resolve("a@latest")
            assert latest.id == legit.a2
            report = await repo.verify(read_data=True)
            damaged(report, f"generations/{gen_id}", NOT_AUTHENTICATED, gen_id, NOT_AUTH)
            if keymap_name is not None:
                damaged(report, keymap_name, NOT_AUTHENTICATED, keymap_refusal(keymap, signer))
                assert len(report.damaged) == 2
            else:
                assert len(report.damaged) == 1
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run(go())


# --- 2. a real header with a body of the attacker's -------------------------------------------


def test_a_real_header_with_a_new_body_is_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """The prefix of b's real manifest (so its real, authenticated id) followed by frames
    the attacker sealed under a key of its own, holding a's table, stored in place of
    the real object."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            records = b"".join(struct.pack("<32sI", c, n) for c, n, _ in places)
            meta = {"type": "stream", "digest": os.urandom(32).hex(), "delta": None}
            meta["chunk_count"] = len(places)
            path = repo_path / "generations" / legit.b1
            real = path.read_bytes()
            path.write_bytes(real[: prefix_end(real)] + body_frames(os.urandom(32), records, meta))

            # The header is authentic and is still listed (a listing reads headers only)...
            assert legit.b1 in [g.id for g in await repo.generations()]
            # ...but its body is refused: its frames open under no key a key map vouches
            # for, and it is not the body the header's hash names (restore meets the
            # first, verify the second).
            why = ("frame 0 failed authentication", "its body does not belong to its header")
            message = await assert_restore_refused(repo, legit.b1, tmp_path / "out")
            assert any(w in message for w in why), message
            report = await repo.verify(read_data=True)
            name = f"generations/{legit.b1}"
            assert any(
                w in detail
                for d in report.damaged
                if d.name == name
                for detail in d.details
                for w in why
            ), report.damaged
            damaged(report, name, {AUTH_FAILED, MALFORMED, NOT_AUTHENTICATED}, legit.b1)
            assert [d.name for d in report.damaged] == [f"generations/{legit.b1}"]
            # The next backup of "b" does not build on it: it is made as a full, and its
            # note says which generation is at fault; "a" is untouched.
            stats = await repo.backup(
                io.BytesIO(legit.data[legit.b1]), name="b", kind="incremental"
            )
            assert (stats.kind, stats.parent) == ("full", None)
            assert stats.note is not None and f"{legit.b1[:12]} of 'b' is damaged" in stats.note
            buf = io.BytesIO()
            await repo.restore(stats.id, buf)
            assert buf.getvalue() == legit.data[legit.b1]
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit, skip=(legit.b1,))

    run_asyncio(go())


@pytest.mark.parametrize("where", ["in place of another", "under a new name"])
def test_a_swapped_manifest_is_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, where: str
) -> None:
    """a's real manifest, byte for byte, under b's generation id (replacing b's) or under
    a new id: its key map entry is for another id, and its prefix hashes to another."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            real = (repo_path / "generations" / legit.a1).read_bytes()
            gen_id = legit.b1 if where == "in place of another" else b3(os.urandom(8))
            plant(repo_path, f"generations/{gen_id}", real)

            why = "does not match its id"
            await assert_not_listed(repo, gen_id, why)
            await assert_restore_refused(repo, gen_id, tmp_path / "out", why)
            report = await repo.verify(read_data=True)
            damaged(report, f"generations/{gen_id}", ID_MISMATCH, gen_id, why)
            assert len(report.damaged) == 1
            await assert_next_backup_sound(repo, legit, "a")
            if where == "in place of another":
                # b has no generation left that can be read: its next one is a full.
                stats = await repo.backup(io.BytesIO(b"b" * 5000), name="b", kind="incremental")
                assert stats.parent is None and stats.kind == "full"
            await assert_intact(
                repo, legit, skip=(legit.b1,) if where == "in place of another" else ()
            )

    run_asyncio(go())


# --- 3. forged and swapped index objects ------------------------------------------------------


def test_a_forged_index_object_is_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """DDPIDX02 under a key of the attacker's, redirecting a's chunks into b's pack."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            a_places = await leaked_places(repo, legit.a1)
            b_pack = (await leaked_places(repo, legit.b1))[0][2]
            b_len = (repo_path / pack_path(b_pack)).stat().st_size
            entries = [(c, 0, 8, 100, n) for c, n, _ in a_places]
            data = index_object(os.urandom(32), [(b_pack, b_len)], entries)
            name = f"index/{b3(data)}"
            plant(repo_path, name, data)

            await repo.generations()
            await assert_intact(repo, legit)
            assert has_problem(repo, f"index object {name}", NOT_AUTH)
            report = await repo.verify(read_data=True)
            damaged(report, name, NOT_AUTHENTICATED, name, NOT_AUTH)
            assert [d.name for d in report.damaged] == [name]
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


@pytest.mark.parametrize("where", ["in place of another", "under a new name"])
def test_a_swapped_index_object_is_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, where: str
) -> None:
    """The bytes of a's real index object under b's index object's name (replacing it),
    or under a new name."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        await repo.close()  # the attacker acts between two sessions
        real = (repo_path / "index" / legit.index_of[legit.a1]).read_bytes()
        if where == "in place of another":
            name = f"index/{legit.index_of[legit.b1]}"
        else:
            name = f"index/{b3(os.urandom(8))}"
        plant(repo_path, name, real)

        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            why = "does not match its name"
            await repo.stats()  # the first operation that reads the index reports it
            assert has_problem(repo, f"index object {name}", why)
            broken: tuple[str, ...] = ()
            if where == "in place of another":
                # b's chunks are listed by no trustworthy index object any more: its
                # restore fails and says so, and nothing is written.
                broken = (legit.b1,)
                out = tmp_path / "out"
                out.mkdir()
                with pytest.raises(MissingObject, match=f"generation {legit.b1}"):
                    await repo.restore(legit.b1, out / "b")
                assert list(out.iterdir()) == []
            await assert_intact(repo, legit, skip=broken)
            report = await repo.verify(read_data=True)
            damaged(report, name, ID_MISMATCH, name, why)
            await assert_next_backup_sound(repo, legit, "a")
            # The next backup of "b" stores again what the swap made unreachable.
            stats = await assert_next_backup_sound(repo, legit, "b")
            if broken:
                assert stats.chunks_new == stats.chunks
            await assert_intact(repo, legit, skip=broken)

    run_asyncio(go())


# --- 4. a pack whose key the attacker wrapped --------------------------------------------------


@pytest.mark.parametrize("signer_kind", ["stranger", "admin"])
@pytest.mark.parametrize("where", ["own name", "real pack's name"])
def test_a_pack_whose_key_the_attacker_wrapped_is_never_read(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, signer_kind: str, where: str
) -> None:
    """A DDPACK02 pack holding the marker under a's chunk ids, sealed under the
    attacker's key; a key map the attacker signs gives that key, sealed to the epoch's
    public read key; a forged index object points a's chunks at the pack. It is put under
    its own name (and a's real pack deleted, so that no other copy is left), or in place
    of a's real pack."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            (real_pack,) = {p for _c, _n, p in places}
            key = os.urandom(32)
            data, entries = pack(key, [(c, marker(n)) for c, n, _ in places])
            epoch = current_epoch(repo_path)
            if where == "own name":
                pack_id = bytes.fromhex(b3(data))
                (repo_path / pack_path(real_pack)).unlink()
            else:
                pack_id = real_pack
            plant(repo_path, pack_path(pack_id), data)
            signer = attacker_signer(repo_path, signer_kind)
            keymap_name, km = signed_keymap(
                repo_path,
                epoch,
                signer,
                [entry(PACK, pack_id, epoch, sealed_box(read_public(repo_path, epoch), key))],
                SigningKey.generate(),
            )
            plant(repo_path, keymap_name, km)
            index_entries = [(c, 0, off, stored, raw) for c, off, stored, raw in entries]
            idx = index_object(os.urandom(32), [(pack_id, len(data))], index_entries)
            index_name = f"index/{b3(idx)}"
            plant(repo_path, index_name, idx)

            # a's generations restore nothing of the attacker's: they fail, by name.
            for gen_id in (legit.a1, legit.a2):
                out = tmp_path / f"out-{gen_id[:8]}"
                out.mkdir()
                with pytest.raises(IntegrityError) as e:
                    await repo.restore(gen_id, out / "a")
                assert list(out.iterdir()) == []
                if where == "own name":
                    assert isinstance(e.value, MissingObject)
                    assert f"{pack_path(real_pack)} is missing" in e.value.message
                else:
                    assert "authenticat" in e.value.message, e.value.message
                buf = io.BytesIO()
                with pytest.raises(IntegrityError):
                    await repo.restore(gen_id, buf)
                assert MARKER not in buf.getvalue() and buf.getvalue() == b""

            refusal = keymap_refusal(signer_kind, signer)
            assert has_problem(repo, keymap_name, refusal)
            assert has_problem(repo, f"index object {index_name}", NOT_AUTH)
            found = repo._store.keymaps.get(PACK, pack_id)
            if where == "real pack's name":
                # The pack's real key map entry stands; the attacker's does not replace it.
                assert found is not None and found.keymap != keymap_name
            else:
                assert found is None

            report = await repo.verify(read_data=True)
            damaged(report, keymap_name, NOT_AUTHENTICATED, refusal)
            damaged(report, index_name, NOT_AUTHENTICATED, NOT_AUTH)
            if where == "own name":
                damaged(report, pack_path(real_pack), MISSING, "is missing")
                assert pack_path(pack_id) not in {d.name for d in report.damaged}
                assert report.packs_unindexed == 1  # the attacker's, left for prune
            else:
                damaged(report, pack_path(real_pack), AUTH_FAILED, "failed authentication")
                assert any(
                    "do not hash to its name" in d
                    for x in report.damaged
                    if x.name == pack_path(real_pack)
                    for d in x.details
                )
            assert report.quarantine is not None
            # b is untouched; the next backup of "a" stores a's chunks again (they are
            # quarantined or missing), never the attacker's copy.
            await assert_intact(repo, legit, skip=(legit.a1, legit.a2))
            data_a = legit.data[legit.a1]
            stats = await repo.backup(io.BytesIO(data_a), name="a", kind="full")
            assert stats.chunks_new == stats.chunks
            buf = io.BytesIO()
            await repo.restore(stats.id, buf)
            assert buf.getvalue() == data_a

    run_asyncio(go())


# --- 5. a forged config -------------------------------------------------------------------------

CONFIG_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "chunker": lambda c: c["chunker"].update(min_size=64, avg_size=256, max_size=1024),
    "compression": lambda c: c["compression"].update(level=19),
    "pack_size": lambda c: c.update(pack_size=4096),
}


@pytest.mark.parametrize("signature", ["left as it was", "the attacker's"])
@pytest.mark.parametrize("change", sorted(CONFIG_CHANGES))
def test_a_forged_config_is_refused(
    run_asyncio: Run[None], repo_path: Path, change: str, signature: str
) -> None:
    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        await repo.close()
        original = (repo_path / "config").read_bytes()
        config = json.loads(original)
        CONFIG_CHANGES[change](config)
        if signature == "the attacker's":
            config.pop("signature")
            signed = SigningKey.generate().sign(b"dedupe-config v2\x00" + canonical(config))
            config["signature"] = base64.b64encode(signed.signature).decode()
        (repo_path / "config").write_bytes(json.dumps(config, indent=2).encode())
        with pytest.raises(IntegrityError, match="config fails its admin signature"):
            await dedupe.Repository.open(repo_path, PASSPHRASE)
        (repo_path / "config").write_bytes(original)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as again:
            await assert_intact(again, legit)

    run_asyncio(go())


# --- 6. forged epochs; a keyring rolled back ----------------------------------------------------


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def attacker_grant(
    holder: dict[str, Any], repository: str, epoch: int, meta: bytes, read: bytes
) -> str:
    """A grant as FORMAT.md 4.3 lays it out, sealed to a key holder's public box key: it
    opens, and every binding in it checks out."""
    payload = {
        "epoch": epoch,
        "key": holder["id"],
        "meta": base64.b64encode(meta).decode(),
        "read": None if holder["role"] == "writer" else base64.b64encode(read).decode(),
        "repository": repository,
    }
    box_public = base64.b64decode(holder["box_public"])
    return base64.b64encode(sealed_box(box_public, canonical(payload))).decode()


def _with_attacker_epoch(record: dict[str, Any], attacker: PrivateKey) -> dict[str, Any]:
    """The keyring with a new active epoch, current, whose read key pair is the
    attacker's, and which grants every key holder (with grants that open and check out):
    only the admin signature can refuse it."""
    record = json.loads(json.dumps(record))
    number = max(e["number"] for e in record["epochs"]) + 1
    meta = os.urandom(32)
    check = blake3.blake3(meta, derive_key_context="dedupe 2026-12 epoch meta check v2")
    record["epochs"].append(
        {
            "number": number,
            "created": record["updated"],
            "state": "active",
            "read_public": base64.b64encode(bytes(attacker.public_key)).decode(),
            "meta_check": check.hexdigest(),
            "grants": {
                k["id"]: attacker_grant(k, record["repository"], number, meta, bytes(attacker))
                for k in record["keys"]
            },
        }
    )
    record["current_epoch"] = number
    record["serial"] += 1
    return record


def _with_swapped_read_public(record: dict[str, Any], attacker: PrivateKey) -> dict[str, Any]:
    record = json.loads(json.dumps(record))
    for e in record["epochs"]:
        if e["number"] == record["current_epoch"]:
            e["read_public"] = base64.b64encode(bytes(attacker.public_key)).decode()
    return record


FORGE_EPOCH = {
    "new current epoch": _with_attacker_epoch,
    "swapped read_public": _with_swapped_read_public,
}


@pytest.mark.parametrize("forgery", sorted(FORGE_EPOCH))
def test_a_forged_epoch_in_both_keyring_copies_is_refused(
    run_asyncio: Run[None], repo_path: Path, forgery: str
) -> None:
    """Both copies edited: the repository does not open, and a handle already open stops
    at its next backup rather than wrap a data key for the attacker."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            attacker = PrivateKey.generate()
            forged = FORGE_EPOCH[forgery](public_keyring(repo_path), attacker)
            for copy in ("keyring/1", "keyring/2"):
                (repo_path / copy).write_bytes(json.dumps(forged, indent=1).encode())
            with pytest.raises(IntegrityError) as e:
                await dedupe.Repository.open(repo_path, PASSPHRASE)
            assert "keyring cannot be trusted" in e.value.message
            assert "keyring/1 fails its admin signature" in e.value.message
            assert "keyring/2 fails its admin signature" in e.value.message
            with pytest.raises(IntegrityError, match="keyring/1 fails its admin signature"):
                await repo.backup(io.BytesIO(b"new data" * 1000), name="a", kind="incremental")
            with pytest.raises(IntegrityError, match="keyring/1 fails its admin signature"):
                await repo.backup(io.BytesIO(b"new data" * 1000), name="c", kind="full")
            wraps = keymap_wraps(repo_path)
            assert wraps and not any(opens_with(bytes(attacker), w) for _e, w in wraps)
            assert len(list((repo_path / "generations").iterdir())) == 3

    run_asyncio(go())


@pytest.mark.parametrize("copy", ["keyring/1", "keyring/2"])
@pytest.mark.parametrize("forgery", sorted(FORGE_EPOCH))
def test_a_forged_epoch_in_one_keyring_copy_is_reported_and_not_used(
    run_asyncio: Run[None], repo_path: Path, forgery: str, copy: str
) -> None:
    """One copy edited (a new epoch comes with a higher serial): the repository opens on
    the other, says that the edited one fails its signature, and wraps nothing for the
    attacker's key."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        await repo.close()
        attacker = PrivateKey.generate()
        forged = FORGE_EPOCH[forgery](public_keyring(repo_path), attacker)
        (repo_path / copy).write_bytes(json.dumps(forged, indent=1).encode())
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert has_problem(repo, f"{copy} fails its admin signature")
            await assert_next_backup_sound(repo, legit, "a")
            await assert_next_backup_sound(repo, legit, "b")
            wraps = keymap_wraps(repo_path)
            assert {e for e, _w in wraps} == {1}
            assert len(wraps) >= 6 and not any(opens_with(bytes(attacker), w) for _e, w in wraps)
            report = await repo.verify(read_data=True)
            damaged(report, copy, NOT_AUTHENTICATED, "fails its admin signature")
            assert [d.name for d in report.damaged] == [copy]
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_a_forged_key_list_in_one_keyring_copy_does_not_stop_the_repository(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """FORMAT.md 4.3: a reader reports a copy that is damaged and fails only when
    neither verifies. keyring/1's key list is edited (the admin's key id replaced)."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        await repo.close()
        record = public_keyring(repo_path)
        record["keys"][0]["id"] = os.urandom(16).hex()
        (repo_path / "keyring/1").write_bytes(json.dumps(record, indent=1).encode())
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert has_problem(repo, "keyring/1 fails its admin signature")
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_an_older_keyring_put_back_is_a_rollback(run_asyncio: Run[None], repo_path: Path) -> None:
    """Both copies of the keyring as they were before `rotate` (validly signed, epoch 1
    current): refused by this client, which saw the newer one."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            old = {c: (repo_path / c).read_bytes() for c in ("keyring/1", "keyring/2")}
            await repo.keys.rotate()
            new = {c: (repo_path / c).read_bytes() for c in old}
            for copy, data in old.items():
                (repo_path / copy).write_bytes(data)
            with pytest.raises(RollbackDetected, match="an older copy was put back"):
                await dedupe.Repository.open(repo_path, PASSPHRASE)
            with pytest.raises(RollbackDetected):
                await repo.generations()
            with pytest.raises(RollbackDetected):
                await repo.backup(io.BytesIO(b"new" * 1000), name="a", kind="incremental")
            # One copy rolled back: the newer one is used, the other reported as behind.
            (repo_path / "keyring/1").write_bytes(new["keyring/1"])
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert has_problem(repo, "keyring/2 is at serial 1")
            report = await repo.verify()
            assert any("keyring/2 is at serial 1" in n for n in report.notes), report
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


# --- 7. replayed key maps of a retired epoch ----------------------------------------------------


def _saved_keymaps(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in (root / "keymaps").rglob("*")
        if p.is_file()
    }


def _put_back(root: Path, saved: dict[str, bytes], where: str) -> dict[str, str]:
    """Put the saved key maps back, in their own (retired) epoch's directory or, with
    their bytes and so their ids unchanged, in the current epoch's; -> {name: refusal}."""
    out = {}
    for name, data in saved.items():
        if where == "own epoch":
            out[name] = "which was retired: refused"
        else:
            name = f"keymaps/{current_epoch(root):08d}/{name.rsplit('/', 1)[-1]}"
            out[name] = f"is filed under epoch {current_epoch(root)} but is for 1"
        plant(root, name, data)
    return out


REPLAY_WHERE = ["own epoch", "current epoch's directory"]


@pytest.mark.parametrize("where", REPLAY_WHERE)
def test_a_key_map_of_a_retired_epoch_put_back_is_refused(
    run_asyncio: Run[None], repo_path: Path, where: str
) -> None:
    """Every key map saved before `rotate`, put back afterwards."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            saved = _saved_keymaps(repo_path)
            assert saved and all(n.startswith("keymaps/00000001/") for n in saved)
            await repo.keys.rotate()
            refusals = _put_back(repo_path, saved, where)
            await assert_intact(repo, legit)
            if where != "own epoch":  # a directory of an active epoch: loaded, and refused
                for name, why in refusals.items():
                    assert has_problem(repo, f"key map {name}", why), repo.problems
            report = await repo.verify(read_data=True)
            for name, why in refusals.items():
                damaged(report, name, NOT_AUTHENTICATED, why)
            assert len(report.damaged) == len(saved)
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


@pytest.mark.parametrize("where", REPLAY_WHERE)
def test_a_forgotten_generation_put_back_with_its_retired_key_map_is_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, where: str
) -> None:
    """c is backed up, its manifest and every key map saved; c is forgotten, pruned, and
    the keys rotated; then the manifest and the key maps are put back."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            c = await repo.backup(io.BytesIO(random_bytes(40 * KiB, 7)), name="c", kind="full")
            manifest_bytes = (repo_path / "generations" / c.id).read_bytes()
            saved = _saved_keymaps(repo_path)
            await repo.forget(ids=[c.id])
            await repo.prune()
            await repo.keys.rotate()
            assert current_epoch(repo_path) == 2
            plant(repo_path, f"generations/{c.id}", manifest_bytes)
            refusals = _put_back(repo_path, saved, where)

            await assert_not_listed(repo, c.id, NOT_AUTH)
            await assert_restore_refused(repo, c.id, tmp_path / "out", NOT_AUTH)
            report = await repo.verify(read_data=True)
            damaged(report, f"generations/{c.id}", NOT_AUTHENTICATED, NOT_AUTH)
            for name, why in refusals.items():
                damaged(report, name, NOT_AUTHENTICATED, why)
            assert len(report.damaged) == len(saved) + 1
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


# --- 8. objects of the previous format version --------------------------------------------------


def test_manifests_of_format_version_1_are_refused(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """DDPGEN02 (header, epoch, body key wrapped to the public read key, frames) and
    DDPGEN01 (one sealed body): the layouts in which a keyless attacker could forge."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            epoch = current_epoch(repo_path)
            wrapped = sealed_box(read_public(repo_path, epoch), body_key := os.urandom(32))
            header = forged_header(repo_path, "a", 1000, 1)
            header = {**header, "version": 1}
            sealed = aead(
                os.urandom(32), json.dumps(header).encode(), b"dedupe-generation-header v1"
            )
            head = struct.pack("<I", len(sealed)) + sealed + struct.pack("<I", epoch) + wrapped
            meta = {"type": "stream", "chunk_count": 0, "digest": "0" * 64, "delta": None}
            v2 = b"DDPGEN02" + head + body_frames(body_key, b"", meta)
            v1 = b"DDPGEN01" + head + aead(body_key, zstd(MARKER), b"dedupe-generation-body v1")
            ids = []
            for data in (v2, v1):
                gen_id = b3(data)
                plant(repo_path, f"generations/{gen_id}", data)
                ids.append(gen_id)
            why = "is a manifest of another format version"
            report = await repo.verify(read_data=True)
            for gen_id, magic in zip(ids, ("DDPGEN02", "DDPGEN01"), strict=True):
                await assert_not_listed(repo, gen_id, why, magic)
                await assert_restore_refused(
                    repo, gen_id, tmp_path / magic, why, error=UnsupportedFormat
                )
                damaged(report, f"generations/{gen_id}", MALFORMED, why, magic)
            assert len(report.damaged) == 2
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_an_index_object_of_format_version_1_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """DDPIDX01: its pack records carried the pack key wrapped to the public read key."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            epoch = current_epoch(repo_path)
            wrapped = sealed_box(read_public(repo_path, epoch), os.urandom(32))
            pack_id = os.urandom(32)
            plain = struct.pack("<Q", 1) + struct.pack("<32sI80sQ", pack_id, epoch, wrapped, 9999)
            plain += struct.pack("<Q", len(places))
            plain += b"".join(struct.pack("<32sIIII", c, 0, 8, 100, n) for c, n, _ in places)
            data = b"DDPIDX01" + aead(os.urandom(32), zstd(plain), b"dedupe-index v1")
            name = f"index/{b3(data)}"
            plant(repo_path, name, data)

            await assert_intact(repo, legit)
            why = "is of another format version"
            assert has_problem(repo, f"index object {name}", why, "DDPIDX01")
            report = await repo.verify(read_data=True)
            damaged(report, name, MALFORMED, why)
            assert [d.name for d in report.damaged] == [name]
            await assert_next_backup_sound(repo, legit, "a")

    run_asyncio(go())


def _pack_v1(
    key: bytes, read_public_key: bytes, epoch: int, blobs: list[tuple[bytes, bytes]]
) -> bytes:
    """A version 1 pack: its key wrapped to the public read key in its footer."""
    data = b"DDPACK01"
    entries = []
    for chunk_id, content in blobs:
        sealed = aead(key, b"\x00" + content, chunk_id)
        entries.append((chunk_id, len(data), len(sealed), len(content)))
        data += sealed
    trailer_plain = struct.pack("<I", len(entries)) + b"".join(
        struct.pack("<32sIII", *e) for e in entries
    )
    trailer = aead(key, trailer_plain, b"dedupe-pack-trailer v1")
    footer = struct.pack(
        "<I80sI8s", epoch, sealed_box(read_public_key, key), len(trailer), b"DDPKEND1"
    )
    return data + trailer + footer


def test_a_planted_pack_of_format_version_1_is_never_used(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """Under its own name: no authenticated index object lists it, so nothing reads it;
    verify counts it as unindexed and prune deletes it."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            epoch = current_epoch(repo_path)
            data = _pack_v1(
                os.urandom(32),
                read_public(repo_path, epoch),
                epoch,
                [(c, MARKER) for c, _n, _ in places],
            )
            name = pack_path(bytes.fromhex(b3(data)))
            plant(repo_path, name, data)
            await assert_intact(repo, legit)
            report = await repo.verify(read_data=True)
            assert report.ok and report.packs_unindexed == 1
            await assert_next_backup_sound(repo, legit, "a")
            await repo.prune()
            assert not (repo_path / name).exists()
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_a_pack_of_format_version_1_in_place_of_a_real_one_is_reported(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            (real_pack,) = {p for _c, _n, p in places}
            epoch = current_epoch(repo_path)
            blobs = [(c, marker(n)) for c, n, _ in places]
            data = _pack_v1(os.urandom(32), read_public(repo_path, epoch), epoch, blobs)
            plant(repo_path, pack_path(real_pack), data)
            buf = io.BytesIO()
            with pytest.raises(IntegrityError, match="authenticat"):
                await repo.restore(legit.a1, buf)
            assert buf.getvalue() == b""
            await assert_intact(repo, legit, skip=(legit.a1, legit.a2))
            report = await repo.verify(read_data=True)
            # A pack of another length than its index record: that is its most severe
            # problem; its blobs failing and its footer being of version 1 are details.
            damaged(report, pack_path(real_pack), SIZE_MISMATCH, "failed authentication")
            assert any(
                "another format version" in d
                for x in report.damaged
                if x.name == pack_path(real_pack)
                for d in x.details
            )

    run_asyncio(go())


def test_a_planted_file_not_named_as_a_pack_does_not_stop_the_repository(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        await repo.close()
        plant(repo_path, "packs/zz/not-a-pack", MARKER)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            await assert_intact(repo, legit)
            await assert_next_backup_sound(repo, legit, "a")

    run_asyncio(go())


def test_a_quarantine_record_of_format_version_1_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """DDPQUA01 naming every copy of a's chunks: not honoured (a's chunks are not stored
    again), reported by backups and verify; prune, which deletes, refuses to run."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            record = {
                "version": 1,
                "created": FAR_FUTURE,
                "chunks": [
                    {"id": c.hex(), "pack": p.hex(), "reason": "authentication failed"}
                    for c, _n, p in places
                ],
            }
            plain = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
            data = b"DDPQUA01" + aead(os.urandom(32), plain, b"dedupe-quarantine v1")
            name = f"quarantine/{b3(data)}"
            plant(repo_path, name, data)

            stats = await repo.backup(io.BytesIO(legit.data[legit.a1]), name="a2", kind="full")
            assert stats.chunks_new == 0  # the record's pairs are not honoured
            assert has_problem(repo, f"quarantine record {name}", NOT_AUTH)
            report = await repo.verify(read_data=True)
            damaged(report, name, NOT_AUTHENTICATED, NOT_AUTH)
            assert [d.name for d in report.damaged] == [name]
            with pytest.raises(IntegrityError, match=name):
                await repo.prune()
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_a_config_of_format_version_1_is_refused(run_asyncio: Run[None], repo_path: Path) -> None:
    async def go() -> None:
        repo, _legit = await legit_repo(repo_path)
        await repo.close()
        config = json.loads((repo_path / "config").read_bytes())
        config["version"] = 1
        (repo_path / "config").write_bytes(json.dumps(config).encode())
        with pytest.raises(UnsupportedFormat, match="format version 1 is not supported"):
            await dedupe.Repository.open(repo_path, PASSPHRASE)

    run_asyncio(go())


# --- key holders beyond their role ---------------------------------------------------------------


async def _with_key(repo: dedupe.Repository, root: Path, role: str) -> dedupe.Repository:
    await repo.keys.add(f"{role} pw", role=role, name=role[0], kdf=KdfParams.weakest())
    return await dedupe.Repository.open(root, f"{role} pw")


def test_a_writer_cannot_change_the_config_the_epochs_or_the_keys(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            writer = await _with_key(repo, repo_path, "writer")
            async with writer:
                assert writer.role == "writer"
                with pytest.raises(RoleNotPermitted):
                    await writer.keys.add(
                        "more pw", role="admin", name="x", kdf=KdfParams.weakest()
                    )
                with pytest.raises(RoleNotPermitted):
                    await writer.keys.rotate()
                with pytest.raises(RoleNotPermitted):
                    await writer.keys.remove("default")
                holder = writer._store.holder
                keys_before = sorted(p.name for p in (repo_path / "keys").iterdir())
                keyring_before = {
                    c: (repo_path / c).read_bytes() for c in ("keyring/1", "keyring/2")
                }
                config_before = (repo_path / "config").read_bytes()

                # A keyring the writer signs itself: it makes itself an admin and adds an
                # epoch whose read key it holds.
                mine = PrivateKey.generate()
                record = _with_attacker_epoch(public_keyring(repo_path), mine)
                for k in record["keys"]:
                    if k["id"] == holder.key_id.hex():
                        k["role"] = "admin"
                record.pop("signature")
                signed = sign_record(holder.sign_secret, KEYRING_DOMAIN, record)
                for copy in ("keyring/1", "keyring/2"):
                    (repo_path / copy).write_bytes(json.dumps(signed, indent=1).encode())
                for password in (PASSPHRASE, "writer pw"):
                    with pytest.raises(IntegrityError, match="keyring/1 fails its admin signature"):
                        await dedupe.Repository.open(repo_path, password)
                with pytest.raises(IntegrityError, match="keyring/2 fails its admin signature"):
                    await writer.backup(io.BytesIO(b"w" * 5000), name="w", kind="full")
                assert not any(opens_with(bytes(mine), w) for _e, w in keymap_wraps(repo_path))
                for copy, data in keyring_before.items():
                    (repo_path / copy).write_bytes(data)

                # A config the writer signs itself.
                config = json.loads(config_before)
                config["compression"]["level"] = 22
                config.pop("signature")
                signed = sign_record(holder.sign_secret, CONFIG_DOMAIN, config)
                (repo_path / "config").write_bytes(json.dumps(signed).encode())
                for password in (PASSPHRASE, "writer pw"):
                    with pytest.raises(IntegrityError, match="config fails its admin signature"):
                        await dedupe.Repository.open(repo_path, password)
                (repo_path / "config").write_bytes(config_before)
                assert sorted(p.name for p in (repo_path / "keys").iterdir()) == keys_before
            async with await dedupe.Repository.open(repo_path, PASSPHRASE) as again:
                assert [k.role for k in await again.keys.list()] == ["admin", "writer"]
                await assert_next_backup_sound(again, legit, "a")
                await assert_intact(again, legit)

    run_asyncio(go())


def test_a_writer_cannot_vouch_for_a_quarantine_record(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """A writer holds the epoch's meta secret, so it can make a quarantine record and a
    correct meta_wrap of its key; its signature is valid; only its role refuses it."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            places = await leaked_places(repo, legit.a1)
            async with await _with_key(repo, repo_path, "writer") as writer:
                store = writer._store
                record = {
                    "version": 1,
                    "created": FAR_FUTURE,
                    "chunks": [
                        {"id": c.hex(), "pack": p.hex(), "reason": "authentication failed"}
                        for c, _n, p in places
                    ],
                }
                key = os.urandom(32)
                plain = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
                data = b"DDPQUA02" + aead(key, plain, b"dedupe-quarantine v2")
                name = f"quarantine/{b3(data)}"
                epoch = store.keyring.current_epoch
                km = store.keymaps.encode(
                    epoch,
                    [store.keymaps.meta_entry(QUARANTINE, bytes.fromhex(b3(data)), key)],
                    store.holder,
                )
                keymap_name = f"keymaps/{epoch:08d}/{b3(km)}"
                plant(repo_path, keymap_name, km)
                plant(repo_path, name, data)
                # Its signature is valid: only the writer's role can refuse it.
                signed_part = b"dedupe-keymap v2\x00" + store.repository_id + km[:-64]
                VerifyKey(store.holder.sign_public).verify(signed_part, km[-64:])

            why = "is signed by a writer key, which may not vouch for a quarantine record"
            stats = await repo.backup(io.BytesIO(legit.data[legit.a1]), name="a2", kind="full")
            assert stats.chunks_new == 0  # a's copies are not quarantined
            assert has_problem(repo, keymap_name, why)
            assert has_problem(repo, f"quarantine record {name}", NOT_AUTH)
            report = await repo.verify(read_data=True)
            damaged(report, keymap_name, NOT_AUTHENTICATED, why)
            damaged(report, name, NOT_AUTHENTICATED, NOT_AUTH)
            assert len(report.damaged) == 2
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_a_reader_cannot_add_a_generation(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """A reader holds the epoch's secrets, so it can make a manifest and a key map entry
    with correct wraps, and sign it; only its role refuses it. The forgery names a's
    table "b", dated in the future, with a's digest: accepted, it would be b's latest
    and restore as a's bytes."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            async with await _with_key(repo, repo_path, "reader") as reader:
                store = reader._store
                _h, meta, table = await store.read_manifest(legit.a1)
                header = forged_header(repo_path, "b", len(legit.data[legit.a1]), len(table) // 36)
                header_key, body_key = os.urandom(32), os.urandom(32)
                gen_id, data = manifest(header, table, meta, header_key, body_key)
                entry_ = store.keymaps.generation_entry(bytes.fromhex(gen_id), header_key, body_key)
                epoch = store.keyring.current_epoch
                km = store.keymaps.encode(epoch, [entry_], store.holder)
                keymap_name = f"keymaps/{epoch:08d}/{b3(km)}"
                plant(repo_path, keymap_name, km)
                plant(repo_path, f"generations/{gen_id}", data)

            why = "is signed by a reader key, which may not vouch for a generation"
            await assert_not_listed(repo, gen_id, NOT_AUTH)
            assert has_problem(repo, keymap_name, why)
            await assert_restore_refused(repo, gen_id, tmp_path / "out", NOT_AUTH)
            report = await repo.verify(read_data=True)
            damaged(report, keymap_name, NOT_AUTHENTICATED, why)
            damaged(report, f"generations/{gen_id}", NOT_AUTHENTICATED, NOT_AUTH)
            assert len(report.damaged) == 2
            await assert_next_backup_sound(repo, legit, "b")
            await assert_intact(repo, legit)

    run_asyncio(go())


def test_a_reader_cannot_give_a_generation_another_body(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """A reader can open every body key, so it can seal frames that open: b's real
    header (its authenticated id) with a's table and meta sealed under b's body key. Only
    the header's "body" hash refuses it."""

    async def go() -> None:
        repo, legit = await legit_repo(repo_path)
        async with repo:
            async with await _with_key(repo, repo_path, "reader") as reader:
                store = reader._store
                _h, meta, table = await store.read_manifest(legit.a1)
                found = store.keymaps.all(GENERATION, bytes.fromhex(legit.b1))
                (body_key,) = store.keymaps.read_keys(found, "b")
                path = repo_path / "generations" / legit.b1
                real = path.read_bytes()
                path.write_bytes(real[: prefix_end(real)] + body_frames(body_key, table, meta))

            why = "its body does not belong to its header"
            await assert_restore_refused(repo, legit.b1, tmp_path / "out", why)
            report = await repo.verify(read_data=True)
            damaged(report, f"generations/{legit.b1}", MALFORMED, legit.b1, why)
            assert len(report.damaged) == 1
            await assert_next_backup_sound(repo, legit, "a")
            await assert_intact(repo, legit, skip=(legit.b1,))

    run_asyncio(go())
