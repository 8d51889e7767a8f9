"""Compression dictionaries (docs/FORMAT.md section 16) against two attackers, on real
repositories (a template made once per module, copied for each test):

- a **storage attacker** (write access to the repository's files, no key): moves, copies,
  swaps, hides, replaces and plants objects under dicts/;
- a **malicious writer key holder**: signs entries for dictionary objects it made itself
  with hostile contents (zstd-refused entropy tables, 1 MiB raw-content dictionaries),
  frames blobs with them, and tries to reach other keys' dictionaries.

Tests marked xfail(strict=True) are findings: they state what dedupe SHOULD do and fail
on the current code (each reason names the finding). The other tests are attacks that
are refused today, kept as regression guards.

The sampler thresholds are shrunk (as in tests/engine/test_page_dictionaries.py) so that
small SQLite files train a dictionary."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import PASSPHRASE, make_repo
from engine.test_page_dictionaries import (
    built_with_small_sampler,
    make_db,
    pack_blobs,
    private_copy,
    shrink_sampler,
)

from dedupe import Repository
from dedupe.crypto import KdfParams, new_key
from dedupe.errors import IntegrityError, KeyNotAvailable
from dedupe.format.keymap import DICTIONARY
from dedupe.hashing import object_id
from dedupe.store import repository as repository_module
from dedupe.store.blobs import MAX_REFS_PER_CALL, PyFramedBatch
from dedupe.store.dictionaries import (
    DICT_PREFIX,
    MAX_DICT_BYTES,
    dict_name,
    encode_dictionary,
    parse_dict_name,
)
from dedupe.store.packer import PackWriter
from dedupe.store.repository import IndexBatch, RepositoryStore

WRITER_PW = "dictionary adversary writer one"
WRITER2_PW = "dictionary adversary writer two"
WEAK = KdfParams.weakest()
ZDICT_MAGIC = b"\x37\xa4\x30\xec"  # zstd's dictionary magic (little-endian 0xEC30A437)


@pytest.fixture(autouse=True)
def small_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    shrink_sampler(monkeypatch)


@pytest.fixture(autouse=True)
def short_load_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker waits 5 s, not 300, for a dictionary the loop loads: FINDING 2 (a close
    while a worker waits) can strike any test whose restore fails while another worker
    asks for a dictionary; it then costs 5 s, not 5 minutes."""
    monkeypatch.setattr(repository_module, "DICTIONARY_LOAD_SECONDS", 5.0)


# --- the template repository --------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    root: Path
    admin_db: Path  # "orders", backed up by the admin
    w1_db: Path  # "w1db", backed up by writer one
    admin_dict: str  # dicts/<ref>/<id> of the admin's dictionary
    w1_dict: str
    orders_gen: str
    w1_gen: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("dictionary-template")
    repo_path = base / "repo"
    admin_db = make_db(base / "orders.db", 12000)
    w1_db = make_db(base / "w1.db", 12000, seed=7)

    async def build() -> Template:
        admin = await make_repo(repo_path)
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=WEAK)
            await admin.keys.add(WRITER2_PW, role="writer", name="w2", kdf=WEAK)
            await admin.backup(admin_db, name="orders", chunker="auto")
            (admin_dict,) = await dictionary_names(admin)
            orders_gen = (await admin.generations("orders"))[-1].id
        finally:
            await closed(admin)
        w1 = await Repository.open(repo_path, WRITER_PW)
        try:
            await w1.backup(w1_db, name="w1db", chunker="auto")
            w1_dict = next(n for n in await dictionary_names(w1) if n != admin_dict)
            w1_gen = (await w1.generations("w1db"))[-1].id
        finally:
            await closed(w1)
        return Template(base, admin_db, w1_db, admin_dict, w1_dict, orders_gen, w1_gen)

    return built_with_small_sampler(build)


@pytest.fixture
def repo(template: Template, tmp_path: Path) -> Path:
    """A private copy of the template repository."""
    return private_copy(template.root / "repo", tmp_path)


# --- helpers ---------------------------------------------------------------------------------


async def dictionary_names(repo: Repository) -> list[str]:
    return sorted(await repo._store.backend.list(DICT_PREFIX))


async def opened(location: Path, passphrase: str = PASSPHRASE) -> Repository:
    return await Repository.open(location, passphrase)


async def closed(repo: Repository) -> None:
    """Close a handle, first letting its worker threads finish off the event loop thread:
    a worker may be waiting for the loop to load a dictionary (FINDING 2), which
    Repository.close() alone would block for DICTIONARY_LOAD_SECONDS."""
    await asyncio.to_thread(repo._executor.shutdown, True)
    await repo.close()


async def restored(location: Path, spec: str, out: Path, passphrase: str = PASSPHRASE) -> bytes:
    """Restore in a fresh handle (its codec has loaded no dictionary), within 60 s."""
    repo = await opened(location, passphrase)
    try:
        await asyncio.wait_for(repo.restore(spec, out), 60)
    finally:
        await closed(repo)
    return out.read_bytes()


async def verified(location: Path, **kwargs: Any) -> Any:
    repo = await opened(location)
    try:
        return await asyncio.wait_for(repo.verify(**kwargs), 60)
    finally:
        await closed(repo)


def count_reads(store: RepositoryStore, prefix: str = DICT_PREFIX) -> list[str]:
    """Record (without changing them) the small-object reads of names under `prefix`."""
    seen: list[str] = []
    get_small = store.backend.get_small

    async def spy(name: str, limit: int) -> bytes:
        if name.startswith(prefix):
            seen.append(name)
        return await get_small(name, limit)

    store.backend.get_small = spy  # type: ignore[method-assign]
    return seen


async def plant_pack(store: RepositoryStore, blobs: list[tuple[bytes, bytes, int]]) -> None:
    """What a malicious writer's own client can do: seal blob plaintexts of its choice
    (chunk id, plaintext, raw length) into a pack under a pack key of its own, and index
    it (key map first, as a backup does)."""
    batch = PyFramedBatch([b[0] for b in blobs], [b[1] for b in blobs], [b[2] for b in blobs])
    await seal_and_index(store, batch)


async def seal_and_index(store: RepositoryStore, batch: Any) -> None:
    writer = PackWriter(store.pack_size)
    finished = writer.add(batch)
    last = writer.flush()
    indexed = IndexBatch()
    for pack in [*finished, *([last] if last is not None else [])]:
        await store.write_finished_pack(pack, indexed)
    await store.write_batch(indexed)


async def write_raw_dictionary(store: RepositoryStore, content: bytes) -> tuple[str, bytes]:
    """A malicious writer stores `content` as a dictionary of its own, as write_dictionary
    does (key map entry, then the object), whatever zstd thinks of it. (name, ref)."""
    key = new_key()
    data = encode_dictionary(key, content)
    dict_id = object_id(data)
    ref = store.hasher.chunk_id(content)[:8]
    await store.keymaps.write([store.keymaps.dictionary_entry(bytes.fromhex(dict_id), key)])
    name = dict_name(ref, dict_id)
    await store.backend.put(name, data)
    return name, ref


async def dictionary_blobs(repo: Repository) -> list[tuple[bytes, bytes, bytes, int]]:
    """(pack key, chunk id, sealed blob, raw length) of every blob of compression byte 2
    (admin: opens every pack)."""
    return [
        (key, cid, blob, raw) for key, cid, blob, raw, kind in await pack_blobs(repo) if kind == 2
    ]


def move(repo: Path, name: str, to: str) -> None:
    (repo / to).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).rename(repo / to)


Run = Callable[[Awaitable[Any]], Any]


# =============================================================================================
# Findings (xfail strict: each states what SHOULD hold and fails on the current code)
# =============================================================================================


# Was FINDING 1 (high): prune's key map consolidation drops the entry of a dictionary it
# cannot see; a storage attacker who hides dicts/<ref>/<id> during a prune and puts it
# back has made every blob compressed with it unreadable (and the object 'planted')",
# Fixed in this change.
def test_hiding_a_dictionary_during_prune_must_not_cost_its_key_map_entry(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    async def main() -> None:
        hidden = tmp_path / "hidden"
        (repo / template.admin_dict).rename(hidden)  # out of sight for the prune only
        admin = await opened(repo)
        try:
            await admin.prune()  # nothing to refuse: the dictionary is simply not listed
        finally:
            await closed(admin)
        hidden.rename(repo / template.admin_dict)  # back, byte for byte
        out = await restored(repo, "orders@latest", tmp_path / "out")
        assert out == template.admin_db.read_bytes()

    run_asyncio(main())


# Was FINDING 2 (medium): Repository.close() calls executor.shutdown(wait=True) on the
# event loop thread; a codec worker blocked in _load_dictionary_from_thread waits for that
# same loop, so close after a cancelled (Ctrl-C, SIGTERM, wait_for) or failed restore
# hangs for DICTIONARY_LOAD_SECONDS (300 s) before the load times out", Fixed in this
# change.
def test_close_after_a_restore_cancelled_during_a_dictionary_load_does_not_hang(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path, monkeypatch: Any
) -> None:
    # The thread's wait, shortened from 300 s so that the hang costs this test 2 s.
    monkeypatch.setattr(repository_module, "DICTIONARY_LOAD_SECONDS", 2.0)

    async def main() -> float:
        admin = await opened(repo)
        store = admin._store
        task = asyncio.ensure_future(admin.restore("orders@latest", tmp_path / "out"))
        deadline = time.monotonic() + 20
        # Wait until a worker thread has asked the loop for the dictionary (the load is
        # under way on the loop), as a Ctrl-C at that moment would find it.
        while not any(not f.done() for f in store._dict_loads.values()):
            if task.done() or time.monotonic() > deadline:
                pytest.fail("no dictionary load seen: the test no longer tests anything")
            await asyncio.sleep(0)
        task.cancel()  # what the Runner does on Ctrl-C; `async with repo` then closes
        started = time.monotonic()
        await admin.close()
        took = time.monotonic() - started
        with suppress(BaseException):
            await task
        return took

    took = run_asyncio(main())
    assert took < 1.0, f"close() took {took:.1f} s: it waited for a thread that waited for it"


def refused_dictionary(seed: int = 1, size: int = MAX_DICT_BYTES - 8) -> bytes:
    """zstd's dictionary magic and an id, then garbage where the entropy tables should be:
    stored and sealed like any dictionary, refused by ZSTD_createDDict."""
    return ZDICT_MAGIC + struct.pack("<I", 4242 + seed) + random.Random(seed).randbytes(size)


async def writer_plants_refused_dictionary(
    location: Path, blobs: int, seed: int = 1
) -> tuple[str, bytes]:
    """Writer one stores a zstd-refused dictionary and a pack of `blobs` blobs that name
    its ref (each: compression byte 2, the ref, a few bytes)."""
    w1 = await opened(location, WRITER_PW)
    try:
        store = w1._store
        name, ref = await write_raw_dictionary(store, refused_dictionary(seed))
        rnd = random.Random(seed)
        await plant_pack(
            store,
            [(rnd.randbytes(32), b"\x02" + ref + rnd.randbytes(16), 4096) for _ in range(blobs)],
        )
        return name, ref
    finally:
        await closed(w1)


# Was FINDING 3 (medium): a dictionary zstd refuses fails in codec.add_dictionary, after
# _load_dictionary's checks, and that failure is not remembered (_dict_failed): every blob
# naming its ref reads, decrypts and parses the (up to 1 MiB) object again; a writer's
# tiny blobs make verify --read-data (and prune's copy checks) read 1 MiB each", Fixed in
# this change.
def test_a_refused_dictionary_is_read_once_however_many_blobs_name_it(
    run_asyncio: Run, repo: Path
) -> None:
    async def main() -> list[str]:
        name, ref = await writer_plants_refused_dictionary(repo, blobs=40)
        admin = await opened(repo)
        try:
            reads = count_reads(admin._store, f"{DICT_PREFIX}{ref.hex()}/")
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
        finally:
            await closed(admin)
        assert ("dictionary", name) in [(d.kind, d.name) for d in report.damaged]
        return reads

    reads = run_asyncio(main())
    # One read for verify's check of the object, one for the load by the first blob.
    assert len(reads) <= 2, f"the refused dictionary was read {len(reads)} times for 40 blobs"


# Was FINDING 4a (medium): reseal_dictionaries hands every dictionary to write_dictionary,
# whose codec.add_dictionary raises for one zstd refuses: a writer's hostile dictionary
# makes `key rotate --reencrypt` fail at its last step on every run (after storing yet
# another sealed copy of it), so reencrypt_below is never cleared. Fixed in this change.
async def reencrypt_finishes(repo: Path) -> None:
    """An admin's `key rotate --reencrypt` runs to its end (the mark is cleared)."""
    admin = await opened(repo)
    try:
        await asyncio.wait_for(admin.keys.rotate(reencrypt=True), 60)
        assert admin._store.keyring.reencrypt_below is None
    finally:
        await closed(admin)


def test_a_writers_refused_dictionary_does_not_block_rotate_reencrypt(
    run_asyncio: Run, repo: Path
) -> None:
    async def main() -> None:
        await writer_plants_refused_dictionary(repo, blobs=1)
        await reencrypt_finishes(repo)

    run_asyncio(main())


# Was FINDING 4b (medium): a storage attacker's byte-identical copy of a real dictionary
# object under another ref (dicts/0000000000000000/<real id>) is vouched for (same id) but
# fails the ref check; reseal_dictionaries lets that IntegrityError out, so `key rotate
# --reencrypt` (the remedy for a leaked data key) never finishes. Fixed in this change.
def test_a_copied_dictionary_under_a_wrong_ref_does_not_block_rotate_reencrypt(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    decoy = dict_name(bytes(8), template.admin_dict.rsplit("/", 1)[-1])
    (repo / decoy).parent.mkdir(parents=True)
    shutil.copyfile(repo / template.admin_dict, repo / decoy)

    run_asyncio(reencrypt_finishes(repo))


# Was FINDING 4c (low): prune treated an object under dicts/ as planted only when no key
# map entry had its id, and deleted no other; a copy of a vouched object under a wrong
# ref, or anything a writer vouches for (any size: this one is 3 MiB, more than a
# dictionary can be), stayed for good, even after its writer was removed: verify reported
# it at every run and no command removed it. Fixed: prune --delete-unauthenticated
# deletes what can serve no reader (tests/engine/test_prune_dictionaries.py).
def test_prune_delete_unauthenticated_removes_what_can_be_no_dictionary(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    decoy = dict_name(bytes(8), template.admin_dict.rsplit("/", 1)[-1])
    (repo / decoy).parent.mkdir(parents=True)
    shutil.copyfile(repo / template.admin_dict, repo / decoy)

    async def main() -> str:
        w1 = await opened(repo, WRITER_PW)
        try:  # a writer vouches for 3 MiB of its own junk under dicts/
            store = w1._store
            junk = random.Random(5).randbytes(3 << 20)
            oid = object_id(junk)
            await store.keymaps.write(
                [store.keymaps.dictionary_entry(bytes.fromhex(oid), new_key())]
            )
            big = dict_name(bytes(range(8)), oid)
            await store.backend.put(big, junk)
            writer_id = store.holder.key_id.hex()
        finally:
            await closed(w1)
        admin = await opened(repo)
        try:
            await admin.keys.remove(writer_id)
            report = await admin.verify()
            damaged = {d.name for d in report.damaged}
            assert {decoy, big} <= damaged  # verify sees both...
            await admin.prune(delete_unauthenticated=True)
        finally:
            await closed(admin)
        return big

    big = run_asyncio(main())
    left = [n for n in (decoy, big) if (repo / n).exists()]
    assert not left, f"no dedupe command removes {left}"
    assert (repo / template.admin_dict).exists()  # the copy's true one stays


# Was FINDING 5 (low): dictionary_by_id gives up at the first name carrying the hinted id;
# a decoy copy under a wrong ref that sorts first makes every backup of the name train and
# store a new dictionary (never pruned) instead of reusing its own. Fixed in this change.
def test_a_decoy_does_not_stop_a_backup_from_reusing_its_dictionary(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    decoy = dict_name(bytes(8), template.admin_dict.rsplit("/", 1)[-1])
    (repo / decoy).parent.mkdir(parents=True)
    shutil.copyfile(repo / template.admin_dict, repo / decoy)
    db = tmp_path / "orders.db"
    shutil.copyfile(template.admin_db, db)
    make_db(db, 3000, seed=2, start=100000)  # day 2: new pages at the end

    async def main() -> None:
        admin = await opened(repo)
        try:
            await admin.backup(db, name="orders", kind="incremental", chunker="auto")
            gens = await admin.generations("orders")
            names = await dictionary_names(admin)
        finally:
            await closed(admin)
        assert gens[-1].dictionary == gens[0].dictionary
        assert set(names) == {template.admin_dict, template.w1_dict, decoy}

    run_asyncio(main())


# Was FINDING 6 (low-medium): a reader kept every dictionary it loaded (bytes, DDict, a
# DictTable rebuilt whole at each add) for the life of the handle, with no bound: a
# writer's largest dictionaries (each needing one tiny blob) cost an admin's verify
# --read-data ~2x their stored size in RAM, unbounded with their number. Fixed: the codec
# keeps blobs.DICT_BUDGET bytes of them, and the store none.
def test_a_reader_holds_a_bounded_amount_of_dictionaries(run_asyncio: Run, repo: Path) -> None:
    count, size = 40, MAX_DICT_BYTES

    async def main() -> int:
        w1 = await opened(repo, WRITER_PW)
        try:
            store = w1._store
            for i in range(count):
                content = random.Random(100 + i).randbytes(size)  # a raw-content dictionary
                _dict_id, handle = await store.write_dictionary(content)
                chunk = content[-4096:]  # zstd uses the dictionary's end first
                batch = store.codec.frame([chunk], [store.hasher.chunk_id(chunk)], handle)
                await seal_and_index(store, batch)
        finally:
            await closed(w1)
        admin = await opened(repo)
        try:
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
            assert report.ok, report.damaged
            codec = admin._store.codec
            assert not admin._store._dict_loads  # the store keeps none of what it loaded
            return sum(len(codec.dictionary(ref).data) for ref in list(codec._dicts[0]))
        finally:
            await closed(admin)

    held = run_asyncio(main())
    assert held <= 8 << 20, f"verify left {held >> 20} MiB of dictionaries loaded (plus DDicts)"


class _CountingKernel:
    """Passes every call on to the thread's native BatchCodec, counting the blobs that
    open_records is asked to open (observation only)."""

    def __init__(self, inner: Any, opened: list[int]) -> None:
        self._inner, self._opened = inner, opened

    def open_records(
        self,
        key: bytes,
        id_key: bytes,
        data: Any,
        records: Any,
        lo: int,
        hi: int,
        dicts: Any = None,
    ) -> Any:
        self._opened[0] += hi - lo
        return self._inner.open_records(key, id_key, data, records, lo, hi, dicts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# Was FINDING 7 (medium): BlobCodec._loading restarts the whole native batch after each
# dictionary it loads, and each load rebuilds the DictTable (searched linearly per blob):
# a writer's pack whose blobs each name another tiny dictionary of its own costs a reader
# O(n^2) (8,000 such blobs, ~1.5 MB stored: verify --read-data 89 s)", Fixed in this
# change.
def test_blobs_naming_many_dictionaries_cost_a_reader_linear_work(
    run_asyncio: Run, repo: Path
) -> None:
    from dedupe.store.blobs import NATIVE_AVAILABLE

    if not NATIVE_AVAILABLE:
        pytest.skip("counts the native kernel's work")
    n = 300

    async def main() -> int:
        w1 = await opened(repo, WRITER_PW)
        try:
            store = w1._store
            entries, blobs = [], []
            for i in range(n):
                content = random.Random(1000 + i).randbytes(64)  # a raw-content dictionary
                key = new_key()
                data = encode_dictionary(key, content)
                oid = object_id(data)
                entries.append(store.keymaps.dictionary_entry(bytes.fromhex(oid), key))
                ref = store.hasher.chunk_id(content)[:8]
                await store.backend.put(dict_name(ref, oid), data)
                chunk = content * 8
                frame = zstandard.ZstdCompressor(
                    level=1,
                    dict_data=zstandard.ZstdCompressionDict(
                        content, dict_type=zstandard.DICT_TYPE_RAWCONTENT
                    ),
                    write_dict_id=False,
                ).compress(chunk)
                blobs.append((store.hasher.chunk_id(chunk), b"\x02" + ref + frame, len(chunk)))
            await store.keymaps.write(entries)
            await plant_pack(store, blobs)
        finally:
            await closed(w1)
        admin = await opened(repo)
        try:
            codec = admin._store.codec
            opened_blobs = [0]
            kernel = codec._kernel
            codec._kernel = lambda: _CountingKernel(kernel(), opened_blobs)  # type: ignore[method-assign]
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
            # Blobs opened together may name MAX_REFS_PER_CALL dictionaries: the rest are
            # refused, by verify (BlobCodec.one_pack, per batch of the pack it reads) as
            # by a restore, which opens a range of them at once.
            (damaged,) = report.damaged
            assert damaged.kind == "pack"
            assert MAX_REFS_PER_CALL < len(damaged.chunk_ids) < n
        finally:
            await closed(admin)
        return opened_blobs[0]

    work = run_asyncio(main())
    assert work <= 4 * n + 2000, f"{work} blob openings for {n} blobs naming {n} dictionaries"


# =============================================================================================
# Attacks refused today (regression guards)
# =============================================================================================


def test_swapped_dictionaries_are_refused_never_used_and_swapping_back_heals(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Storage attacker: the admin's and the writer's dictionary objects exchange refs.
    Each opens (its entry, its id, its AEAD) but fails the ref check: no blob is opened
    with the other's dictionary, every restore fails by name, verify names both."""
    a_ref, a_id = parse_dict_name(template.admin_dict) or (b"", "")
    b_ref, b_id = parse_dict_name(template.w1_dict) or (b"", "")
    swapped = {
        template.admin_dict: dict_name(b_ref, a_id),
        template.w1_dict: dict_name(a_ref, b_id),
    }

    async def main() -> None:
        for name, to in swapped.items():
            move(repo, name, to)
        for spec in ("orders@latest", template.w1_gen):
            with pytest.raises(IntegrityError, match="dictionary"):
                await restored(repo, spec, tmp_path / "out")
            assert not (tmp_path / "out").exists()
        report = await verified(repo)
        assert {(d.kind, d.name) for d in report.damaged} >= {
            ("dictionary", n) for n in swapped.values()
        }
        for name, to in swapped.items():
            move(repo, to, name)
        assert (
            await restored(repo, "orders@latest", tmp_path / "o1") == template.admin_db.read_bytes()
        )
        assert await restored(repo, template.w1_gen, tmp_path / "o2") == template.w1_db.read_bytes()

    run_asyncio(main())


def test_thousands_of_planted_names_cost_a_listing_not_reads(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Storage attacker: 3,000 names under the real dictionary's ref. A load reads only
    the object a key map vouches for; prune refuses until told, then deletes the planted
    ones and keeps the real one."""
    ref_dir = repo / template.admin_dict.rsplit("/", 1)[0]
    rnd = random.Random(9)
    planted = []
    for i in range(3000):
        data = b"DDPDICT1" + rnd.randbytes(40 + i % 64)
        path = ref_dir / (object_id(data) if i % 2 else rnd.randbytes(32).hex())
        path.write_bytes(data)
        planted.append(path)

    async def main() -> None:
        admin = await opened(repo)
        try:
            reads = count_reads(admin._store)
            await asyncio.wait_for(admin.restore("orders@latest", tmp_path / "out"), 60)
            assert reads == [template.admin_dict]
            with pytest.raises(IntegrityError, match="no key map vouches for"):
                await admin.prune()
            await admin.prune(delete_unauthenticated=True)
        finally:
            await closed(admin)
        assert not any(p.exists() for p in planted)
        assert (repo / template.admin_dict).exists()
        assert (
            await restored(repo, "orders@latest", tmp_path / "o2") == template.admin_db.read_bytes()
        )

    run_asyncio(main())


@pytest.mark.parametrize("kind", ["fifo", "symlink", "sparse"])
def test_a_dictionary_replaced_by_a_fifo_link_or_huge_file_fails_fast(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path, kind: str
) -> None:
    """Storage attacker: the real object becomes a FIFO (would block a reader), a link to
    /dev/zero (endless), or a sparse 8 GiB file. The restore fails by name at once: no
    hang, no huge read."""
    path = repo / template.admin_dict
    real = path.read_bytes()
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        path.symlink_to("/dev/zero")
    else:
        with open(path, "wb") as f:
            f.truncate(8 << 30)

    async def main() -> None:
        started = time.monotonic()
        with pytest.raises(IntegrityError, match="dictionary"):
            await restored(repo, "orders@latest", tmp_path / "out")
        assert time.monotonic() - started < 20
        path.unlink()
        path.write_bytes(real)
        assert (
            await restored(repo, "orders@latest", tmp_path / "o") == template.admin_db.read_bytes()
        )

    run_asyncio(main())


def test_a_writer_reaches_no_other_keys_dictionary(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Writer two against writer one's dictionary: it cannot open it (no read secret, no
    self-wrap), not even after vouching for the object with a key of its own; it cannot
    vouch for a dictionary as writer one; its own generation of writer one's name, with a
    dictionary of its own, is neither writer one's parent nor its dictionary."""
    w1_ref, w1_id = parse_dict_name(template.w1_dict) or (b"", "")
    other = make_db(tmp_path / "other.db", 12000, seed=11)
    day2 = tmp_path / "w1.db"
    shutil.copyfile(template.w1_db, day2)
    make_db(day2, 3000, seed=12, start=200000)

    async def main() -> None:
        w2 = await opened(repo, WRITER2_PW)
        try:
            store = w2._store
            with pytest.raises(KeyNotAvailable):
                await store.open_dictionary(template.w1_dict, w1_ref, w1_id)
            assert await store.dictionary_by_id(w1_id) is None
            # Its own entry for writer one's object, with a key only it knows.
            await store.keymaps.write(
                [store.keymaps.dictionary_entry(bytes.fromhex(w1_id), new_key())]
            )
            with pytest.raises((IntegrityError, KeyNotAvailable)):
                await store.open_dictionary(template.w1_dict, w1_ref, w1_id)
            # An entry naming writer one as the author: the whole key map is refused.
            w1_key = next(k.id for k in await w2.keys.list() if k.name == "w1")
            forged = replace(
                store.keymaps.dictionary_entry(bytes(range(32)), new_key()),
                self_key=bytes.fromhex(w1_key),
            )
            await store.keymaps.write([forged])
            await w2.backup(other, name="w1db", chunker="auto")
            w2_gen = (await w2.generations("w1db"))[-1]
            assert w2_gen.dictionary not in (None, w1_id)
        finally:
            await closed(w2)
        w1 = await opened(repo, WRITER_PW)
        try:
            await w1.backup(day2, name="w1db", kind="incremental", chunker="auto")
            gens = await w1.generations("w1db")
            assert gens[-1].parent == template.w1_gen  # not writer two's
            assert gens[-1].dictionary == w1_id  # its own, still
            assert await w1._store.dictionary_by_id(w2_gen.dictionary or "") is None
        finally:
            await closed(w1)
        admin = await opened(repo)
        try:
            assert admin._store.keymaps.get(DICTIONARY, bytes(range(32))) is None
            assert any("without naming itself" in p for p in admin._store.problems)
        finally:
            await closed(admin)
        assert await restored(repo, "w1db@latest", tmp_path / "o1") == day2.read_bytes()
        assert await restored(repo, w2_gen.id, tmp_path / "o2") == other.read_bytes()

    run_asyncio(main())


def frame_claiming(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header records `content_size` (8-byte field, single segment, no
    dictionary id) and that holds one raw block of `payload`."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
    block = ((len(payload) << 3) | 1).to_bytes(3, "little")  # last block, raw
    return header + block + payload


def test_a_writers_lying_dictionary_blobs_give_no_wrong_bytes_and_no_huge_allocation(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    """Writer one frames chunks with a dictionary it never stored but names its real
    ref; and frames claiming 1 TiB of content under its ref. An admin's verify reads
    them: each is damage (the keyed id, the recorded size), found at once."""
    w1_ref = (parse_dict_name(template.w1_dict) or (b"", ""))[0]
    rnd = random.Random(21)
    other = rnd.randbytes(4096)
    lying = zstandard.ZstdCompressor(
        level=1,
        dict_data=zstandard.ZstdCompressionDict(other, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
        write_dict_id=False,
    )

    async def main() -> None:
        w1 = await opened(repo, WRITER_PW)
        try:
            store = w1._store
            blobs = []
            for i in range(8):
                chunk = other[i * 512 :] + other[: i * 512]
                blobs.append(
                    (store.hasher.chunk_id(chunk), b"\x02" + w1_ref + lying.compress(chunk), 4096)
                )
            for _ in range(4):
                chunk = rnd.randbytes(4096)
                frame = frame_claiming(1 << 40, chunk[:100])
                blobs.append((store.hasher.chunk_id(chunk), b"\x02" + w1_ref + frame, 4096))
            await plant_pack(store, blobs)
            bad = {cid for cid, _p, _r in blobs}
        finally:
            await closed(w1)
        started = time.monotonic()
        report = await verified(repo, read_data=True, quarantine=False)
        assert time.monotonic() - started < 30
        damaged_chunks = {c for d in report.damaged for c in d.chunk_ids}
        assert {c.hex() for c in bad} <= damaged_chunks
        assert not any(d.kind == "dictionary" for d in report.damaged)  # w1's own is fine

    run_asyncio(main())


def test_the_loader_refuses_at_once_on_the_event_loop_thread(run_asyncio: Run, repo: Path) -> None:
    """A codec open of a dictionary blob on the loop's own thread cannot wait for the
    loop: it fails at once (the blob counts as unreadable), it does not deadlock."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            key, cid, blob, raw = (await dictionary_blobs(admin))[0]
            started = time.monotonic()
            with pytest.raises(IntegrityError, match="cannot be from here"):
                admin._store.codec.open(key, cid, blob, raw)
            assert time.monotonic() - started < 1
        finally:
            await closed(admin)

    run_asyncio(main())


def test_a_restore_cancelled_during_a_dictionary_load_leaves_the_handle_usable(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Ctrl-C (a cancel) while a worker waits for a dictionary the loop loads: the load
    finishes on the loop, the worker goes, and the same handle restores afterwards."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            store = admin._store
            task = asyncio.ensure_future(admin.restore("orders@latest", tmp_path / "out"))
            deadline = time.monotonic() + 20
            while not any(not f.done() for f in store._dict_loads.values()):
                assert not task.done() and time.monotonic() < deadline, "no dictionary load seen"
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            loads = list(store._dict_loads.values())
            await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), 20)
            await asyncio.wait_for(admin.restore("orders@latest", tmp_path / "again"), 60)
            assert (tmp_path / "again").read_bytes() == template.admin_db.read_bytes()
        finally:
            started = time.monotonic()
            await admin.close()
            assert time.monotonic() - started < 5

    run_asyncio(main())


@pytest.mark.parametrize("operation", ["rotate", "remove"])
def test_hiding_a_dictionary_during_a_key_command_costs_nothing(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path, operation: str
) -> None:
    """Rotation and key removal keep the entries of objects they cannot see (FORMAT 4.6):
    a dictionary hidden while they run still opens once it is back (the contrast of
    FINDING 1, prune)."""

    async def main() -> None:
        hidden = tmp_path / "hidden"
        (repo / template.admin_dict).rename(hidden)
        admin = await opened(repo)
        try:
            if operation == "rotate":
                await admin.keys.rotate()
            else:
                await admin.keys.remove("w2")
        finally:
            await closed(admin)
        hidden.rename(repo / template.admin_dict)
        assert (
            await restored(repo, "orders@latest", tmp_path / "o") == template.admin_db.read_bytes()
        )

    run_asyncio(main())


# Was FINDING 8 (low-medium, robustness): RepositoryStore pins the event loop it was
# opened on (self._loop) for the thread-to-loop loader; a handle used from a later loop
# (one asyncio.run per call, as sync wrappers do) restores everything but dictionary
# blobs, and its verify --read-data reports good packs as 'id mismatch' and writes a
# quarantine record for them. Fixed in this change.
def test_a_handle_opened_on_one_loop_restores_dictionary_blobs_on_another(
    template: Template, repo: Path, tmp_path: Path
) -> None:
    admin = asyncio.run(opened(repo))
    try:
        asyncio.run(admin.restore("orders@latest", tmp_path / "out"))
    finally:
        asyncio.run(admin.close())
    assert (tmp_path / "out").read_bytes() == template.admin_db.read_bytes()


def test_a_backup_never_compresses_with_a_planted_dictionary(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Storage attacker: forged dictionary objects (sealed as the format says, under keys
    of its own, unvouched) beside the admin's, under its ref and under a new one. The next
    backup of the name reads none of them and keeps its own dictionary; a fresh reader
    reads only the vouched object; what was stored restores."""
    a_ref, a_id = parse_dict_name(template.admin_dict) or (b"", "")
    planted = []
    for ref in (a_ref, bytes(range(8))):
        forged = encode_dictionary(new_key(), random.Random(3).randbytes(64 << 10))
        planted.append(dict_name(ref, object_id(forged)))
        (repo / planted[-1]).parent.mkdir(parents=True, exist_ok=True)
        (repo / planted[-1]).write_bytes(forged)
    db = tmp_path / "orders.db"
    shutil.copyfile(template.admin_db, db)
    make_db(db, 3000, seed=4, start=300000)

    async def main() -> None:
        admin = await opened(repo)
        try:
            reads = count_reads(admin._store)
            await admin.backup(db, name="orders", kind="incremental", chunker="auto")
            assert not set(planted) & set(reads)
            assert (await admin.generations("orders"))[-1].dictionary == a_id
        finally:
            await closed(admin)
        reader = await opened(repo)
        try:
            reads = count_reads(reader._store)
            await asyncio.wait_for(reader.restore("orders@latest", tmp_path / "out"), 60)
            assert reads == [template.admin_dict]
        finally:
            await closed(reader)
        assert (tmp_path / "out").read_bytes() == db.read_bytes()

    run_asyncio(main())
