"""The dictionary budget of a reader's codec (blobs.DICT_BUDGET: a codec keeps that many
bytes of dictionaries, pinning those an open call loaded; the store keeps none) and
prune's deletion of vouched dictionary objects no reader can use (`prune
--delete-unauthenticated`), against two attackers (docs/FORMAT.md section 16), on real
repositories (a template made once per module, copied for each test):

- (A) a **storage attacker**: write access to the repository's files, no key;
- (B) a **writer key holder**: its own dictionaries, key map entries and packs (blobs
  naming any ref), plus (A).

Tests marked xfail(strict=True) are findings: each states what SHOULD hold and fails on
the current code (the reason names the finding). The others are attacks refused today,
kept as regression guards.

DICT_BUDGET is shrunk where a test needs more dictionaries than the budget holds: it stands
for a repository with more than 4 MiB of them (64 of the 64 KiB a backup trains: one per
name and writer key)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import PASSPHRASE, make_repo
from engine.test_page_dictionaries import (
    built_with_small_sampler,
    make_db,
    private_copy,
    shrink_sampler,
)

from dedupe import Repository
from dedupe.crypto import KdfParams, new_key
from dedupe.engine import prune as prune_module
from dedupe.errors import IntegrityError
from dedupe.hashing import ChunkHasher
from dedupe.store import blobs as blobs_module
from dedupe.store import repository as repository_module
from dedupe.store.blobs import (
    MAX_REFS_PER_CALL,
    NATIVE_AVAILABLE,
    BlobCodec,
    Dictionary,
    PyFramedBatch,
    seal_batch,
)
from dedupe.store.dictionaries import (
    DICT_PREFIX,
    MAX_DICT_OBJECT,
    dict_name,
    parse_dict_name,
)
from dedupe.store.repository import RepositoryStore
from security.test_dictionary_adversary import count_reads, seal_and_index, write_raw_dictionary

WRITER_PW = "budget adversary writer one"
WEAK = KdfParams.weakest()
Run = Callable[[Awaitable[Any]], Any]


@pytest.fixture(autouse=True)
def small_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    shrink_sampler(monkeypatch)


@pytest.fixture(autouse=True)
def short_load_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker waits 5 s, not 300, for a dictionary the loop loads."""
    monkeypatch.setattr(repository_module, "DICTIONARY_LOAD_SECONDS", 5.0)


def budget(monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setattr(blobs_module, "DICT_BUDGET", size)


# --- the template repository ------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    root: Path
    admin_db: Path  # "orders", backed up by the admin
    w1_db: Path  # "w1db", backed up by writer one
    admin_dict: str  # dicts/<ref>/<id>
    w1_dict: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("budget-template")
    admin_db = make_db(base / "orders.db", 12000)
    w1_db = make_db(base / "w1.db", 12000, seed=7)

    async def build() -> Template:
        admin = await make_repo(base / "repo")
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=WEAK)
            await admin.backup(admin_db, name="orders", chunker="auto")
            (admin_dict,) = await admin._store.backend.list(DICT_PREFIX)
        finally:
            await closed(admin)
        w1 = await Repository.open(base / "repo", WRITER_PW)
        try:
            await w1.backup(w1_db, name="w1db", chunker="auto")
            (w1_dict,) = set(await w1._store.backend.list(DICT_PREFIX)) - {admin_dict}
        finally:
            await closed(w1)
        return Template(base, admin_db, w1_db, admin_dict, w1_dict)

    return built_with_small_sampler(build)


@pytest.fixture
def repo(template: Template, tmp_path: Path) -> Path:
    """A private copy of the template repository."""
    return private_copy(template.root / "repo", tmp_path)


# --- helpers ------------------------------------------------------------------------------------


async def opened(location: Path, passphrase: str = PASSPHRASE, **kw: Any) -> Repository:
    return await Repository.open(location, passphrase, **kw)


async def closed(repo: Repository) -> None:
    """Let the worker threads finish off the loop's thread, then close."""
    await asyncio.to_thread(repo._executor.shutdown, True)
    await repo.close()


async def restored(location: Path, spec: str, out: Path) -> bytes:
    repo = await opened(location)
    try:
        await asyncio.wait_for(repo.restore(spec, out), 60)
    finally:
        await closed(repo)
    return out.read_bytes()


def count_loads(store: RepositoryStore) -> list[bytes]:
    """Record the refs of the dictionary loads the store really runs (not the callers
    that share one in flight)."""
    loads: list[bytes] = []
    load = store._load_dictionary

    async def spy(ref: bytes) -> Dictionary:
        loads.append(ref)
        return await load(ref)

    store._load_dictionary = spy  # type: ignore[method-assign]
    return loads


async def pruned_told(repo: Path) -> Any:
    """The report of prune --delete-unauthenticated, run by the admin in a fresh handle."""
    admin = await opened(repo)
    try:
        return await asyncio.wait_for(admin.prune(delete_unauthenticated=True), 60)
    finally:
        await closed(admin)


def copy(repo: Path, name: str, to: str) -> None:
    (repo / to).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / name, repo / to)


def under(name: str, ref: bytes) -> str:
    """The name of object `name`'s id under `ref`."""
    return dict_name(ref, name.rsplit("/", 1)[-1])


def ref_of(name: str) -> bytes:
    return (parse_dict_name(name) or (b"", ""))[0]


def framed(content: bytes, chunk: bytes) -> bytes:
    """A zstd frame of `chunk` compressed with raw-content dictionary `content` (content
    size recorded, no dictionary id), as a backup frames a page."""
    return zstandard.ZstdCompressor(
        level=1,
        dict_data=zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
        write_dict_id=False,
    ).compress(chunk)


async def writer_plants_dictionaries(
    location: Path, contents: list[bytes], order: list[list[tuple[int, int]]]
) -> list[tuple[str, bytes]]:
    """Writer one stores each of `contents` as a dictionary of its own, then one pack per
    list of `order`, whose blobs are (dictionary i, piece j): a 4 KiB piece of content i
    compressed with it (good blobs: each opens to its chunk)."""
    w1 = await opened(location, WRITER_PW)
    try:
        store = w1._store
        made = [await write_raw_dictionary(store, c) for c in contents]
        for pack in order:
            ids, blobs, raws = [], [], []
            for i, j in pack:
                chunk = contents[i][j * 64 : j * 64 + 4096]
                ids.append(store.hasher.chunk_id(chunk))
                blobs.append(b"\x02" + made[i][1] + framed(contents[i], chunk))
                raws.append(len(chunk))
            await seal_and_index(store, PyFramedBatch(ids, blobs, raws))
        return made
    finally:
        await closed(w1)


def sealed_blob(key: bytes, chunk_id: bytes, plain: bytes, raw: int) -> bytes:
    """One blob plaintext sealed under `key`, as a pack holds it."""
    out = bytearray(len(plain) + 64)
    end = seal_batch(key, PyFramedBatch([chunk_id], [plain], [raw]), out, 0, 1 << 20, bytearray())
    return bytes(out[:end])


def contents_of(n: int, size: int, seed: int = 100) -> list[bytes]:
    """n distinct raw-content dictionaries of `size` bytes."""
    return [random.Random(seed + i).randbytes(size) for i in range(n)]


def ddict_bytes(size: int) -> int:
    """What zstd allocates for the DDict of a dictionary of `size` bytes (by copy)."""
    from zstandard import _cffi  # type: ignore[attr-defined]

    return int(_cffi.lib.ZSTD_estimateDDictSize(size, _cffi.lib.ZSTD_dlm_byCopy))


# =============================================================================================
# Findings (xfail strict: each states what SHOULD hold and fails on the current code)
# =============================================================================================


# Was FINDING 1a (medium, B): the codec drops dictionaries in the order they were added, and
# verify opens a pack's blobs one call each once the pack's batch fails (it does for a pack
# naming more than MAX_REFS_PER_CALL dictionaries): a writer whose pack cycles through more
# dictionaries than DICT_BUDGET holds makes every blob cost a dictionary load (list, read up
# to 256 KiB, AEAD, two DDicts, a DictTable; prune's copy checks open one blob a call too);
# before the budget each dictionary was loaded once per handle. Fixed: BlobCodec.one_pack
# spans verify's and prune's blob-by-blob checks (and the pure twin's loops): a pack's blobs
# load at most MAX_REFS_PER_CALL dictionaries, pinned until it is done.
def test_a_pack_cycling_through_dictionaries_costs_loads_per_dictionary_not_per_blob(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget(monkeypatch, 2 * 64 * 1024)  # two of the writer's 64 KiB dictionaries
    n, rounds = 12, 6
    contents = contents_of(n, 64 * 1024)
    order = [[(i, r) for r in range(rounds) for i in range(n)]]  # one pack, 72 blobs

    async def main() -> list[bytes]:
        await writer_plants_dictionaries(repo, contents, order)
        admin = await opened(repo)
        try:
            loads = count_loads(admin._store)
            # Every blob is good: today each opens, one call each; refusing the pack's
            # blobs (more than MAX_REFS_PER_CALL dictionaries) would do as well.
            await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
        finally:
            await closed(admin)
        return loads

    loads = run_asyncio(main())
    assert len(loads) <= n + 2 * MAX_REFS_PER_CALL, (
        f"{len(loads)} dictionary loads for {n} dictionaries named by {n * rounds} blobs"
    )


def test_prunes_copy_check_of_such_a_pack_loads_per_dictionary_not_per_blob(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same pack through prune's copy check (prune._bad_copies, which opens a range's
    blobs one call each to tell which are bad): one BlobCodec.one_pack per range, so at
    most MAX_REFS_PER_CALL loads per range, and the blobs past them count as bad copies."""
    budget(monkeypatch, 2 * 64 * 1024)
    n, rounds = 12, 6
    contents = contents_of(n, 64 * 1024)
    order = [[(i, r) for r in range(rounds) for i in range(n)]]

    async def main() -> tuple[list[bytes], int, int]:
        await writer_plants_dictionaries(repo, contents, order)
        admin = await opened(repo)
        try:
            store = admin._store
            await store.refresh_index()
            items = []
            for i, r in order[0]:
                cid = store.hasher.chunk_id(contents[i][r * 64 : r * 64 + 4096])
                where = store.index.get(cid)
                assert where is not None
                pack_id = store.index.packs[where.pack_no].pack_id
                copy = prune_module._Copy(
                    pack_id, where.offset, where.stored_length, where.raw_length
                )
                items.append((cid, copy))
            loads = count_loads(store)
            bad = await prune_module._bad_copies(store, items, asyncio.to_thread)
        finally:
            await closed(admin)
        return loads, len(bad), len(items)

    loads, bad, blobs = run_asyncio(main())
    assert len(loads) <= MAX_REFS_PER_CALL, f"{len(loads)} loads for one pack's range"
    assert bad == blobs - MAX_REFS_PER_CALL * rounds  # those of the first four dictionaries open


# Was FINDING 1b (medium, A): a load reads, hashes and opens every vouched object listed
# under the ref (to find two that differ), and now runs again each time the codec has
# dropped the dictionary: a storage attacker's copies of each dictionary object under every
# other ref make every reload read all of them, so verify --read-data of a repository with
# more dictionaries than DICT_BUDGET holds (packs in id order: a reload at almost every
# pack) reads packs x dictionaries objects (before: dictionaries^2, once). Fixed: the store
# remembers, per operation, each dictionary object that did not open as its name says
# (RepositoryStore.open_dictionary), so a reload reads only the one that serves the ref.
def test_copies_under_other_refs_do_not_multiply_each_reload(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget(monkeypatch, 2 * 64 * 1024)  # two dictionaries held: stands for 64 of them
    n, packs = 6, 24
    contents = contents_of(n, 64 * 1024, seed=200)
    # As backups make them: each pack's blobs name one dictionary.
    order = [[(k % n, r) for r in range(4)] for k in range(packs)]

    async def main() -> tuple[bool, list[str], list[str]]:
        made = await writer_plants_dictionaries(repo, contents, order)
        names = [name for name, _ref in made]
        copies = [under(a, ref_of(b)) for a in names for b in names if a != b]
        for name in copies:  # the storage attacker: each object under every other ref
            copy(repo, next(a for a in names if a.endswith(name[-64:])), name)
        admin = await opened(repo)
        try:
            reads = count_reads(admin._store)
            loads = count_loads(admin._store)
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
        finally:
            await closed(admin)
        return {d.name for d in report.damaged} == set(copies), reads, loads

    only_copies_damaged, reads, loads = run_asyncio(main())
    assert only_copies_damaged  # verify names each copy, and no blob
    listed = len(dictionaries_on_disk(repo))  # the template's two, n true ones, the copies
    # verify's own check reads each name once; a reload then needs the one object that
    # served the ref, not the copies this operation already found to serve another.
    assert len(reads) <= listed + len(loads), (
        f"{len(reads)} reads of {listed} dictionary objects: {len(loads)} reloads for "
        f"{packs} packs, each reading every copy"
    )


# Was FINDING 1c (low, B; installs without the native kernels): the pure twin's open_many
# and open_planned open each blob in a call of its own, so neither the pins nor
# MAX_REFS_PER_CALL span a pack: blobs alternating between two dictionaries, with a budget
# that holds one, cost a load each (the kernel path: two). Fixed: the pure twin's loops run
# in one BlobCodec.one_pack.
def test_the_pure_twin_loads_per_pack_not_per_blob(monkeypatch: pytest.MonkeyPatch) -> None:
    budget(monkeypatch, 1)
    hasher = ChunkHasher(bytes(32))
    contents = contents_of(2, 16 * 1024, seed=800)
    dicts = {hasher.chunk_id(c)[:8]: Dictionary(hasher.chunk_id(c)[:8], c) for c in contents}
    refs = list(dicts)
    key = new_key()
    data, items = bytearray(), []
    for k in range(16):
        content = contents[k % 2]
        chunk = content[k * 64 : k * 64 + 2048]
        cid = hasher.chunk_id(chunk)
        blob = sealed_blob(key, cid, b"\x02" + refs[k % 2] + framed(content, chunk), len(chunk))
        items.append((cid, len(data), len(blob), len(chunk)))
        data += blob
    codec = BlobCodec(3, hasher, native=False)
    loads: list[bytes] = []
    codec.loader = lambda ref: loads.append(ref) or Dictionary(ref, dicts[ref].data)
    assert len(codec.open_many(key, bytes(data), 0, items)) == 16
    assert len(loads) <= MAX_REFS_PER_CALL, f"{len(loads)} loads for one pack of 16 blobs"


# Was FINDING 2 (medium, B): DICT_BUDGET counts only the dictionaries' bytes, but each one
# held costs a DDict of at least ~27 KiB (zstd's entropy tables), a handle and a DictTable
# entry (rebuilt whole at every add, searched linearly for every blob): a writer's tiny
# dictionaries (16 bytes here; zstd takes 1) are all kept, ~1700x the memory the budget
# allows for (4 MiB of 16-byte ones: 262,144 DDicts, ~7 GB) - verify alone adds every
# dictionary object it checks to the codec. Fixed: each dictionary held is charged
# DICT_OVERHEAD (32 KiB) beside its bytes.
def test_tiny_dictionaries_do_not_slip_under_the_budget(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not NATIVE_AVAILABLE:
        pytest.skip("measures zstd's DDicts through its cffi module")
    limit = 256 * 1024
    budget(monkeypatch, limit)
    contents = contents_of(40, 16, seed=300)

    async def main() -> list[Dictionary]:
        # One dictionary per pack: blobs opened together may name only four.
        await writer_plants_dictionaries(repo, contents, [[(i, 0)] for i in range(40)])
        admin = await opened(repo)
        try:
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
            assert report.ok, report.damaged
            return list(admin._store.codec._dicts[0].values())
        finally:
            await closed(admin)

    held = run_asyncio(main())
    cost = sum(len(d.data) + ddict_bytes(len(d.data)) for d in held)
    # The budget's own comment: "each also costs about as much again in its DDict".
    assert cost <= 2 * limit, f"{len(held)} dictionaries held: {cost >> 10} KiB of DDicts"


# Was FINDING 3 (low, A): prune --delete-unauthenticated hashes an object under dicts/
# larger than a dictionary can be, whole, whatever its size, to learn whether it is a
# writer's junk: a storage attacker's sparse file (or hard links to one) under any vouched
# id makes prune, holding the exclusive lock, read terabytes. Fixed: prune reads at most
# MAX_JUNK_READ (64 MiB) of such an object; a larger one is reported, left for the operator.
def test_prune_reads_a_bounded_amount_of_an_oversized_object(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    size = 256 << 20
    planted = under(template.admin_dict, bytes(8))
    (repo / planted).parent.mkdir(parents=True)
    with open(repo / planted, "wb") as f:
        f.truncate(size)  # sparse: costs the attacker nothing

    async def main() -> int:
        admin = await opened(repo)
        read = [0]
        try:
            get = admin._store.backend.get

            async def spy(name: str, offset: int = 0, length: int | None = None) -> bytes:
                data = await get(name, offset, length)
                if name == planted:
                    read[0] += len(data)
                return data

            admin._store.backend.get = spy  # type: ignore[method-assign]
            report = await asyncio.wait_for(admin.prune(delete_unauthenticated=True), 60)
            assert planted not in report.dictionaries_deleted  # damage: left for verify
        finally:
            await closed(admin)
        return read[0]

    read = run_asyncio(main())
    assert (repo / template.admin_dict).exists()
    assert read <= 64 << 20, f"prune read {read >> 20} MiB of a planted {size >> 20} MiB file"


# Was FINDING 4 (low, B with a 2^32 collision of its own refs, plus A): a ref two
# dictionaries had is 'unusable for good' only while the first is held; once the budget
# dropped it, add_dictionary takes the other for that ref, so a swap of the two objects
# between loads is never noticed (the chunk id check still refuses wrong bytes). Fixed: the
# codec remembers the content digest of every ref it was given.
@pytest.mark.parametrize("native", [False, *([True] if NATIVE_AVAILABLE else [])])
def test_a_ref_two_dictionaries_had_stays_unusable_after_a_drop(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget(monkeypatch, 64 * 1024)
    ref = bytes(range(8))
    first, second, *others = contents_of(4, 32 * 1024, seed=700)
    codec = BlobCodec(3, ChunkHasher(bytes(32)), native=native)
    codec.add_dictionary(Dictionary(ref, first))
    for i, content in enumerate(others):
        codec.add_dictionary(Dictionary(bytes([i + 1]) * 8, content))
    assert codec.dictionary(ref) is None  # dropped to make room
    codec.add_dictionary(Dictionary(ref, second))  # same ref, other bytes
    assert codec.dictionary(ref) is None, "the codec now opens the ref with the second one"


# =============================================================================================
# Attacks refused today (regression guards)
# =============================================================================================


def test_a_ref_two_dictionaries_had_never_opens_to_wrong_bytes_after_a_drop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contrast of FINDING 4: whichever of the two the codec holds, a blob framed with
    the other is refused by its chunk id, never opened to other bytes."""
    budget(monkeypatch, 64 * 1024)
    hasher = ChunkHasher(bytes(32))
    ref = bytes(range(8))
    first, second, *others = contents_of(4, 32 * 1024, seed=700)
    chunk = first[-4096:]
    cid = hasher.chunk_id(chunk)
    key = new_key()
    blob = sealed_blob(key, cid, b"\x02" + ref + framed(first, chunk), len(chunk))
    for native in [False, *([True] if NATIVE_AVAILABLE else [])]:
        codec = BlobCodec(3, hasher, native=native)
        codec.add_dictionary(Dictionary(ref, first))
        assert codec.open(key, cid, blob, len(chunk)) == chunk
        for i, content in enumerate(others):
            codec.add_dictionary(Dictionary(bytes([i + 1]) * 8, content))
        codec.add_dictionary(Dictionary(ref, second))
        with pytest.raises(IntegrityError):
            codec.open(key, cid, blob, len(chunk))


@pytest.mark.parametrize("native", [False, *([True] if NATIVE_AVAILABLE else [])])
def test_pins_survive_threads_that_evict_each_other(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads each open batches naming MAX_REFS_PER_CALL of eight dictionaries, with
    a budget that holds one and a loader slow enough for the others to drop what a call
    did not load itself between its DictionaryNeeded and its retry: every call opens,
    none reaches the per-call limit, no pin is left."""
    budget(monkeypatch, 1)
    hasher = ChunkHasher(bytes(32))
    contents = contents_of(8, 16 * 1024, seed=900)
    dicts = [Dictionary(hasher.chunk_id(c)[:8], c) for c in contents]
    key = new_key()

    def pack(refs: list[int], salt: int) -> tuple[bytes, list[tuple[bytes, int, int, int]], list]:
        data, items, chunks = bytearray(), [], []
        for k, i in enumerate(refs * 2):
            chunk = contents[i][k * 64 + salt : k * 64 + salt + 2048]
            cid = hasher.chunk_id(chunk)
            plain = b"\x02" + dicts[i].ref + framed(contents[i], chunk)
            blob = sealed_blob(key, cid, plain, len(chunk))
            items.append((cid, len(data), len(blob), len(chunk)))
            data += blob
            chunks.append(chunk)
        return bytes(data), items, chunks

    packs = [pack(random.Random(s).sample(range(8), MAX_REFS_PER_CALL), s) for s in range(12)]
    codec = BlobCodec(3, hasher, native=native)
    by_ref = {d.ref: d for d in dicts}
    loads = [0]

    def load(ref: bytes) -> Dictionary:
        loads[0] += 1
        time.sleep(0.002)  # others run meanwhile
        return Dictionary(ref, by_ref[ref].data)  # a fresh handle, as a reload makes

    codec.loader = load
    failures: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(15):
                data, items, chunks = rnd.choice(packs)
                got = codec.open_many(key, data, 0, items)
                assert [bytes(c) for c in got] == chunks
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    assert not failures, failures[0]
    assert not codec._pinned
    if native:  # one call a batch (the pure twin's open_many is one a blob: FINDING 1c)
        assert loads[0] <= 4 * 15 * MAX_REFS_PER_CALL


def test_verify_under_thrash_with_many_threads_reports_nothing_and_pins_nothing(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer's packs each name MAX_REFS_PER_CALL of eight dictionaries (good blobs); an
    admin verifies with four worker threads and a budget of one dictionary: no blob is
    reported, no pin stays, the codec ends within its budget."""
    budget(monkeypatch, 1)
    contents = contents_of(8, 32 * 1024, seed=400)
    rnd = random.Random(4)
    picks = [rnd.sample(range(8), 4) for _ in range(10)]  # each pack's four
    order = [[(i, r) for r in range(3) for i in four] for four in picks]

    async def main() -> None:
        await writer_plants_dictionaries(repo, contents, order)
        admin = await opened(repo, workers=4)
        try:
            loads = count_loads(admin._store)
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
            codec = admin._store.codec
            assert report.ok, report.damaged
            assert len(loads) > 8  # dropped and loaded again all along
            assert not codec._pinned
            assert len(codec._dicts[0]) == 1  # the newest only
        finally:
            await closed(admin)

    run_asyncio(main())


def test_a_dictionary_that_fails_to_load_costs_only_its_own_blobs(
    run_asyncio: Run, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of a writer's four dictionaries is deleted (storage attacker); the others are
    dropped and reloaded all along: verify reports the blobs of the lost one only, and
    tries to load it once (the failure is remembered)."""
    budget(monkeypatch, 1)
    contents = contents_of(4, 32 * 1024, seed=500)
    order = [[(k % 4, r) for r in range(4)] for k in range(12)]

    async def main() -> None:
        made = await writer_plants_dictionaries(repo, contents, order)
        (repo / made[0][0]).unlink()
        admin = await opened(repo)
        try:
            loads = count_loads(admin._store)
            report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 60)
        finally:
            await closed(admin)
        hasher_chunks = {
            i: {
                admin._store.hasher.chunk_id(contents[i][r * 64 : r * 64 + 4096]).hex()
                for r in range(4)
            }
            for i in range(4)
        }
        bad = {c for d in report.damaged for c in d.chunk_ids}
        assert bad == hasher_chunks[0]
        assert loads.count(made[0][1]) == 1

    run_asyncio(main())


def test_restores_under_thrash_with_copies_everywhere_give_the_right_bytes(
    run_asyncio: Run,
    template: Template,
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage attacker: each dictionary object copied under the other's ref and a wrong
    one; a budget of one dictionary, so each restore of a handle drops the other's: both
    restore byte for byte, in one handle, one after the other, twice."""
    budget(monkeypatch, 1)
    names = [template.admin_dict, template.w1_dict]
    for a in names:
        for ref in (ref_of(names[1 - names.index(a)]), bytes(8)):
            copy(repo, a, under(a, ref))

    async def main() -> None:
        admin = await opened(repo)
        loads = count_loads(admin._store)
        try:
            for k in range(2):
                for spec, src in (
                    ("orders@latest", template.admin_db),
                    ("w1db@latest", template.w1_db),
                ):
                    out = tmp_path / f"{spec}-{k}"
                    await asyncio.wait_for(admin.restore(spec, out), 60)
                    assert out.read_bytes() == src.read_bytes(), spec
        finally:
            await closed(admin)
        # Each restore loaded its dictionary again (a worker that met the blob before the
        # load ended, and asks after it, may load it once more).
        assert len(loads) >= 4

    run_asyncio(main())


def dictionaries_on_disk(repo: Path) -> dict[str, bytes]:
    return {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / DICT_PREFIX).rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.mark.parametrize("flag", [False, True])
def test_prune_keeps_every_usable_dictionary_whatever_the_attacker_adds(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path, flag: bool
) -> None:
    """Storage attacker: copies of each dictionary object under the other's ref and a
    wrong one, a grown copy (one byte over the limit, does not hash to its name) under a
    wrong ref, a truncated copy under another. Prune, with the flag or without, leaves both
    true objects byte for byte; with it, it deletes exactly the intact copies; both
    generations restore."""
    names = [template.admin_dict, template.w1_dict]
    before = dictionaries_on_disk(repo)
    intact = []
    for a in names:
        for ref in (ref_of(names[1 - names.index(a)]), bytes(8)):
            copy(repo, a, under(a, ref))
            intact.append(under(a, ref))
    grown = under(template.admin_dict, bytes([7]) * 8)
    copy(repo, template.admin_dict, grown)
    with open(repo / grown, "ab") as f:
        f.write(bytes(MAX_DICT_OBJECT + 1 - (repo / grown).stat().st_size))
    cut = under(template.w1_dict, bytes([9]) * 8)
    copy(repo, template.w1_dict, cut)
    os.truncate(repo / cut, 100)

    async def main() -> Any:
        admin = await opened(repo)
        try:
            return await asyncio.wait_for(admin.prune(delete_unauthenticated=flag), 60)
        finally:
            await closed(admin)

    report = run_asyncio(main())
    after = dictionaries_on_disk(repo)
    for name in names:
        assert after[name] == before[name], name
    if flag:
        assert sorted(report.dictionaries_deleted) == sorted(intact)
        assert report.dictionaries_moved == {}
        assert set(after) == {*names, grown, cut}  # damage stays for verify
    else:
        assert report.dictionaries_deleted == [] and set(after) == {*names, *intact, grown, cut}
    for spec, src in (("orders@latest", template.admin_db), ("w1db@latest", template.w1_db)):
        assert run_asyncio(restored(repo, spec, tmp_path / spec)) == src.read_bytes()


def test_prune_does_not_write_through_a_link_at_the_true_name(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Storage attacker: the admin's dictionary moved under a wrong ref, and its true name
    made a link to a file outside the repository. Prune puts the bytes back under the
    true name (a file of its own), writes nothing through the link, and the restore
    works."""
    true = template.admin_dict
    real = (repo / true).read_bytes()
    moved = under(true, bytes(8))
    (repo / moved).parent.mkdir(parents=True)
    (repo / true).rename(repo / moved)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not the attacker's to change")
    (repo / true).symlink_to(outside)

    report = run_asyncio(pruned_told(repo))
    assert report.dictionaries_moved == {moved: true}
    assert outside.read_bytes() == b"not the attacker's to change"
    assert not (repo / true).is_symlink() and (repo / true).read_bytes() == real
    assert not (repo / moved).exists()
    assert (
        run_asyncio(restored(repo, "orders@latest", tmp_path / "out"))
        == template.admin_db.read_bytes()
    )


def test_a_writer_cannot_steer_prune_onto_another_keys_dictionary(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Writer one: its own dictionary object put under the admin's ref, and an entry of
    its own (a key only it knows) for the admin's dictionary id; then the storage
    attacker moves the admin's object under a wrong ref. Prune --delete-unauthenticated
    stores the writer's object under the writer's true name and the admin's under the
    admin's (opened with the admin's key, not the writer's), and deletes only the two
    misplaced copies."""
    a_ref, a_id = parse_dict_name(template.admin_dict) or (b"", "")
    real = (repo / template.admin_dict).read_bytes()

    async def writer() -> tuple[str, str]:
        w1 = await opened(repo, WRITER_PW)
        try:
            store = w1._store
            name, ref = await write_raw_dictionary(store, random.Random(11).randbytes(4096))
            await store.keymaps.write(
                [store.keymaps.dictionary_entry(bytes.fromhex(a_id), new_key())]
            )
        finally:
            await closed(w1)
        return name, under(name, a_ref)

    own, misplaced = run_asyncio(writer())
    (repo / own).rename(repo / misplaced)
    moved = under(template.admin_dict, bytes(8))
    (repo / moved).parent.mkdir(parents=True)
    (repo / template.admin_dict).rename(repo / moved)

    report = run_asyncio(pruned_told(repo))
    assert report.dictionaries_moved == {misplaced: own, moved: template.admin_dict}
    assert (repo / template.admin_dict).read_bytes() == real
    assert set(dictionaries_on_disk(repo)) == {template.admin_dict, template.w1_dict, own}
    assert (
        run_asyncio(restored(repo, "orders@latest", tmp_path / "out"))
        == template.admin_db.read_bytes()
    )


def test_hiding_the_true_object_while_prune_decides_costs_nothing(
    run_asyncio: Run,
    template: Template,
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Storage attacker during a prune: a copy of the admin's dictionary under a wrong ref,
    and the true object hidden just while prune reads it (it then decides to move the
    copy), back before prune acts. Prune stores the same bytes again and deletes the
    copy: the true object is intact, the restore works."""
    from dedupe.engine import prune as prune_module

    true = template.admin_dict
    real = (repo / true).read_bytes()
    decoy = under(true, bytes(8))
    copy(repo, true, decoy)
    hidden = tmp_path / "hidden"
    decide = prune_module._useless_dictionaries

    async def hiding(*args: Any, **kw: Any) -> Any:
        (repo / true).rename(hidden)
        try:
            return await decide(*args, **kw)
        finally:
            hidden.rename(repo / true)

    monkeypatch.setattr(prune_module, "_useless_dictionaries", hiding)

    report = run_asyncio(pruned_told(repo))
    assert report.dictionaries_moved == {decoy: true}
    assert (repo / true).read_bytes() == real and not (repo / decoy).exists()
    assert (
        run_asyncio(restored(repo, "orders@latest", tmp_path / "out"))
        == template.admin_db.read_bytes()
    )


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_prune_reads_no_fifo_or_link_under_a_vouched_name(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path, kind: str
) -> None:
    """Storage attacker: a FIFO (would block a reader) or a link to /dev/zero (endless)
    under a wrong ref with the admin's dictionary id. Prune --delete-unauthenticated
    lists no such thing as an object: it finishes at once and leaves the true object."""
    planted = repo / under(template.admin_dict, bytes(8))
    planted.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.symlink_to("/dev/zero")
    real = (repo / template.admin_dict).read_bytes()

    async def main() -> Any:
        admin = await opened(repo)
        try:
            return await asyncio.wait_for(admin.prune(delete_unauthenticated=True), 20)
        finally:
            await closed(admin)

    started = time.monotonic()
    report = run_asyncio(main())
    assert time.monotonic() - started < 20
    assert report.dictionaries_deleted == [] and report.dictionaries_moved == {}
    assert (repo / template.admin_dict).read_bytes() == real
