"""Pins found by a mutation audit (docs/FORMAT.md sections 4, 8, 9, 10 and 14): each test
below holds one safety check that a deliberately weakened copy of the product code got
past the rest of the suite with (the check deleted, its condition negated, a filter or a
binding dropped). Each test names the property, and its docstring the check it pins.

The attacker is often a legitimate key holder, or an admin signing something odd, so as to
reach the checks that sit behind a signature: they are defence in depth, and only a test
that gets past the signature can tell whether they are still there.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zstandard
from conftest import PASSPHRASE, make_repo

import dedupe.crypto.keyfile as keyfile
import dedupe.store.manifests as store_manifests
from dedupe import Repository
from dedupe.crypto import (
    EpochSecrets,
    HolderSecrets,
    KdfParams,
    create_key_file,
    meta_check,
    new_key,
    open_grant,
    seal,
    seal_grant,
    sign,
    sign_record,
)
from dedupe.crypto.epochs import box_open, box_public_of, new_box_secret
from dedupe.crypto.signing import KEYMAP_DOMAIN, KEYRING_DOMAIN
from dedupe.engine.verify import NOT_AUTHENTICATED
from dedupe.errors import (
    BackendError,
    IntegrityError,
    KeyNotAvailable,
    RollbackDetected,
    TruncatedObject,
)
from dedupe.format.delta import apply_delta
from dedupe.format.index import ENTRY_RECORD, INDEX_AAD, INDEX_MAGIC, PackRecord, encode_index
from dedupe.format.keymap import (
    GENERATION,
    INDEX,
    PACK,
    QUARANTINE,
    KeyMapEntry,
    decode_keymap,
    encode_unsigned,
    keymap_name,
)
from dedupe.format.keyring import (
    KEYRING_NAMES,
)
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.pack import PACK_MAGIC
from dedupe.hashing import object_id

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
WEAK = KdfParams.weakest()
WRITER_PW = "writer passphrase"
OTHER_WRITER_PW = "another writer passphrase"
OTHER_ADMIN_PW = "second admin passphrase"
READER_PW = "reader passphrase"
# Which kinds of key map entry each role may sign (docs/FORMAT.md 4.4), as the spec says.
MAY_SIGN = {
    "admin": {PACK, INDEX, GENERATION, QUARANTINE},
    "writer": {PACK, INDEX, GENERATION},
    "reader": {QUARANTINE},
}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def keyring_record(root: Path) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((root / "keyring/1").read_bytes())
    return record


def resign_keyring(root: Path, admin_sign: bytes, record: dict[str, Any]) -> None:
    """Both keyring copies replaced by `record`, validly signed with the admin key: what
    only an admin can do, to reach the checks behind the signature."""
    unsigned = {k: v for k, v in record.items() if k != "signature"}
    signed = sign_record(admin_sign, KEYRING_DOMAIN, unsigned)
    for name in KEYRING_NAMES:
        (root / name).write_bytes(json.dumps(signed, indent=1).encode())


def keymap_entries(root: Path) -> list[KeyMapEntry]:
    """Every entry of every key map file in the repository, read straight from disk."""
    out: list[KeyMapEntry] = []
    for path in sorted((root / "keymaps").glob("*/*")):
        out += decode_keymap(path.read_bytes(), str(path)).entries
    return out


def key_material(root: Path) -> dict[str, bytes]:
    """Every file of the keyring, the key files and the key maps, by name."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for d in ("keyring", "keys", "keymaps")
        for p in (root / d).rglob("*")
        if p.is_file()
    }


def self_wraps_opened_by(root: Path, box_secret: bytes) -> int:
    """How many self-wraps in the repository's key maps open with this box key."""
    opened = 0
    for e in keymap_entries(root):
        if e.self_wrap is not None:
            try:
                box_open(box_secret, e.self_wrap, "a self-wrap")
                opened += 1
            except IntegrityError:
                pass
    return opened


async def full_backup(repo: Repository, size: int = 120_000, name: str = "db") -> tuple[str, bytes]:
    data = os.urandom(size)
    return (await repo.backup(io.BytesIO(data), name=name, kind="full")).id, data


async def restored(repo: Repository, gen_id: str) -> bytes:
    out = io.BytesIO()
    await repo.restore(gen_id, out)
    return out.getvalue()


def _header_of(header: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in header.items() if k not in ("id", "body", "version")}


async def refused_by_restore_and_verify(repo: Repository, gen_id: str, why: str) -> None:
    """The generation is refused on both read paths, restore (spill_manifest) and verify
    (read_manifest), for the same reason."""
    with pytest.raises(IntegrityError, match=why):
        await repo.restore(gen_id, io.BytesIO())
    report = await repo.verify()
    assert [d.name for d in report.damaged] == [f"generations/{gen_id}"]
    assert why in report.damaged[0].details[0]


# --- crypto bindings (docs/FORMAT.md 4.1, 4.2, 4.3) -------------------------------------------


def test_a_grant_names_its_repository_and_its_key() -> None:
    """open_grant checks every name a grant carries (docs/FORMAT.md 4.3: "the grant names
    this repository, epoch and key"), not only the epoch: a grant sealed to the right box
    key but made for another repository, or for another key holder, is refused."""
    repository = os.urandom(32)
    writer = HolderSecrets.first_admin(repository).new_holder("writer")
    epoch = EpochSecrets.generate(2)
    check = meta_check(epoch.meta)

    def opened(grant: bytes) -> Any:
        return open_grant(
            writer.box_secret, grant, repository, writer.key_id, 2, epoch.read_public, check
        )

    good = seal_grant(writer.box_public, repository, writer.key_id, epoch, False)
    assert opened(good).meta == epoch.meta
    for grant in (
        seal_grant(writer.box_public, os.urandom(32), writer.key_id, epoch, False),
        seal_grant(writer.box_public, repository, os.urandom(16), epoch, False),
    ):
        with pytest.raises(IntegrityError, match="names another repository, epoch or key"):
            opened(grant)


def test_a_meta_wrap_is_bound_to_its_epoch() -> None:
    """The meta wrap's associated data ends with the epoch number (docs/FORMAT.md 4.1):
    a wrap made in one epoch does not open as another epoch's, even under the same meta
    secret."""
    epoch = EpochSecrets.generate(4)
    keys = epoch.keys()
    data_key, oid = os.urandom(32), os.urandom(32)
    wrap = keys.wrap_meta(data_key, INDEX, oid)
    assert keys.unwrap_meta(wrap, INDEX, oid, "x") == data_key
    renumbered = EpochSecrets(5, epoch.read_secret, epoch.meta).keys()
    with pytest.raises(IntegrityError):
        renumbered.unwrap_meta(wrap, INDEX, oid, "x")


@pytest.mark.parametrize(("field", "value"), [("opslimit", 17), ("memlimit", (1 << 30) + 1024)])
def test_the_kdf_bounds_are_exactly_those_of_the_spec(field: str, value: int) -> None:
    """docs/FORMAT.md 4.2: "refuse, before running the KDF, an opslimit outside 1..16 or a
    memlimit outside 8 KiB..1 GiB": the first value past each upper bound is refused
    (creating, and reading a key file), the bound itself is accepted."""
    KdfParams(opslimit=16, memlimit=1 << 30)
    with pytest.raises(ValueError):
        KdfParams(**{"opslimit": 3, "memlimit": 64 << 20, field: value})
    holder = HolderSecrets.first_admin(os.urandom(32))
    record = json.loads(create_key_file(holder, b"pw", "d", WEAK))
    record["kdf"][field] = value
    with pytest.raises(IntegrityError, match="KDF cost"):
        keyfile.open_key_file(json.dumps(record).encode(), holder.repository_id, b"pw")


# --- key maps (docs/FORMAT.md 4.4, 4.5, 4.6) --------------------------------------------------


def test_a_key_map_of_an_epoch_the_keyring_lacks_is_refused_and_reported(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """KeyDirectory.accept: "its epoch ... is an active epoch of the verified keyring".
    An admin-signed key map filed under an epoch the keyring has never had is refused,
    and verify (which reads every epoch's directory) names it."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
            store = repo._store
            entry = store.keymaps.meta_entry(INDEX, os.urandom(32), new_key())
            unsigned = encode_unsigned(99, store.holder.key_id, [entry])
            blob = unsigned + sign(
                store.holder.sign_secret, KEYMAP_DOMAIN, store.repository_id + unsigned
            )
            name = keymap_name(99, object_id(blob))
            with pytest.raises(IntegrityError, match="which the keyring lacks"):
                store.keymaps.accept(name, blob)
            (repo_path / name).parent.mkdir(parents=True)
            (repo_path / name).write_bytes(blob)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.verify()
            assert [(d.name, d.reason) for d in report.damaged] == [(name, NOT_AUTHENTICATED)]
            assert "which the keyring lacks" in report.damaged[0].details[0]
            assert await restored(repo, gen_id) == data

    run_asyncio(go())


def test_each_role_vouches_only_for_the_kinds_it_may_write(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """ALLOWED_KINDS and the role check in KeyDirectory.accept, as a whole table: a key
    map signed (validly) by each role, with one entry of each kind made by that role's
    own key directory, is accepted exactly for the kinds docs/FORMAT.md 4.4 lets the role
    write: writer 1-3, reader 4, admin all."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
            judge = admin._store.keymaps
            outcomes: dict[tuple[str, int], bool] = {}
            for role, pw in (("admin", PASSPHRASE), ("writer", WRITER_PW), ("reader", READER_PW)):
                async with await Repository.open(repo_path, pw) as repo:
                    store = repo._store
                    assert store.role == role
                    kd, holder = store.keymaps, store.holder
                    epoch = store.current_epoch.number
                    made = {
                        PACK: kd.pack_entry(os.urandom(32), new_key()),
                        INDEX: kd.meta_entry(INDEX, os.urandom(32), new_key()),
                        GENERATION: kd.generation_entry(os.urandom(32), new_key(), new_key()),
                        QUARANTINE: kd.meta_entry(QUARANTINE, os.urandom(32), new_key()),
                    }
                    for kind, entry in made.items():
                        unsigned = encode_unsigned(epoch, holder.key_id, [entry])
                        blob = unsigned + sign(
                            holder.sign_secret, KEYMAP_DOMAIN, store.repository_id + unsigned
                        )
                        try:
                            judge.accept(keymap_name(epoch, object_id(blob)), blob)
                            outcomes[role, kind] = True
                        except IntegrityError as e:
                            assert f"signed by a {role} key, which may not vouch" in e.message
                            outcomes[role, kind] = False
            assert outcomes == {
                (role, kind): kind in kinds
                for role, kinds in MAY_SIGN.items()
                for kind in (PACK, INDEX, GENERATION, QUARANTINE)
            }

    run_asyncio(go())


def test_a_key_map_too_short_for_its_head_is_refused_not_fatal(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """decode_keymap refuses, as truncated, a key map shorter than its head and signature
    (docs/FORMAT.md 4.5, "the length matches count"): a few bytes planted, correctly
    named, under the current epoch's key maps are reported by open and verify; they do
    not stop the repository from opening."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
        blob = b"DDPKMAP2\x01"
        name = keymap_name(1, object_id(blob))
        (repo_path / name).write_bytes(blob)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert any(name in p and "too short" in p for p in repo.problems), repo.problems
            assert await restored(repo, gen_id) == data
            report = await repo.verify()
            assert [(d.name, d.reason) for d in report.damaged] == [(name, NOT_AUTHENTICATED)]

    run_asyncio(go())


def test_a_writer_is_told_another_key_wrote_a_body_it_cannot_open(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """KeyDirectory.read_key: a writer opens a body only through its *own* self-wrap; for a
    generation another writer made it is told so (KeyNotAvailable), neither trying the
    other writer's self-wrap with its own box key (which would call a sound generation
    damaged) nor falling through to the epoch's read key it does not hold."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=WEAK)
            await admin.keys.add(OTHER_WRITER_PW, role="writer", name="w2", kdf=WEAK)
        async with await Repository.open(repo_path, OTHER_WRITER_PW) as w2:
            theirs, _ = await full_backup(w2)
        async with await Repository.open(repo_path, WRITER_PW) as w1:
            mine, _ = await full_backup(w1)
            store = w1._store
            await store.read_manifest(mine)  # its own: through its self-wrap
            assert store.can_open_body(mine) and not store.can_open_body(theirs)
            with pytest.raises(KeyNotAvailable, match="another key wrote it"):
                await store.read_manifest(theirs)

    run_asyncio(go())


def test_a_writer_keeps_reading_its_own_generations_after_prune_and_rotation(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """Consolidation keeps the self-wraps of the key holders still in the keyring
    (docs/FORMAT.md 4.6 drops only those "of key holders no longer in the keyring";
    KeyDirectory.consolidate's default `keep_self`): after an admin's prune and rotation a
    writer still opens the body of a generation it wrote, so its next incremental is
    based on it instead of being made as a full."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            async with await Repository.open(repo_path, WRITER_PW) as writer:
                gen_id, data = await full_backup(writer)
            await admin.prune()
            await admin.keys.rotate()
        async with await Repository.open(repo_path, WRITER_PW) as writer:
            assert writer._store.can_open_body(gen_id)
            more = data + os.urandom(20_000)
            stats = await writer.backup(io.BytesIO(more), name="db", kind="incremental")
            assert (stats.kind, stats.parent, stats.note) == ("incremental", gen_id, None)

    run_asyncio(go())


# --- the keyring (docs/FORMAT.md 4.2, 4.3) ----------------------------------------------------


def _as_reader(record: dict[str, Any], writer: HolderSecrets) -> None:
    for k in record["keys"]:
        if k["id"] == writer.key_id.hex():
            k["role"] = "reader"


def _other_box_key(record: dict[str, Any], writer: HolderSecrets) -> None:
    for k in record["keys"]:
        if k["id"] == writer.key_id.hex():
            k["box_public"] = b64(box_public_of(new_box_secret()))


KEYRING_EDITS = {
    # edit -> (who opens, what the refusal says)
    "the writer listed as a reader": ("writer", "differently from its key file"),
    "the writer listed with another box key": ("writer", "differently from its key file"),
    "a read secret granted to the writer": ("writer", "grants a read secret to a writer key"),
    "no grant of the current epoch that opens": ("writer", "cannot open the current key epoch"),
    "another repository": ("admin", "belongs to another repository"),
}


@pytest.mark.parametrize("edit", sorted(KEYRING_EDITS))
def test_a_keyring_an_admin_signed_wrongly_for_a_key_is_refused(
    run_asyncio: Run[None], repo_path: Path, edit: str
) -> None:
    """decode_keyring and open_epochs, behind the admin signature: a keyring that names
    another repository, lists a key with another role or box key than its key file, grants
    a writer an epoch's read secret, or gives a key no grant of the current epoch that it
    can open, is not used by that key (docs/FORMAT.md 4.2: "MUST NOT use the key file
    unless the verified keyring lists its key id with the same role"; 4.3)."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            admin_sign = admin._store.holder.admin_sign
            assert admin_sign is not None
            epoch_secrets = admin._store.current_epoch.secrets()
            repository = admin._store.repository_id
        async with await Repository.open(repo_path, WRITER_PW) as w:
            writer = w._store.holder
        record = keyring_record(repo_path)
        current = next(e for e in record["epochs"] if e["number"] == record["current_epoch"])
        if edit == "the writer listed as a reader":
            _as_reader(record, writer)
        elif edit == "the writer listed with another box key":
            _other_box_key(record, writer)
        elif edit == "a read secret granted to the writer":
            grant = seal_grant(writer.box_public, repository, writer.key_id, epoch_secrets, True)
            current["grants"][writer.key_id.hex()] = b64(grant)
        elif edit == "no grant of the current epoch that opens":
            stranger = box_public_of(new_box_secret())
            grant = seal_grant(stranger, repository, writer.key_id, epoch_secrets, False)
            current["grants"][writer.key_id.hex()] = b64(grant)
        else:
            record["repository"] = os.urandom(32).hex()
        resign_keyring(repo_path, admin_sign, record)
        who, why = KEYRING_EDITS[edit]
        with pytest.raises(IntegrityError, match=why):
            await Repository.open(repo_path, WRITER_PW if who == "writer" else PASSPHRASE)

    run_asyncio(go())


def test_a_keyring_rolled_back_by_a_single_change_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """check_and_record_serial: a keyring copy one serial behind the newest this client
    saw (both copies as they were before one `key add`) is a rollback too."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            before = {n: (repo_path / n).read_bytes() for n in KEYRING_NAMES}
            await repo.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
            assert (
                keyring_record(repo_path)["serial"] == json.loads(before["keyring/1"])["serial"] + 1
            )
        for name, raw in before.items():
            (repo_path / name).write_bytes(raw)
        with pytest.raises(RollbackDetected):
            await Repository.open(repo_path, PASSPHRASE)

    run_asyncio(go())


def test_the_copy_of_the_highest_serial_is_used_even_when_it_is_the_second(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """read_keyring takes the copy of the highest serial, not the first that verifies:
    an old keyring/1 put back beside a current keyring/2 is reported as behind and not
    used."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            old = (repo_path / "keyring/1").read_bytes()
            await repo.keys.rotate()
            newest = json.loads((repo_path / "keyring/2").read_bytes())["serial"]
        (repo_path / "keyring/1").write_bytes(old)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert repo._store.keyring.serial == newest
            assert any("keyring/1 is at serial 1" in p for p in repo.problems), repo.problems

    run_asyncio(go())


def test_verify_reports_a_missing_keyring_copy_and_prune_puts_it_back(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """check_keyring: docs/FORMAT.md 4.3, a reader "MUST report (not ignore, not fail on)
    a copy that is damaged or behind": a missing copy is damage verify names, open goes
    on with the other, and prune writes it back."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
        (repo_path / "keyring/2").unlink()
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert any("keyring/2 is missing" in p for p in repo.problems), repo.problems
            report = await repo.verify()
            assert [(d.kind, d.name, d.reason) for d in report.damaged] == [
                ("keyring", "keyring/2", "missing")
            ]
            await repo.prune()
            assert (await repo.verify()).ok
            assert await restored(repo, gen_id) == data

    run_asyncio(go())


def test_a_key_file_only_a_forged_keyring_copy_lists_is_tried_after_the_real_one(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RepositoryStore._open_key_file tries first the key files whose id *both* keyring
    copies list (docs/FORMAT.md 4.2: a planted key file costs no key derivation): one
    forged copy listing a planted key file (named to sort first) does not make open run
    the planted file's KDF before the real key file's."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            planted = HolderSecrets(
                repository_id=store.repository_id,
                key_id=bytes(16),
                role="reader",
                id_key=new_key(),
                chunker_key=new_key(),
                box_secret=new_box_secret(),
                sign_secret=new_key(),
                admin_verify_key=store.holder.admin_verify_key,
            )
        forged = json.loads((repo_path / "keyring/2").read_bytes())
        forged["keys"].append(dict(forged["keys"][0], id=bytes(16).hex(), role="reader"))
        (repo_path / "keyring/2").write_bytes(json.dumps(forged).encode())
        data = create_key_file(planted, b"the attacker's passphrase", "planted", WEAK)
        (repo_path / f"keys/{bytes(16).hex()}-00000000").write_bytes(data)
        runs = 0
        real_kek = keyfile._kek

        def counting(*args: Any) -> bytes:
            nonlocal runs
            runs += 1
            return real_kek(*args)

        monkeypatch.setattr(keyfile, "_kek", counting)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert any("keyring/2 fails its admin signature" in p for p in repo.problems)
        assert runs == 1

    run_asyncio(go())


# --- manifests and deltas (docs/FORMAT.md 8, 8.1) ---------------------------------------------


def test_a_manifest_too_short_to_hold_its_prefix_does_not_stop_the_listing(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """header_span refuses, as a truncated object, a manifest shorter than its magic and
    header length: a few bytes planted under generations/ are reported, never an
    exception that stops `generations()` (and every backup's choice of parent) for
    everyone."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
            planted = os.urandom(32).hex()
            (repo_path / "generations" / planted).write_bytes(b"DDPG\x00")
            assert [g.id for g in await repo.generations()] == [gen_id]
            assert any(planted in p and "truncated" in p for p in repo.problems), repo.problems
            with pytest.raises(TruncatedObject):
                await repo.restore(planted, io.BytesIO())
            report = await repo.verify()
            assert [d.name for d in report.damaged] == [f"generations/{planted}"]
            assert await restored(repo, gen_id) == data

    run_asyncio(go())


HEADER_EDITS: dict[str, tuple[dict[str, Any], str]] = {
    "an unknown kind": ({"kind": "snapshot"}, "unknown kind"),
    "a negative size": ({"size": -1}, "size is not a count"),
    "a negative chunk count": ({"chunks": -1}, "chunks is not a count"),
    "a parent that is no id": ({"parent": 5}, "parent is neither null nor an id"),
    "another header version": ({}, "header version 4"),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_a_header_a_real_key_sealed_wrongly_is_refused(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    """decode_header checks the fields every reader relies on, behind the header's
    authentication (docs/FORMAT.md 8, 12): a generation whose header has another version
    than 3, another kind than full, incremental or differential, a parent that is not an
    id, or a negative count, is not listed and not restored."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full, _data = await full_backup(repo)
            store = repo._store
            header, meta, table = await store.read_manifest(full)
            change, why = HEADER_EDITS[edit]
            with monkeypatch.context() as m:
                if edit == "another header version":
                    m.setattr(store_manifests, "HEADER_VERSION", 4)  # what the writer stamps
                bad = await store.write_manifest(_header_of(header) | change, meta, table)
            assert [g.id for g in await repo.generations()] == [full]
            assert any(bad in p and why in p for p in repo.problems), repo.problems
            with pytest.raises(IntegrityError, match=why):
                await repo.restore(bad, io.BytesIO())

    run_asyncio(go())


def test_a_table_that_disagrees_with_its_chunk_count_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """docs/FORMAT.md 8: "chunk_count MUST equal the number of records in the table
    frames", checked on both read paths: restore (spill_manifest) and verify
    (read_manifest). The generation is made by a real key (the check is behind its
    authentication)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full, _data = await full_backup(repo)
            store = repo._store
            header, meta, table = await store.read_manifest(full)
            with store.manifest_writer() as writer:
                writer.add(table)
                writer.records += 1  # the meta claims one record more than the table has
                bad = await store.commit_manifest(
                    writer,
                    _header_of(header) | {"created": "2099-01-01T00:00:00.000000Z"},
                    dict(meta, chunk_count=writer.records),
                )
            await refused_by_restore_and_verify(repo, bad, "does not match its count")

    run_asyncio(go())


def test_a_table_frame_that_splits_a_record_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """docs/FORMAT.md 8: a table frame "holds a whole number of records" (_open_frame).
    A real key's manifest whose table, whole and counted right, is cut into a first frame
    of one record and ten bytes and a second of the rest is refused on the restore path
    and by verify (which, concatenating the frames, would otherwise see a sound table)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full, _data = await full_backup(repo)
            store = repo._store
            header, meta, table = await store.read_manifest(full)
            with store.manifest_writer() as writer:
                writer._seal_frame(table[: CHUNK_RECORD.size + 10])
                writer._seal_frame(table[CHUNK_RECORD.size + 10 :])
                writer.records = len(table) // CHUNK_RECORD.size
                bad = await store.commit_manifest(writer, _header_of(header), meta)
            await refused_by_restore_and_verify(repo, bad, "does not hold whole chunk records")

    run_asyncio(go())


def test_a_body_that_names_another_parent_than_its_header_is_refused(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """docs/FORMAT.md 8: "A delta's parent MUST equal the header's parent" (_check_meta
    in read_manifest and in spill_manifest). Here the two parents hold the same bytes, so
    nothing else (ops, digest) would notice that the body follows another chain than the
    one the header, and so `generations`, forget and prune, see."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = os.urandom(120_000)
            a = await repo.backup(io.BytesIO(data), name="db", kind="full")
            b = await repo.backup(io.BytesIO(data), name="db2", kind="full")
            store = repo._store
            header, meta, _table = await store.read_manifest(a.id)
            header = _header_of(header) | {"kind": "incremental", "parent": a.id}
            meta = dict(meta, chunk_count=0, delta={"parent": b.id, "ops": [[0, 0, a.chunks]]})
            bad = await store.write_manifest(header, meta, b"")
            await refused_by_restore_and_verify(repo, bad, "name different parents")

    run_asyncio(go())


@pytest.mark.parametrize("op", [[0, -1, 1], [0, 1, -1]], ids=["negative start", "negative count"])
def test_a_delta_copy_with_a_negative_start_or_count_is_refused(op: list[int]) -> None:
    """delta_ranges: "every copy MUST lie inside the parent's complete table"
    (docs/FORMAT.md 8.1). A negative start would slice the parent from its end, a negative
    count take records away from the total the header is checked against (a count below
    1 is malformed: 8.1)."""
    record = CHUNK_RECORD.pack(os.urandom(32), 100)
    parent = record * 3
    with pytest.raises(IntegrityError, match="copies past its parent's table|a copy of -1 rec"):
        apply_delta(parent, record, [op, [1, 1]], "g", 1 + op[2])


# --- restore (docs/FORMAT.md 9.6) -------------------------------------------------------------


def test_a_restore_whose_stream_digest_differs_fails_and_writes_nothing(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """docs/FORMAT.md 9.6: "Restore MUST compare the whole-stream digest with the
    manifest's before it reports success" (restore_chunks, _check_digest). Every chunk
    checks out on its own here (the table is a real one); only the recorded digest is
    wrong, so only that comparison can refuse it. No file is left at the target."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full, _data = await full_backup(repo)
            store = repo._store
            header, meta, table = await store.read_manifest(full)
            bad = await store.write_manifest(
                _header_of(header), dict(meta, digest="00" * 32), table
            )
            target = tmp_path / "out"
            target.mkdir()
            with pytest.raises(IntegrityError, match="does not match the digest"):
                await repo.restore(bad, target / "restored")
            assert list(target.iterdir()) == []

    run_asyncio(go())


# --- key commands (docs/FORMAT.md 4.2, 10.3) --------------------------------------------------


def test_a_key_cannot_remove_itself(run_asyncio: Run[None], repo_path: Path) -> None:
    """remove_key: "The last admin cannot be removed, nor the key doing the removing",
    even when another admin is left; nothing changes (keyring, key files, key maps)."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            gen_id, data = await full_backup(admin)
            await admin.keys.add(OTHER_ADMIN_PW, role="admin", name="second", kdf=WEAK)
            before = key_material(repo_path)
            with pytest.raises(ValueError, match="cannot remove itself"):
                await admin.keys.remove("default")
            after = key_material(repo_path)
            assert after == before
        async with await Repository.open(repo_path, PASSPHRASE) as admin:
            assert await restored(admin, gen_id) == data

    run_asyncio(go())


def test_a_key_added_after_a_rotation_is_granted_the_active_epochs_only(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """add_key grants the new holder every *active* epoch (docs/FORMAT.md 10.3); a
    retired epoch holds no grants ("its secrets are gone from the repository"), and its
    secrets are not the admin's to grant any more. After a rotation `key add` works, the
    retired epoch still grants nobody, and the new reader restores."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            gen_id, data = await full_backup(admin)
            await admin.keys.rotate()
            await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
        epochs = {e["number"]: e for e in keyring_record(repo_path)["epochs"]}
        assert epochs[1]["state"] == "retired" and epochs[1]["grants"] == {}
        assert len(epochs[2]["grants"]) == 2
        async with await Repository.open(repo_path, READER_PW) as reader:
            assert await restored(reader, gen_id) == data

    run_asyncio(go())


def test_what_a_removed_writer_wrote_stays_authenticated(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """remove_key consolidates the key maps before the keyring drops the key (docs/FORMAT.md
    10.3): the key maps the writer signed would be refused once it is gone, so without
    that its generations, index objects and packs would stop being authenticated. A
    fresh handle, opened after the removal and before any rotation, lists, restores and
    verifies what the writer stored."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            async with await Repository.open(repo_path, WRITER_PW) as writer:
                gen_id, data = await full_backup(writer)
            await admin.keys.remove("w")
        async with await Repository.open(repo_path, PASSPHRASE) as admin:
            assert [g.id for g in await admin.generations()] == [gen_id], admin.problems
            assert await restored(admin, gen_id) == data
            assert (await admin.verify(read_data=True)).ok

    run_asyncio(go())


def test_removing_a_writer_drops_its_self_wraps(run_asyncio: Run[None], repo_path: Path) -> None:
    """docs/FORMAT.md 10.3: `key remove` consolidates so that "its self-wraps are dropped"
    (KeyDirectory.rewrap honouring keep_self, and remove_key passing the remaining keys),
    and rotation keeps them dropped: the removed writer's box key opens no self-wrap left
    in any key map, so no body key in the repository."""

    async def go() -> None:
        async with await make_repo(repo_path) as admin:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            async with await Repository.open(repo_path, WRITER_PW) as writer:
                gen_id, data = await full_backup(writer)
                box_secret = writer._store.holder.box_secret
            assert self_wraps_opened_by(repo_path, box_secret) == 1
            await admin.keys.remove("w")
            assert self_wraps_opened_by(repo_path, box_secret) == 0
            await admin.keys.rotate()
            assert self_wraps_opened_by(repo_path, box_secret) == 0
            assert await restored(admin, gen_id) == data

    run_asyncio(go())


@pytest.mark.parametrize("command", ["add", "passwd"])
def test_a_key_file_that_does_not_read_back_is_never_relied_on(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """_write_key_file opens the key file *as read back from the backend* (docs/FORMAT.md
    4.2, 10.3), not the bytes it meant to write: when storage keeps a damaged copy, `key
    add` fails before the keyring lists the key, and `key passwd` fails before the old key
    file goes (else no passphrase would open the key any more). Nothing is left behind."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
            keyring = {n: (repo_path / n).read_bytes() for n in KEYRING_NAMES}
            keys = sorted(p.name for p in (repo_path / "keys").iterdir())
            backend = repo._store.backend
            real_put = backend.put

            async def put(name: str, payload: Any) -> None:
                if name.startswith("keys/"):
                    payload = bytes(payload)[:-40] + b"\n"  # the storage lost a piece
                await real_put(name, payload)

            with monkeypatch.context() as m:
                m.setattr(backend, "put", put)
                with pytest.raises(IntegrityError):
                    if command == "add":
                        await repo.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
                    else:
                        await repo.keys.passwd(READER_PW, kdf=WEAK)
            assert {n: (repo_path / n).read_bytes() for n in KEYRING_NAMES} == keyring
            assert sorted(p.name for p in (repo_path / "keys").iterdir()) == keys
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert await restored(repo, gen_id) == data

    run_asyncio(go())


# --- prune (docs/FORMAT.md 14.3) --------------------------------------------------------------


def test_prune_deletes_nothing_while_an_authenticated_generation_fails_to_expand(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """_prune stops ("a chunk it references might be deleted: prune nothing") when a
    generation some key map vouches for cannot be expanded: here an incremental whose
    full's manifest is damaged. Prune must not take the incremental's chunks for garbage;
    once the full's manifest is put back, both restore."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            a = os.urandom(150_000)
            b = a + os.urandom(150_000)
            full = await repo.backup(io.BytesIO(a), name="db", kind="full")
            inc = await repo.backup(io.BytesIO(b), name="db", kind="incremental")
            assert inc.parent == full.id
            manifest = repo_path / "generations" / full.id
            good = manifest.read_bytes()
            damaged = bytearray(good)
            damaged[-5] ^= 1  # in the body: the header, and so the listing, are intact
            manifest.write_bytes(bytes(damaged))
            packs = sorted(p.name for p in (repo_path / "packs").glob("*/*"))
            with pytest.raises(IntegrityError):
                await repo.prune()
            assert sorted(p.name for p in (repo_path / "packs").glob("*/*")) == packs
            manifest.write_bytes(good)
            assert await restored(repo, full.id) == a
            assert await restored(repo, inc.id) == b

    run_asyncio(go())


def test_prune_never_reads_an_unauthenticated_index_object_as_a_list_of_copies(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """_prune loads only the index objects some key map vouches for (docs/FORMAT.md 14.3,
    step 4): a planted index object, named by its hash and well formed, listing a planted
    pack, is not opened; once the operator says such objects were planted
    (`delete_unauthenticated`), both go and the real data restores and verifies."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
        pack = PACK_MAGIC + os.urandom(2000)
        pack_id = bytes.fromhex(object_id(pack))
        pack_path = repo_path / "packs" / pack_id.hex()[:2] / pack_id.hex()
        pack_path.parent.mkdir(exist_ok=True)
        pack_path.write_bytes(pack)
        plain = encode_index(
            [PackRecord(pack_id, len(pack))], ENTRY_RECORD.pack(os.urandom(32), 0, 8, 100, 100)
        )
        key = new_key()
        index = INDEX_MAGIC + seal(key, zstandard.ZstdCompressor().compress(plain), INDEX_AAD)
        index_path = repo_path / "index" / object_id(index)
        index_path.write_bytes(index)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await repo.prune(delete_unauthenticated=True)
            assert not index_path.exists() and not pack_path.exists()
            assert await restored(repo, gen_id) == data
            assert (await repo.verify(read_data=True)).ok

    run_asyncio(go())


def test_prune_removes_a_key_map_of_a_retired_epoch_put_back(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """Consolidation deletes every key map under keymaps/, of every epoch (docs/FORMAT.md
    4.6, 14.3 step 7: "key maps that were not accepted ... go"), not only those of the
    active epochs: a key map of a retired epoch put back is reported by verify, and the
    next prune removes it."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
            saved = {p: p.read_bytes() for p in (repo_path / "keymaps").glob("*/*")}
            await repo.keys.rotate()
            old, raw = next(iter(saved.items()))
            assert not old.exists()
            old.parent.mkdir(exist_ok=True)
            old.write_bytes(raw)
            name = old.relative_to(repo_path).as_posix()
            report = await repo.verify()
            assert [(d.name, d.reason) for d in report.damaged] == [(name, NOT_AUTHENTICATED)]
            await repo.prune()
            assert not old.exists()
            assert (await repo.verify()).ok
            assert await restored(repo, gen_id) == data

    run_asyncio(go())


# --- ordering (docs/FORMAT.md 4.5, 9.1) -------------------------------------------------------


def _objects(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for d in ("generations", "index", "quarantine")
        if (root / d).exists()
        for p in (root / d).iterdir()
    }


@pytest.mark.parametrize("operation", ["backup", "prune", "verify"])
def test_no_object_is_stored_before_the_key_map_that_vouches_for_it(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """docs/FORMAT.md 9.1 ("the key map before the index object it authenticates ... the
    manifest's key map entry before the manifest") and 4.5 (verify writes its key map
    "before the quarantine record it writes"): when storing the key map fails, the
    manifest and index object of a backup (commit_manifest), the new index object of a
    prune (write_index) and verify's quarantine record (write_quarantine) are not stored
    either, so nothing unauthenticated is left behind."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, data = await full_backup(repo)
            if operation == "prune":
                gone, _ = await full_backup(repo, name="old")
                await repo.forget(ids=[gone])
            if operation == "verify":
                pack = max((repo_path / "packs").glob("*/*"), key=lambda p: p.stat().st_size)
                raw = bytearray(pack.read_bytes())
                raw[len(raw) // 2] ^= 1
                pack.write_bytes(bytes(raw))
            before = _objects(repo_path)
            backend = repo._store.backend
            real_put = backend.put

            async def put(name: str, *args: Any) -> Any:
                if name.startswith("keymaps/"):
                    raise BackendError(f"injected: cannot write {name}")
                return await real_put(name, *args)

            monkeypatch.setattr(backend, "put", put)
            with pytest.raises(BackendError, match="injected"):
                if operation == "backup":
                    await repo.backup(io.BytesIO(os.urandom(50_000)), name="new", kind="full")
                elif operation == "prune":
                    await repo.prune()
                else:
                    await repo.verify(read_data=True)
            assert _objects(repo_path) == before
            monkeypatch.undo()
            if operation != "verify":
                assert await restored(repo, gen_id) == data

    run_asyncio(go())
