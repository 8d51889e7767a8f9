"""Key holders, roles and epochs against the secrets they hold (docs/FORMAT.md 4, 10, 11).

The centre of this file is `sealed_items`, which lists every sealed item of a repository:
each blob of each pack (located through the index objects, and checked to cover each pack
byte for byte), each pack trailer (located by the clear footer), each manifest header and
body frame, each index object and quarantine record, each wrap of each key map entry
(read_wrap, meta_wrap, self_wrap), each grant of both keyring copies, and each key file.
`reachable` then takes a set of 32-byte secrets and tries each of them on every item, as
an XChaCha20-Poly1305 key (also as the meta-wrap key derived from it) with the item's
associated data, and as an X25519 secret on sealed boxes; whatever opens and holds keys
(wraps, grants, key files) adds those keys, until nothing more opens. So "opens nothing"
means: not directly, and not through any chain of keys found on the way.

A positive control accompanies every negative claim: starting from nothing but the
known passphrases, `reachable` opens every item there is, so an item the enumeration
got wrong (a bad offset, a wrong associated data) would show up as unopenable.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import os
import random
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

import dedupe
from dedupe import Repository
from dedupe.backends.local import _backend_error
from dedupe.crypto import KdfParams, open_key_file, open_sealed
from dedupe.crypto.epochs import _meta_aad, meta_wrap_key
from dedupe.crypto.keyfile import _aad as key_file_aad
from dedupe.crypto.keyfile import _kek, _parse
from dedupe.engine import keys as key_ops
from dedupe.errors import (
    BackendError,
    IntegrityError,
    KeyRevoked,
    RoleNotPermitted,
    WrongPassphrase,
)
from dedupe.format.index import ENTRY_RECORD, INDEX_AAD
from dedupe.format.keymap import GENERATION, KIND_NAMES, QUARANTINE, decode_keymap
from dedupe.format.keyring import KEYRING_NAMES
from dedupe.format.manifest import CHUNK_RECORD, HEADER_AAD, frame_aad, header_span, split_frames
from dedupe.format.pack import FOOTER_SIZE, PACK_MAGIC, TRAILER_AAD, decode_footer
from dedupe.store.keymaps import KeyDirectory
from dedupe.store.quarantine import QUARANTINE_AAD
from dedupe.store.repository import pack_name

WEAK = KdfParams.weakest()
Run = Callable[[Coroutine[Any, Any, None]], None]
WRITER_PW = "writer passphrase"
READER_PW = "reader passphrase"
NEW_PW = "a new passphrase"

# --- data -------------------------------------------------------------------------------------


def evolving(seed: int, count: int, size: int = 300_000) -> list[bytes]:
    """`count` versions of a snapshot; each rewrites a few regions of the previous one."""
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(size))
    out = []
    for _ in range(count):
        for _ in range(2):
            at = rnd.randrange(0, size - 20_000)
            data[at : at + 20_000] = rnd.randbytes(20_000)
        out.append(bytes(data))
    return out


async def check_restores(repo: Repository, expected: dict[str, bytes]) -> None:
    """Every generation of the repository is one of `expected` and restores byte for byte."""
    assert sorted(g.id for g in await repo.generations()) == sorted(expected)
    for gen_id, data in expected.items():
        out = io.BytesIO()
        await repo.restore(gen_id, out)
        assert out.getvalue() == data, gen_id


def file_hashes(root: Path, under: str = "", skip: tuple[str, ...] = ("locks",)) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below root/under (but `skip`)."""
    base = root / under
    out = {}
    for dirpath, _dirs, files in os.walk(base):
        for f in files:
            path = Path(dirpath) / f
            rel = path.relative_to(root).as_posix()
            if rel.split("/", 1)[0] in skip:
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# --- every sealed item of a repository ----------------------------------------------------------


@dataclass(frozen=True)
class Sealed:
    """One sealed item. `group`: blob, trailer, header, frame, index, quarantine,
    read_wrap, meta_wrap, self_wrap, grant or key file. `gen`: the generation it belongs
    to (headers, frames, wraps of generation entries); `key`: the key holder it is for
    (grants, self-wraps, key files)."""

    group: str
    where: str
    data: bytes
    box: bool = False  # a sealed box (X25519), else XChaCha20-Poly1305 under one of `aads`
    aads: tuple[bytes, ...] = ()
    gen: str = ""
    key: str = ""

    def __str__(self) -> str:
        return f"{self.group}: {self.where}"


async def sealed_items(path: Path, passphrase: str = PASSPHRASE) -> list[Sealed]:
    """Every sealed item in the repository at `path`. An admin handle is used only to
    decode the index objects, which locate the blobs; everything else is parsed from the
    bytes in the backend."""
    items: list[Sealed] = []
    async with await Repository.open(path, passphrase) as admin:
        store = admin._store
        assert store.role == "admin"
        backend = store.backend
        epochs = [e.number for e in store.keyring.epochs]

        # The keyring's grants (both copies: they are the same after a completed change).
        for name in KEYRING_NAMES:
            record = json.loads(await backend.get(name))
            for e in record["epochs"]:
                for key_id, grant in e["grants"].items():
                    items.append(
                        Sealed(
                            "grant",
                            f"{name} epoch {e['number']} to {key_id}",
                            base64.b64decode(grant),
                            box=True,
                            key=key_id,
                        )
                    )

        # Key files.
        for name in await backend.list("keys/"):
            data = await backend.get(name)
            _record, info, _salt, sealed = _parse(data)
            items.append(
                Sealed(
                    "key file",
                    name,
                    sealed,
                    aads=(key_file_aad(store.repository_id, info.key_id, info.role),),
                    key=info.key_id.hex(),
                )
            )

        # Key maps: every wrap of every entry; a meta_wrap is tried with the associated
        # data of every epoch the keyring ever had, not only that of its key map.
        for name in await backend.list("keymaps/"):
            km = decode_keymap(await backend.get(name), name)
            for e in km.entries:
                what = f"{KIND_NAMES[e.kind]} {e.object_id.hex()[:16]} in {name}"
                gen = e.object_id.hex() if e.kind == GENERATION else ""
                if e.read_wrap is not None:
                    items.append(Sealed("read_wrap", what, e.read_wrap, box=True, gen=gen))
                if e.meta_wrap is not None:
                    aads = tuple(_meta_aad(e.kind, e.object_id, n) for n in epochs)
                    items.append(Sealed("meta_wrap", what, e.meta_wrap, aads=aads, gen=gen))
                if e.self_wrap is not None:
                    assert e.self_key is not None
                    items.append(
                        Sealed(
                            "self_wrap", what, e.self_wrap, box=True, gen=gen, key=e.self_key.hex()
                        )
                    )

        # Index objects, and through them the blobs of every pack.
        blobs: dict[str, dict[int, tuple[bytes, int]]] = {}  # pack -> offset -> (id, length)
        for name in await backend.list("index/"):
            data = await backend.get(name)
            items.append(Sealed("index", name, data[8:], aads=(INDEX_AAD,)))
            packs, entries = await store.open_index_object(name, data)
            for chunk_id, pack_no, offset, stored, _raw in ENTRY_RECORD.iter_unpack(entries):
                blobs.setdefault(pack_name(packs[pack_no].pack_id), {})[offset] = (chunk_id, stored)
        pack_names = await backend.list("packs/")
        assert sorted(blobs) == sorted(pack_names), "a pack no index object lists"
        for name in pack_names:
            data = await backend.get(name)
            end = len(data) - FOOTER_SIZE
            trailer_start = end - decode_footer(len(data), data[end:], name)
            items.append(Sealed("trailer", name, data[trailer_start:end], aads=(TRAILER_AAD,)))
            # The blobs the index names tile the pack between its magic and its trailer.
            pos = len(PACK_MAGIC)
            for offset, (chunk_id, stored) in sorted(blobs[name].items()):
                assert offset == pos, f"{name}: bytes {pos}..{offset} are no indexed blob"
                items.append(
                    Sealed(
                        "blob",
                        f"chunk {chunk_id.hex()[:16]} in {name}",
                        data[offset : offset + stored],
                        aads=(chunk_id,),
                    )
                )
                pos = offset + stored
            assert pos == trailer_start, f"{name}: bytes {pos}..{trailer_start} are no blob"

        # Manifests: the sealed header and each body frame.
        for name in await backend.list("generations/"):
            data = await backend.get(name)
            gen = name.rsplit("/", 1)[-1]
            start, end = header_span(data, name)
            items.append(Sealed("header", name, data[start:end], aads=(HEADER_AAD,), gen=gen))
            for i, frame in enumerate(split_frames(memoryview(data)[end:], name)):
                items.append(
                    Sealed(
                        "frame", f"{name} frame {i}", bytes(frame), aads=(frame_aad(i),), gen=gen
                    )
                )

        # Quarantine records.
        for name in await backend.list("quarantine/"):
            data = await backend.get(name)
            items.append(Sealed("quarantine", name, data[8:], aads=(QUARANTINE_AAD,)))
    return items


def _try(item: Sealed, key: bytes, aead_keys: tuple[bytes, ...]) -> bytes | None:
    if item.box:
        try:
            return bytes(SealedBox(PrivateKey(key)).decrypt(item.data))
        except CryptoError:
            return None
    for k in aead_keys:
        for aad in item.aads:
            try:
                return bytes(open_sealed(k, item.data, aad, "probe"))
            except IntegrityError:
                continue
    return None


def _keys_inside(item: Sealed, plain: bytes) -> list[bytes]:
    """The secrets an opened item hands on: a wrapped data key, a grant's epoch secrets,
    a key file's payload. Blobs, trailers, headers, frames, index objects and quarantine
    records hold no key."""
    if item.group in ("read_wrap", "meta_wrap", "self_wrap"):
        assert len(plain) == 32
        return [plain]
    if item.group == "grant":
        grant = json.loads(plain)
        return [base64.b64decode(grant[k]) for k in ("meta", "read") if grant[k]]
    if item.group == "key file":
        payload = json.loads(plain)
        return [base64.b64decode(v) for k, v in payload.items() if v and k != "admin_verify_key"]
    return []


def reachable(items: list[Sealed], secrets: Iterable[bytes]) -> dict[int, bytes]:
    """Index -> plaintext of every item that opens with `secrets`, or with any key found
    inside an item opened on the way (to a fixed point). Each secret is tried as an AEAD
    key, as the meta-wrap key derived from it, and as an X25519 secret."""
    pending = list(secrets)
    assert all(len(s) == 32 for s in pending)
    seen: set[bytes] = set()
    opened: dict[int, bytes] = {}
    while pending:
        key = pending.pop()
        if key in seen:
            continue
        seen.add(key)
        aead_keys = (key, meta_wrap_key(key))
        for i, item in enumerate(items):
            if i in opened:
                continue
            plain = _try(item, key, aead_keys)
            if plain is not None:
                opened[i] = plain
                pending += [k for k in _keys_inside(item, plain) if k not in seen]
    return opened


def kek(key_file: bytes, passphrase: str) -> bytes:
    """The key-encryption key `passphrase` derives for a key file."""
    _record, info, salt, _sealed = _parse(key_file)
    return _kek(passphrase.encode(), salt, info.kdf)


def keks(path: Path, passphrases: Iterable[str]) -> list[bytes]:
    files = sorted((path / "keys").iterdir())
    return [kek(f.read_bytes(), pw) for f in files for pw in passphrases]


def labels(items: list[Sealed], which: Iterable[int]) -> list[str]:
    return sorted(str(items[i]) for i in which)


def assert_opens_exactly(items: list[Sealed], opened: Iterable[int], allowed: set[int]) -> None:
    did = set(opened)
    assert did - allowed == set(), f"opened: {labels(items, did - allowed)}"
    assert allowed - did == set(), f"did not open: {labels(items, allowed - did)}"


def assert_everything_opens(items: list[Sealed], path: Path, passphrases: Iterable[str]) -> None:
    """The positive control, made after the negative claims on the same enumeration: from
    the passphrases alone every item opens."""
    assert_opens_exactly(items, reachable(items, keks(path, passphrases)), set(range(len(items))))


def groups(items: list[Sealed]) -> set[str]:
    return {i.group for i in items}


# --- 1. rotation ----------------------------------------------------------------------------


def test_rotation_rewraps_keys_and_the_old_epoch_opens_nothing(
    run_asyncio: Run, repo_path: Path
) -> None:
    async def go() -> None:
        versions = evolving(1, 5)
        expected: dict[str, bytes] = {}
        async with await make_repo(repo_path) as repo:
            for kind, v in zip(("full", "incremental", "differential"), versions, strict=False):
                expected[(await repo.backup(io.BytesIO(v), name="db", kind=kind)).id] = v
            store = repo._store
            old = store.epochs[1]
            assert old.read_secret is not None
            old_secrets = [old.read_secret, old.meta, old.meta_wrap]
            record = store.keyring.epoch(1)
            assert record is not None
            old_grant = record.grants[store.holder.key_id]
            packs_before = file_hashes(repo_path, "packs")
            gens_before = sorted(await store.generation_ids())

            report = await repo.keys.rotate()

            assert (report.epoch, report.retired, report.resumed) == (2, [1], False)
            assert report.entries_dropped == 0 and report.reencrypted is None
            assert file_hashes(repo_path, "packs") == packs_before  # not a byte rewritten
            assert sorted(await store.generation_ids()) == gens_before
            await check_restores(repo, expected)
            for kind, v in zip(("incremental", "full"), versions[3:], strict=True):
                expected[(await repo.backup(io.BytesIO(v), name="db", kind=kind)).id] = v
            await check_restores(repo, expected)

        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await check_restores(repo, expected)
            ring = repo._store.keyring
            retired = ring.epoch(1)
            assert retired is not None and retired.state == "retired" and retired.grants == {}
            assert ring.current_epoch == 2 and [e.number for e in ring.active_epochs] == [2]
        assert {p.parent.name for p in (repo_path / "keymaps").glob("*/*")} == {"00000002"}
        # The old grant is gone from the repository, in the keyring's b64 or raw.
        b64_grant = base64.b64encode(old_grant)
        for f in repo_path.rglob("*"):
            if f.is_file():
                assert old_grant not in f.read_bytes() and b64_grant not in f.read_bytes(), f

        items = await sealed_items(repo_path)
        assert_opens_exactly(items, reachable(items, old_secrets), set())
        assert_everything_opens(items, repo_path, [PASSPHRASE])
        assert {"blob", "trailer", "header", "frame", "index", "read_wrap", "meta_wrap"} <= groups(
            items
        )

    run_asyncio(go())


# --- 2. a writer key -------------------------------------------------------------------------


async def drain(stream: AsyncIterator[bytes]) -> None:
    async for _ in stream:
        pass


def test_writer_backs_up_and_opens_no_data(run_asyncio: Run, repo_path: Path) -> None:
    async def go() -> None:
        a, a2, a3 = evolving(2, 3)
        async with await make_repo(repo_path) as admin:
            by_admin = await admin.backup(io.BytesIO(a), name="db", kind="full")
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            # A quarantine record, so that the enumeration has one (it names no real copy).
            await admin._store.write_quarantine([(os.urandom(32), os.urandom(32), "missing")])
            admin_key = admin.key_id

        expected = {by_admin.id: a}
        async with await dedupe.Repository.open(repo_path, WRITER_PW) as writer:
            assert writer.role == "writer"
            full = await writer.backup(io.BytesIO(a), name="w", kind="full")
            # Everything was stored by the admin already: the writer's index opens.
            assert (full.chunks_new, full.bytes_new, full.packs) == (0, 0, 0)
            assert full.chunks > 10
            inc = await writer.backup(io.BytesIO(a2), name="w", kind="incremental")
            assert (inc.kind, inc.parent, inc.note) == ("incremental", full.id, None)
            assert 0 < inc.chunks_new < inc.chunks
            diff = await writer.backup(io.BytesIO(a3), name="w", kind="differential")
            assert (diff.kind, diff.parent, diff.note) == ("differential", full.id, None)
            # The only "db" was written by the admin: a writer chains only onto its own.
            over = await writer.backup(io.BytesIO(a2), name="db", kind="incremental")
            assert (over.kind, over.parent) == ("full", None)
            assert over.note == (
                "no full generation of 'db' by this key yet: this incremental was made as a full"
            )
            assert over.chunks_new == 0  # deduplicated against the index all the same
            expected |= {full.id: a, inc.id: a2, diff.id: a3, over.id: a2}
            assert sorted(g.id for g in await writer.generations()) == sorted(expected)
            # Who wrote each, from the signed key map entries (not from a header's claim).
            authors = {g.id: g.written_by for g in await writer.generations()}
            assert authors[by_admin.id] is None
            assert {authors[g.id] for g in (full, inc, diff, over)} == {writer.key_id}

            before = file_hashes(repo_path)
            attempts: dict[str, Callable[[], Awaitable[Any]]] = {
                "restore": lambda: writer.restore(full.id, io.BytesIO()),
                "restore_stream": lambda: drain(writer.restore_stream(full.id)),
                "verify": lambda: writer.verify(read_data=True),
                "forget": lambda: writer.forget(keep_last=1),
                "prune": lambda: writer.prune(),
                "keys.add": lambda: writer.keys.add("x", role="admin", name="x", kdf=WEAK),
                "keys.rotate": lambda: writer.keys.rotate(),
                "keys.remove": lambda: writer.keys.remove(admin_key),
                "unlock": lambda: writer.unlock(all_locks=True),
            }
            for what, attempt in attempts.items():
                with pytest.raises(RoleNotPermitted, match="a writer key may not"):
                    await attempt()
                assert file_hashes(repo_path) == before, what

            holder = writer._store.holder
            assert holder.admin_sign is None and list(writer._store.epochs) == [1]
            epoch = writer._store.epochs[1]
            assert epoch.read_secret is None
            secrets = [
                holder.id_key,
                holder.chunker_key,
                holder.box_secret,
                holder.sign_secret,
                epoch.meta,
                epoch.meta_wrap,
            ]
            writer_key = holder.key_id.hex()

        async with await Repository.open(repo_path, PASSPHRASE) as admin:
            await check_restores(admin, expected)  # what the writer made, readers restore

        items = await sealed_items(repo_path)
        own = {full.id, inc.id, diff.id, over.id}

        def by_design(item: Sealed) -> bool:
            """What FORMAT.md 4.4 lets a writer open: the keys of metadata (meta_wrap) and
            the metadata itself, its own grants, and the bodies of its own generations."""
            if item.group in ("meta_wrap", "index", "header", "quarantine"):
                return True
            if item.group in ("grant", "self_wrap"):
                return item.key == writer_key
            if item.group == "frame":
                return item.gen in own
            return False  # blobs, trailers, read_wraps, key files

        allowed = {i for i, item in enumerate(items) if by_design(item)}
        opened = reachable(items, secrets)
        assert_opens_exactly(items, opened, allowed)
        # The control shows the enumeration has something on each side of the line.
        assert groups([items[i] for i in allowed]) == {
            "meta_wrap",
            "index",
            "header",
            "quarantine",
            "grant",
            "self_wrap",
            "frame",
        }
        closed = [items[i] for i in range(len(items)) if i not in opened]
        assert {"blob", "trailer", "read_wrap", "frame", "grant", "key file"} <= groups(closed)
        assert {i.gen for i in closed if i.group == "frame"} == {by_admin.id}
        assert_everything_opens(items, repo_path, [PASSPHRASE, WRITER_PW])

    run_asyncio(go())


# --- 3. key remove + key rotate --------------------------------------------------------------


def test_removed_reader_after_rotation_opens_nothing(run_asyncio: Run, repo_path: Path) -> None:
    async def go() -> None:
        versions = evolving(3, 4)
        expected: dict[str, bytes] = {}
        async with await make_repo(repo_path) as admin:
            for kind, v in zip(("full", "incremental"), versions, strict=False):
                expected[(await admin.backup(io.BytesIO(v), name="db", kind=kind)).id] = v
            info = await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
            reader = await Repository.open(repo_path, READER_PW)
            try:
                holder = reader._store.holder
                epoch = reader._store.epochs[1]
                assert epoch.read_secret is not None
                secrets = [
                    holder.id_key,
                    holder.chunker_key,
                    holder.box_secret,
                    holder.sign_secret,
                    epoch.read_secret,
                    epoch.meta,
                    epoch.meta_wrap,
                ]
                (key_file,) = (repo_path / "keys").glob(f"{info.id}-*")
                saved = key_file.read_bytes()
                # Before: its secrets reach every blob (so they are real secrets).
                items = await sealed_items(repo_path)
                opened = reachable(items, secrets)
                assert {i for i, it in enumerate(items) if it.group == "blob"} <= set(opened)

                await admin.keys.remove("r")
                assert not key_file.exists()
                await admin.keys.rotate()
                for kind, v in zip(("full", "incremental"), versions[2:], strict=True):
                    expected[(await admin.backup(io.BytesIO(v), name="db", kind=kind)).id] = v

                # A handle opened before the removal finds itself revoked.
                with pytest.raises(KeyRevoked):
                    await reader.generations()
            finally:
                await reader.close()

        # Its key file was deleted, so its passphrase opens no key file: WrongPassphrase.
        with pytest.raises(WrongPassphrase):
            await Repository.open(repo_path, READER_PW)
        # Put back, the file is not even tried: only key files the keyring lists are
        # (FORMAT.md 4.2), so its passphrase is wrong for this repository.
        key_file.write_bytes(saved)
        with pytest.raises(WrongPassphrase):
            await Repository.open(repo_path, READER_PW)
        async with await Repository.open(repo_path, PASSPHRASE) as admin:
            await check_restores(admin, expected)

        items = await sealed_items(repo_path)
        assert_opens_exactly(items, reachable(items, secrets), set())
        assert_everything_opens(items, repo_path, [PASSPHRASE, READER_PW])

    run_asyncio(go())


# --- 4. a reader key -------------------------------------------------------------------------


def test_reader_restores_verifies_quarantines_and_nothing_else(
    run_asyncio: Run, repo_path: Path
) -> None:
    async def go() -> None:
        (data,) = evolving(4, 1)
        async with await make_repo(repo_path) as admin:
            first = await admin.backup(io.BytesIO(data), name="db", kind="full")
            await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
            store = admin._store
            _meta, table = await store.generation_chunks(first.id)
            victim = list(CHUNK_RECORD.iter_unpack(table))[5][0]  # the sixth chunk
            loc = store.index.get(victim)
            assert loc is not None
            pack = repo_path / pack_name(store.index.packs[loc.pack_no].pack_id)
            admin_key = admin.key_id

        async with await Repository.open(repo_path, READER_PW) as reader:
            assert reader.role == "reader"
            assert [g.id for g in await reader.generations()] == [first.id]
            out = io.BytesIO()
            await reader.restore(first.id, out)
            assert out.getvalue() == data
            assert b"".join([p async for p in reader.restore_stream(first.id)]) == data
            clean = await reader.verify(read_data=True)
            assert clean.ok and clean.quarantine is None

            before = file_hashes(repo_path)
            attempts: dict[str, Callable[[], Awaitable[Any]]] = {
                "backup": lambda: reader.backup(io.BytesIO(b"x" * 1000), name="db"),
                "forget": lambda: reader.forget(keep_last=1),
                "prune": lambda: reader.prune(),
                "keys.add": lambda: reader.keys.add("x", role="reader", name="x", kdf=WEAK),
                "keys.remove": lambda: reader.keys.remove(admin_key),
                "keys.rotate": lambda: reader.keys.rotate(),
                "unlock": lambda: reader.unlock(),
            }
            for what, attempt in attempts.items():
                with pytest.raises(RoleNotPermitted, match="a reader key may not"):
                    await attempt()
                assert file_hashes(repo_path) == before, what

            flip_byte(pack, loc.offset + loc.stored_length // 2)
            report = await reader.verify(read_data=True)
            assert not report.ok and report.quarantine is not None
            assert (repo_path / report.quarantine).is_file()
            assert [d.chunk_ids for d in report.damaged] == [[victim.hex()]]
            record, reader_key = report.quarantine, reader.key_id

        async with await Repository.open(repo_path, PASSPHRASE) as admin:
            # The reader's record is authenticated (its key map is signed by a reader,
            # which may vouch for quarantine records): the next full stores the chunk again.
            found = admin._store.keymaps.get(QUARANTINE, bytes.fromhex(record.split("/")[1]))
            assert found is not None
            keymap = decode_keymap((repo_path / found.keymap).read_bytes(), found.keymap)
            assert keymap.signer.hex() == reader_key
            await admin._store.refresh_index()
            assert (victim, bytes.fromhex(pack.name)) in admin._store.index.quarantined
            again = await admin.backup(io.BytesIO(data), name="db", kind="full")
            assert (again.chunks_new, again.bytes_new) == (1, loc.raw_length)
            await check_restores(admin, {first.id: data, again.id: data})

    run_asyncio(go())


# --- 5. key passwd and key add are atomic -------------------------------------------------------


def test_passwd_keeps_a_working_key_file_whatever_fails(
    run_asyncio: Run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(real: Callable[..., Awaitable[Any]], action: str) -> Callable[..., Awaitable[Any]]:
        async def call(name: str, *args: Any) -> Any:
            if name.startswith("keys/"):
                raise _backend_error(PermissionError(errno.EACCES, "injected"), action, name)
            return await real(name, *args)

        return call

    def key_files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (repo_path / "keys").iterdir()}

    async def go() -> None:
        async with await make_repo(repo_path):
            pass
        original = key_files()

        # Writing the new key file fails, or reading it back does: nothing changes.
        for method, action in (("put", "writing"), ("get", "reading")):
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                backend = repo._store.backend
                with monkeypatch.context() as m:
                    m.setattr(backend, method, failing(getattr(backend, method), action))
                    with pytest.raises(BackendError, match="injected"):
                        await repo.keys.passwd(NEW_PW, kdf=WEAK)
            assert key_files() == original, method
            await (await Repository.open(repo_path, PASSPHRASE)).close()
            with pytest.raises(WrongPassphrase):
                await Repository.open(repo_path, NEW_PW)

        # Deleting the old key file fails: both open, the new one included.
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            backend = repo._store.backend
            with monkeypatch.context() as m:
                m.setattr(backend, "delete", failing(backend.delete, "deleting"))
                with pytest.raises(BackendError, match="injected"):
                    await repo.keys.passwd(NEW_PW, kdf=WEAK)
            assert len(key_files()) == 2
            assert [k.key_files for k in await repo.keys.list()] == [2]
            for pw in (PASSPHRASE, NEW_PW):
                async with await Repository.open(repo_path, pw) as again:
                    assert again.key_id == repo.key_id
            # Running it again finishes the job: one key file, the newest passphrase.
            await repo.keys.passwd(NEW_PW + "!", kdf=WEAK)
            assert len(key_files()) == 1
        for pw in (PASSPHRASE, NEW_PW):
            with pytest.raises(WrongPassphrase):
                await Repository.open(repo_path, pw)
        await (await Repository.open(repo_path, NEW_PW + "!")).close()

    run_asyncio(go())


def test_key_add_interrupted_before_the_keyring_leaves_a_key_file_that_opens_nothing(
    run_asyncio: Run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        expected: dict[str, bytes] = {}
        async with await make_repo(repo_path) as admin:
            (data,) = evolving(5, 1)
            expected[(await admin.backup(io.BytesIO(data), name="db", kind="full")).id] = data
            keyring = {n: (repo_path / n).read_bytes() for n in KEYRING_NAMES}
            with monkeypatch.context() as m:

                async def dies(*args: Any, **kwargs: Any) -> None:
                    raise BackendError("injected: killed before the keyring was written")

                m.setattr(key_ops, "write_keyring", dies)
                with pytest.raises(BackendError, match="injected"):
                    await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
            assert {n: (repo_path / n).read_bytes() for n in KEYRING_NAMES} == keyring
            (orphan,) = [p for p in (repo_path / "keys").iterdir() if admin.key_id not in p.name]
            # The keyring does not list it, so it is never tried: its passphrase is wrong.
            with pytest.raises(WrongPassphrase):
                await Repository.open(repo_path, READER_PW)
            # What the orphan holds (it opens with its passphrase, read directly) opens
            # nothing in the repository: no grant was ever made for it.
            holder = open_key_file(orphan.read_bytes(), bytes.fromhex(admin.id), READER_PW.encode())
            orphan_secrets = [
                holder.id_key,
                holder.chunker_key,
                holder.box_secret,
                holder.sign_secret,
            ]
            items = await sealed_items(repo_path)
            assert_opens_exactly(items, reachable(items, orphan_secrets), set())
            # Its own key file is among the items (and opens by its passphrase, below).
            assert [it.group for it in items if it.key == holder.key_id.hex()] == ["key file"]
            assert_everything_opens(items, repo_path, [PASSPHRASE, READER_PW])
            # Prune leaves it (a key file the keyring does not list may belong to a newer
            # keyring than this client's); it stays unused. Adding again works.
            await admin.prune()
            assert orphan.exists()
            await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
        async with await Repository.open(repo_path, READER_PW) as reader:
            assert reader.role == "reader"
            await check_restores(reader, expected)

    run_asyncio(go())


# --- 6. an interrupted rotation --------------------------------------------------------------


def test_interrupted_rotation_is_finished_by_the_next(
    run_asyncio: Run, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = KeyDirectory.consolidate
    calls = 0

    async def dies_once(self: KeyDirectory, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BackendError("injected: the rotation dies after the new epoch is current")
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(KeyDirectory, "consolidate", dies_once)

    async def go() -> None:
        versions = evolving(6, 3)
        expected: dict[str, bytes] = {}
        async with await make_repo(repo_path) as repo:
            for kind, v in zip(("full", "incremental"), versions, strict=False):
                expected[(await repo.backup(io.BytesIO(v), name="db", kind=kind)).id] = v
            old = repo._store.epochs[1]
            assert old.read_secret is not None
            old_secrets = [old.read_secret, old.meta, old.meta_wrap]
            with pytest.raises(BackendError, match="injected"):
                await repo.keys.rotate()
        assert not list((repo_path / "locks").iterdir())

        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            status = await repo.keys.status()
            assert status.rotation_unfinished and status.current_epoch == 2
            assert [(e.number, e.state) for e in status.epochs] == [(1, "active"), (2, "active")]
            await check_restores(repo, expected)
            # A backup in between: its keys are wrapped for epoch 2 already.
            s = await repo.backup(io.BytesIO(versions[2]), name="db", kind="incremental")
            expected[s.id] = versions[2]

            report = await repo.keys.rotate()
            assert (report.resumed, report.epoch, report.retired) == (True, 2, [1])
            status = await repo.keys.status()
            assert not status.rotation_unfinished and status.current_epoch == 2
            assert [(e.number, e.state) for e in status.epochs] == [(1, "retired"), (2, "active")]
            await check_restores(repo, expected)
        assert calls == 2
        assert {p.parent.name for p in (repo_path / "keymaps").glob("*/*")} == {"00000002"}
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await check_restores(repo, expected)

        items = await sealed_items(repo_path)
        assert_opens_exactly(items, reachable(items, old_secrets), set())
        assert_everything_opens(items, repo_path, [PASSPHRASE])

    run_asyncio(go())


def test_reencrypt_rewrites_every_pack_under_keys_of_the_new_epoch(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`rotate --reencrypt` is for a leaked data key: afterwards no pack is under a key made
    before the new epoch (every pack was rewritten), and everything restores."""
    data = [os.urandom(300_000), os.urandom(200_000)]

    def packs() -> set[str]:
        return {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gens = [await repo.backup(io.BytesIO(d), name=f"n{i}") for i, d in enumerate(data)]
            before = packs()
            report = await repo.keys.rotate(reencrypt=True)
            status = await repo.keys.status()
            born = {e.number: e.packs_born for e in status.epochs}
            assert report.epoch == status.current_epoch
            assert all(n == 0 for epoch, n in born.items() if epoch < status.current_epoch), born
            assert born[status.current_epoch] == len(packs()) > 0
            assert not before & packs()  # every old pack rewritten and gone
            for gen, d in zip(gens, data, strict=True):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == d

    run(go())
