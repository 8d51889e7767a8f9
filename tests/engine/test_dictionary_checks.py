"""The checks around compression dictionaries (docs/FORMAT.md section 16) that the
end-to-end tests of test_page_dictionaries.py leave unpinned: each test here goes red
when one check of the store, the backup, verify, prune, key rotation or the key maps is
deleted (they were found by deleting the checks one at a time).

Every test works on a copy of one repository built once for the module: an admin's
generation of a SQLite file that trained a dictionary, and a writer key's generation of
another name that trained its own. The sampler's thresholds are shrunk as in
test_page_dictionaries.py."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo
from test_page_dictionaries import (
    WEAK,
    WRITER_PW,
    blob_kinds,
    dictionary_names,
    make_db,
    restored,
    shrink_sampler,
)

from dedupe import Repository
from dedupe._types import Generation
from dedupe.crypto import new_key
from dedupe.engine import backup as backup_module
from dedupe.engine.keys import reseal_dictionaries
from dedupe.engine.verify import DICTIONARY_UNUSABLE
from dedupe.errors import DedupeError, IntegrityError
from dedupe.format.keymap import DICTIONARY, INDEX, PACK, KeyMapEntry
from dedupe.hashing import object_id
from dedupe.store import dictionaries, repository
from dedupe.store.dictionaries import (
    DICT_AAD,
    DICT_MAGIC,
    MAX_DICT_OBJECT,
    PageSampler,
    decode_dictionary,
    dict_name,
    encode_dictionary,
    parse_dict_name,
)
from dedupe.store.sealed import seal_record

READER_PW = "reader passphrase"
ROWS = 12000  # ~570 pages: the shrunk sampler is full after 384, mid-backup
# Set by conftest for the session: where a module fixture's client state goes.
KEPT_VARIABLES = ("DEDUPE_STATE_DIR", "DEDUPE_CACHE_DIR")


@pytest.fixture(autouse=True)
def small_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    shrink_sampler(monkeypatch)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(repository, the admin's database, the writer's database), built once: "orders"
    by the admin and "shared" by writer key WRITER_PW, each with its own dictionary."""
    base = tmp_path_factory.mktemp("dict-template")
    db = make_db(base / "orders.db", ROWS)
    other = make_db(base / "shared.db", ROWS, seed=7)
    location = base / "repo"

    async def build() -> None:
        admin = await make_repo(location)
        try:
            await admin.backup(db, name="orders", chunker="auto")
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
            await admin.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
        finally:
            await admin.close()
        w = await Repository.open(location, WRITER_PW)
        try:
            await w.backup(other, name="shared", chunker="auto")
        finally:
            await w.close()

    with pytest.MonkeyPatch.context() as mp:
        shrink_sampler(mp)
        for variable in list(os.environ):  # as conftest's clean_env, which runs later
            if variable.startswith("DEDUPE_") and variable not in KEPT_VARIABLES:
                mp.delenv(variable)
        asyncio.run(build())
    return location, db, other


@pytest.fixture
def repo(template: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    """This test's copy of the template repository."""
    shutil.copytree(template[0], tmp_path / "repo")
    return tmp_path / "repo"


async def opened(location: Path, passphrase: str = PASSPHRASE) -> Repository:
    return await Repository.open(location, passphrase)


async def orders_dictionary(location: Path) -> tuple[str, bytes, str]:
    """(name, ref, id) of the dictionary of the admin's "orders"."""
    repo = await opened(location)
    try:
        gen = (await repo.generations("orders"))[-1]
        (name,) = [n for n in await dictionary_names(repo) if n.endswith(gen.dictionary or "-")]
    finally:
        await repo.close()
    ref, dict_id = parse_dict_name(name) or (b"", "")
    return name, ref, dict_id


class Calls:
    """Records the backend calls of one store: (method, name or prefix)."""

    def __init__(self, backend: Any, monkeypatch: pytest.MonkeyPatch, *methods: str) -> None:
        self.calls: list[tuple[str, str]] = []
        for method in methods:
            inner = getattr(backend, method)

            def spy(
                name: str, *args: Any, _m: str = method, _inner: Any = inner, **kwargs: Any
            ) -> Any:
                self.calls.append((_m, name))
                return _inner(name, *args, **kwargs)

            monkeypatch.setattr(backend, method, spy)

    def of(self, method: str, name: str) -> int:
        return sum(1 for m, n in self.calls if m == method and n == name)


def _raw_dictionary(seed: int) -> bytes:
    """Raw-content dictionary bytes (zstd takes any bytes without the ZDICT magic)."""
    rnd = random.Random(seed)
    return b" ".join(
        rnd.choice([b"paid", b"shipped", b"example.com", b"refunded"]) for _ in range(900)
    )


# --- the store: open_dictionary, load_dictionary, dictionary_by_id, write_dictionary -----------


def test_a_dictionary_stored_by_another_handle_meanwhile_loads_and_opens(
    run_asyncio: Any, repo: Path
) -> None:
    """A reader whose key maps predate a concurrent writer's dictionary reads the key
    maps again before calling it unauthenticated: load_dictionary when no object of the
    ref is vouched for, open_dictionary (verify, a backup's hint) when its entry is
    missing."""

    async def main() -> None:
        reader, writer = await opened(repo), await opened(repo)
        try:
            first_id, first = await writer._store.write_dictionary(_raw_dictionary(1))
            loaded = await reader._store.load_dictionary(first.ref)
            assert loaded.data == _raw_dictionary(1)
            second_id, second = await writer._store.write_dictionary(_raw_dictionary(2))
            plain = await reader._store.open_dictionary(
                dict_name(second.ref, second_id), second.ref, second_id
            )
            assert plain == _raw_dictionary(2) and first_id != second_id
        finally:
            await reader.close()
            await writer.close()

    run_asyncio(main())


def test_an_object_sealed_with_another_dictionarys_key_is_not_authenticated(
    run_asyncio: Any, repo: Path
) -> None:
    """Only an object's own key map entry authenticates it: one that opens with the key
    of another (vouched) dictionary, but that no entry lists, is reported by verify and
    never opened."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            store = admin._store
            key = new_key()
            vouched = encode_dictionary(key, _raw_dictionary(1))
            ref = store.hasher.chunk_id(_raw_dictionary(1))[:8]
            await store.keymaps.write(
                [store.keymaps.dictionary_entry(bytes.fromhex(object_id(vouched)), key)]
            )
            await store.backend.put(dict_name(ref, object_id(vouched)), vouched)
            stray = encode_dictionary(key, _raw_dictionary(2))
            stray_ref = store.hasher.chunk_id(_raw_dictionary(2))[:8]
            stray_name = dict_name(stray_ref, object_id(stray))
            await store.backend.put(stray_name, stray)
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            with pytest.raises(IntegrityError, match="not authenticated"):
                await fresh._store.open_dictionary(stray_name, stray_ref, object_id(stray))
            report = await fresh.verify()
        finally:
            await fresh.close()
        assert [(d.kind, d.name) for d in report.damaged] == [("dictionary", stray_name)]

    run_asyncio(main())


def test_an_oversized_dictionary_object_is_refused_unread(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FORMAT.md 16: a reader checks the object's length before reading it whole."""

    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        with open(repo / name, "r+b") as f:
            f.truncate(MAX_DICT_OBJECT + 1)  # sparse: a huge planted file costs no disk
        fresh = await opened(repo)
        try:
            calls = Calls(fresh._store.backend, monkeypatch, "get")
            with pytest.raises(IntegrityError, match="dictionary"):
                await fresh._store.load_dictionary(ref)
            assert calls.of("get", name) == 0
        finally:
            await fresh.close()

    run_asyncio(main())


def test_an_entry_with_a_wrong_key_does_not_hide_the_right_one(
    run_asyncio: Any, repo: Path
) -> None:
    """A dictionary with two entries, the first wrapping a wrong key (a key holder's
    mistake, or a writer's entry for an id it does not own): each key is tried."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            store = admin._store
            key = new_key()
            data = encode_dictionary(key, _raw_dictionary(3))
            oid = bytes.fromhex(object_id(data))
            ref = store.hasher.chunk_id(_raw_dictionary(3))[:8]
            await store.keymaps.write(
                [
                    store.keymaps.dictionary_entry(oid, new_key()),
                    store.keymaps.dictionary_entry(oid, key),
                ]
            )
            await store.backend.put(dict_name(ref, oid.hex()), data)
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            assert (await fresh._store.load_dictionary(ref)).data == _raw_dictionary(3)
        finally:
            await fresh.close()

    run_asyncio(main())


def test_unvouched_objects_under_a_ref_are_never_read(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted object costs a name in the listing, not a read, nor a reload of the key
    maps (which a lookup of its missing entry would do)."""

    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        fake = DICT_MAGIC + random.Random(3).randbytes(4000)
        planted = dict_name(ref, object_id(fake))
        (repo / planted).write_bytes(fake)
        fresh = await opened(repo)
        try:
            calls = Calls(fresh._store.backend, monkeypatch, "get", "get_small")
            keymaps = fresh._store.keymaps
            reloads = []
            refresh = keymaps.refresh

            async def counted_refresh() -> int:
                reloads.append(1)
                return await refresh()

            monkeypatch.setattr(keymaps, "refresh", counted_refresh)
            handle = await fresh._store.load_dictionary(ref)
            assert handle.ref == ref and reloads == []
            assert calls.of("get_small", name) == 1
            assert calls.of("get_small", planted) == calls.of("get", planted) == 0
        finally:
            await fresh.close()

    run_asyncio(main())


class CollidingHasher:
    """The store's hasher, but `plain` gets a chunk id beginning with `ref`: two
    dictionaries with one ref, which a writer key could make for itself by a birthday
    search of 2^32 (FORMAT.md 16)."""

    def __init__(self, inner: Any, plain: bytes, ref: bytes) -> None:
        self._inner, self._plain, self._ref = inner, plain, ref

    def chunk_id(self, data: Any) -> bytes:
        if bytes(data) == self._plain:
            return self._ref + bytes(24)
        return bytes(self._inner.chunk_id(data))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_two_usable_dictionaries_with_one_ref_make_it_unusable(
    run_asyncio: Any, repo: Path
) -> None:
    async def main() -> None:
        _name, ref, _dict_id = await orders_dictionary(repo)
        other = _raw_dictionary(4)
        admin = await opened(repo)
        try:
            admin._store.hasher = CollidingHasher(admin._store.hasher, other, ref)
            _, handle = await admin._store.write_dictionary(other)
            assert handle.ref == ref
        finally:
            await admin.close()
        assert len([n for n in await _names(repo) if n.startswith(f"dicts/{ref.hex()}/")]) == 2
        fresh = await opened(repo)
        try:
            fresh._store.hasher = CollidingHasher(fresh._store.hasher, other, ref)
            with pytest.raises(IntegrityError, match="differ"):
                await fresh._store.load_dictionary(ref)
        finally:
            await fresh.close()

    run_asyncio(main())


async def _names(location: Path) -> list[str]:
    repo = await opened(location)
    try:
        return await dictionary_names(repo)
    finally:
        await repo.close()


def test_a_failed_load_fails_fast_until_the_next_operation_which_looks_again(
    run_asyncio: Any,
    repo: Path,
    tmp_path: Path,
    template: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """verify meets the missing dictionary in blob after blob: the store lists its ref
    once and remembers the failure. Once the dictionary is back, the next operation of
    the same handle loads it."""

    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        aside = tmp_path / "aside"
        (repo / name).rename(aside)
        fresh = await opened(repo)
        try:
            calls = Calls(fresh._store.backend, monkeypatch, "list")
            report = await fresh.verify(read_data=True, quarantine=False)
            assert not report.ok
            assert calls.of("list", f"dicts/{ref.hex()}/") == 1
            aside.rename(repo / name)
            await fresh.restore("orders@latest", tmp_path / "out")
        finally:
            await fresh.close()
        assert (tmp_path / "out").read_bytes() == template[1].read_bytes()

    run_asyncio(main())


def test_a_damaged_dictionary_is_remembered_only_until_the_next_operation(
    run_asyncio: Any, repo: Path, tmp_path: Path, template: tuple[Path, Path, Path]
) -> None:
    """A dictionary object that does not open is remembered by name for the rest of the
    operation (a reload then does not read it again); once its bytes are good again, the
    next operation of the same handle opens it."""

    async def main() -> None:
        name, _ref, _dict_id = await orders_dictionary(repo)
        good = (repo / name).read_bytes()
        (repo / name).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        fresh = await opened(repo)
        try:
            report = await fresh.verify(read_data=True, quarantine=False)
            assert name in {d.name for d in report.damaged}
            (repo / name).write_bytes(good)  # repaired (a replica, the operator)
            await fresh.restore("orders@latest", tmp_path / "out")
        finally:
            await fresh.close()
        assert (tmp_path / "out").read_bytes() == template[1].read_bytes()

    run_asyncio(main())


def test_concurrent_loads_of_one_ref_read_it_once(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        fresh = await opened(repo)
        try:
            calls = Calls(fresh._store.backend, monkeypatch, "get_small")
            handles = await asyncio.gather(*(fresh._store.load_dictionary(ref) for _ in range(4)))
            assert len({id(h) for h in handles}) == 1
            assert calls.of("get_small", name) == 1
        finally:
            await fresh.close()

    run_asyncio(main())


def test_the_codec_loader_refuses_at_once_on_the_event_loop_thread(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting there for the loop would block the loop itself until the timeout."""
    monkeypatch.setattr(repository, "DICTIONARY_LOAD_SECONDS", 2)

    async def main() -> None:
        _name, ref, _dict_id = await orders_dictionary(repo)
        fresh = await opened(repo)
        try:
            loader = fresh._store.codec.loader
            assert loader is not None
            started = time.monotonic()
            with pytest.raises(IntegrityError, match="cannot be from here"):
                loader(ref)
            assert time.monotonic() - started < 1
        finally:
            await fresh.close()

    run_asyncio(main())


def test_a_load_that_hangs_gives_the_codec_thread_up_after_the_timeout(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "DICTIONARY_LOAD_SECONDS", 0.3)

    async def main() -> None:
        _name, ref, _dict_id = await orders_dictionary(repo)
        fresh = await opened(repo)
        release = asyncio.Event()
        backend = fresh._store.backend
        listing = backend.list

        async def stuck_list(prefix: str) -> list[str]:
            if prefix.startswith("dicts/"):
                await release.wait()
            return await listing(prefix)

        monkeypatch.setattr(backend, "list", stuck_list)
        outcome: list[BaseException | object] = []

        def codec_thread() -> None:
            try:
                outcome.append(fresh._store.codec.loader(ref))  # type: ignore[misc]
            except BaseException as e:  # noqa: BLE001 - handed to the test
                outcome.append(e)

        thread = threading.Thread(target=codec_thread, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 5
            while thread.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not thread.is_alive(), "the codec thread still waits for the load"
        finally:
            release.set()
            await asyncio.sleep(0.1)
            thread.join(5)
            await fresh.close()
        assert isinstance(outcome[0], IntegrityError) and "did not load" in str(outcome[0])

    run_asyncio(main())


def test_dictionary_by_id_gives_the_dictionary_of_that_id(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup's hint opens the object of that id, and reads no other."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            made = [await admin._store.write_dictionary(_raw_dictionary(s)) for s in (5, 6)]
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            calls = Calls(fresh._store.backend, monkeypatch, "get_small")
            for dict_id, handle in made:
                got = await fresh._store.dictionary_by_id(dict_id)
                assert got is not None and (got.ref, got.data) == (handle.ref, handle.data)
            read = [name for _method, name in calls.calls if name.startswith("dicts/")]
            assert read == [dict_name(h.ref, i) for i, h in made]
        finally:
            await fresh.close()

    run_asyncio(main())


def test_the_key_map_entry_is_stored_before_the_dictionary(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FORMAT.md 16, Ordering: a crash between the two leaves a harmless entry, never an
    object that prune would take for a planted one."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            calls = Calls(admin._store.backend, monkeypatch, "put")
            await admin._store.write_dictionary(_raw_dictionary(7))
        finally:
            await admin.close()
        prefixes = [name.split("/")[0] for _method, name in calls.calls]
        assert prefixes == ["keymaps", "dicts"]

    run_asyncio(main())


# --- the backup --------------------------------------------------------------------------------


def test_a_dictionary_this_key_cannot_use_is_replaced_and_the_replacement_reused(
    run_asyncio: Any, repo: Path, tmp_path: Path
) -> None:
    """The hint is the dictionary of this key's *latest* generation of the name, and it
    is used only if it opens: a damaged one does not fail the backup, nor is it named in
    the new header; the one trained instead is what the next backup reuses."""

    async def main() -> None:
        name, _ref, old_id = await orders_dictionary(repo)
        data = bytearray((repo / name).read_bytes())
        data[len(data) // 2] ^= 1
        (repo / name).write_bytes(bytes(data))
        db = make_db(tmp_path / "day2.db", ROWS, seed=11)
        admin = await opened(repo)
        try:
            await admin.backup(db, name="orders", kind="full", chunker="auto")
            second = (await admin.generations("orders"))[-1]
            assert second.dictionary not in (None, old_id)
            names = await dictionary_names(admin)
            assert any(n.endswith(second.dictionary or "-") for n in names)
            make_db(db, 3000, seed=12, start=100000)
            await admin.backup(db, name="orders", kind="incremental", chunker="auto")
            third = (await admin.generations("orders"))[-1]
            assert third.dictionary == second.dictionary
            assert await dictionary_names(admin) == names
        finally:
            await admin.close()

    run_asyncio(main())


def test_the_hint_comes_only_from_this_keys_own_generations(
    run_asyncio: Any, repo: Path, template: tuple[Path, Path, Path]
) -> None:
    """The admin's backup of a name a writer trained a dictionary for does not compress
    with the writer's dictionary (FORMAT.md 16: "its latest generation")."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            (writers,) = await admin.generations("shared")
            assert writers.dictionary is not None
            await admin.backup(template[2], name="shared", kind="full", chunker="auto")
            mine = (await admin.generations("shared"))[-1]
            assert mine.dictionary != writers.dictionary
        finally:
            await admin.close()

    run_asyncio(main())


def test_a_source_between_the_thresholds_trains_at_its_end_and_a_smaller_one_none(
    run_asyncio: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer new pages than fill the sampler but enough of them (sampled every 4th:
    their bytes times 4 against MIN_SAMPLE_BYTES): trained at the end, named in the
    header, used by none of its blobs. Fewer than that: none."""
    small = make_db(tmp_path / "small.db", 1000, seed=21)  # ~49 pages: 13 samples
    middle = make_db(tmp_path / "middle.db", 3000, seed=22)  # ~143 pages: 36 samples
    trained = backup_module.train_dictionary

    def slow_train(samples: list[bytes], level: int) -> bytes | None:
        time.sleep(0.3)  # the backup waits for a training it started at its end
        return trained(samples, level)

    monkeypatch.setattr(backup_module, "train_dictionary", slow_train)

    async def main() -> None:
        repo_ = await make_repo(tmp_path / "fresh")
        try:
            await repo_.backup(small, name="small", chunker="auto")
            assert await dictionary_names(repo_) == []
            await repo_.backup(middle, name="middle", chunker="auto")
            (gen,) = await repo_.generations("middle")
            (name,) = await dictionary_names(repo_)
            assert gen.dictionary is not None and name.endswith(gen.dictionary)
            assert 2 not in await blob_kinds(repo_)
        finally:
            await repo_.close()

    run_asyncio(main())


def test_a_training_zstd_refuses_leaves_the_backup_without_a_dictionary(
    run_asyncio: Any, tmp_path: Path, template: tuple[Path, Path, Path]
) -> None:
    """Enough new page bytes, in too few pages for zstd to train on (four samples of
    64 KiB pages): zstd makes no dictionary, and the backup goes on without one."""
    src = tmp_path / "big-pages"
    src.write_bytes(template[1].read_bytes()[: 16 << 16])
    assert (
        dictionaries.train([src.read_bytes()[i << 18 : (i << 18) + (1 << 16)] for i in range(4)], 3)
        is None
    )

    async def main() -> None:
        repo_ = await make_repo(tmp_path / "fresh")
        try:
            await repo_.backup(src, name="big", chunker="fixed:65536")
            (gen,) = await repo_.generations("big")
            assert gen.dictionary is None and await dictionary_names(repo_) == []
        finally:
            await repo_.close()

    run_asyncio(main())


def test_a_trained_dictionary_zstd_refuses_leaves_the_backup_without_one(
    run_asyncio: Any,
    tmp_path: Path,
    template: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """zstd trains a dictionary it then refuses to use (a broken entropy table here):
    train() drops it, and the backup that trained it goes on without one and restores,
    instead of failing on write_dictionary's check."""
    refused = b"\x37\xa4\x30\xec" + bytes(4) + b"\xff" * 200  # zstd's magic, junk tables
    monkeypatch.setattr(
        dictionaries.zstandard,
        "train_dictionary",
        lambda *_a, **_k: dictionaries.zstandard.ZstdCompressionDict(refused),
    )
    src = tmp_path / "orders.db"
    shutil.copyfile(template[1], src)

    async def main() -> None:
        repo_ = await make_repo(tmp_path / "fresh")
        try:
            await repo_.backup(src, name="orders", chunker="auto")
            (gen,) = await repo_.generations("orders")
            assert gen.dictionary is None and await dictionary_names(repo_) == []
            assert 2 not in await blob_kinds(repo_)
        finally:
            await repo_.close()
        assert await restored(tmp_path / "fresh", "orders@latest", tmp_path / "out") == (
            src.read_bytes()
        )

    run_asyncio(main())


def test_a_failed_backup_stops_its_training(
    run_asyncio: Any,
    tmp_path: Path,
    template: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No dictionary is stored after the backup that was training it failed: the
    training is cancelled, and its result (the thread runs on) is dropped."""
    trained = backup_module.train_dictionary
    started, finished = threading.Event(), threading.Event()

    def slow_train(samples: list[bytes], level: int) -> bytes | None:
        started.set()
        time.sleep(0.5)
        try:
            return trained(samples, level)
        finally:
            finished.set()

    monkeypatch.setattr(backup_module, "train_dictionary", slow_train)
    data = template[1].read_bytes()
    pages = [data[i : i + 4096] for i in range(4096, len(data), 4096)]

    async def source() -> Any:
        """New pages (database pages, each made unique) until the training starts."""
        for n in range(0, 20000, 64):
            if started.is_set():
                raise OSError("the source went away")
            yield b"".join(
                p[:64] + (n + i).to_bytes(8, "little") + p[72:]
                for i, p in enumerate(pages[n % len(pages) :][:64])
            )
            await asyncio.sleep(0.005)
        raise OSError("no training started")

    async def main() -> None:
        repo_ = await make_repo(tmp_path / "fresh")
        try:
            with pytest.raises((OSError, DedupeError), match="went away"):
                await repo_.backup(source(), name="stream", chunker="fixed:4096")
            deadline = time.monotonic() + 10
            while not finished.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert finished.is_set()
            await asyncio.sleep(0.3)  # what an uncancelled training would store, it has
            assert await dictionary_names(repo_) == []
        finally:
            await repo_.close()

    run_asyncio(main())


# --- verify, prune, key rotation, key maps ---------------------------------------------------


def test_junk_names_under_dicts_are_ignored_noted_and_pruned_only_when_told(
    run_asyncio: Any, repo: Path, tmp_path: Path, template: tuple[Path, Path, Path]
) -> None:
    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        junk = f"dicts/{ref.hex()}/not-a-dictionary"
        (repo / junk).write_bytes(b"junk")
        admin = await opened(repo)
        try:
            assert (await admin._store.load_dictionary(ref)).ref == ref
            # A backup looks its hint up among every name under dicts/.
            await admin.backup(template[1], name="orders", chunker="auto")
            gens = await admin.generations("orders")
            assert gens[-1].dictionary == gens[0].dictionary is not None
            report = await admin.verify()
            assert report.ok and any(junk in note for note in report.notes)
            with pytest.raises(IntegrityError, match="no key map vouches"):
                await admin.prune()
            assert (repo / junk).exists()
            await admin.prune(delete_unauthenticated=True)
            assert not (repo / junk).exists() and (repo / name).exists()
        finally:
            await admin.close()

    run_asyncio(main())


def test_a_dictionary_zstd_refuses_is_reported_by_verify(run_asyncio: Any, repo: Path) -> None:
    """Authenticated, intact, under its ref, and still not a dictionary: a ZDICT magic
    followed by no valid tables (as a key holder's bug, or a malicious writer, stores)."""
    bad = bytes.fromhex("37a430ec") + bytes(3000)

    async def main() -> None:
        admin = await opened(repo)
        try:
            store = admin._store
            key = new_key()
            data = encode_dictionary(key, bad)
            name = dict_name(bytes(store.hasher.chunk_id(bad)[:8]), object_id(data))
            await store.keymaps.write(
                [store.keymaps.dictionary_entry(bytes.fromhex(object_id(data)), key)]
            )
            await store.backend.put(name, data)
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            report = await fresh.verify()
        finally:
            await fresh.close()
        assert [(d.kind, d.name) for d in report.damaged] == [("dictionary", name)]

    run_asyncio(main())


def test_verify_skips_a_dictionary_removed_between_its_listing_and_its_read(
    run_asyncio: Any, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        name, _ref, _dict_id = await orders_dictionary(repo)
        (repo / name).unlink()
        admin = await opened(repo)
        try:
            backend = admin._store.backend
            listing = backend.list

            async def stale_list(prefix: str) -> list[str]:
                names = await listing(prefix)
                return sorted({*names, name}) if prefix == "dicts/" else names

            monkeypatch.setattr(backend, "list", stale_list)
            report = await admin.verify()
            assert not [d for d in report.damaged if d.kind == "dictionary"]
        finally:
            await admin.close()

    run_asyncio(main())


def test_reseal_leaves_current_and_unvouched_dictionaries_alone(
    run_asyncio: Any, repo: Path
) -> None:
    async def main() -> None:
        _name, ref, _dict_id = await orders_dictionary(repo)
        fake = DICT_MAGIC + random.Random(5).randbytes(4000)
        planted = dict_name(ref, object_id(fake))
        (repo / planted).write_bytes(fake)
        admin = await opened(repo)
        try:
            store = admin._store
            before = await dictionary_names(admin)
            assert await reseal_dictionaries(store, store.keyring.current_epoch) == 0
            assert await dictionary_names(admin) == before
        finally:
            await admin.close()

    run_asyncio(main())


def test_reseal_confirms_the_lock_before_each_dictionary(run_asyncio: Any, repo: Path) -> None:
    """`confirm` (RepositoryLock.confirm in a rotation) runs before a dictionary is sealed
    again and its old object deleted: a lost lock stops it there."""

    async def main() -> None:
        admin = await opened(repo)
        try:
            store = admin._store
            before = await dictionary_names(admin)

            async def lost() -> None:
                raise IntegrityError("the exclusive lock was lost")

            with pytest.raises(IntegrityError, match="lock was lost"):
                await reseal_dictionaries(store, store.keyring.current_epoch + 1, lost)
            assert await dictionary_names(admin) == before
        finally:
            await admin.close()

    run_asyncio(main())


def test_a_reseal_that_fails_keeps_the_old_dictionary(
    run_asyncio: Any, repo: Path, tmp_path: Path, template: tuple[Path, Path, Path]
) -> None:
    """The new object (and its entry) first, then the old one goes: a rotation that
    fails in between leaves every blob readable."""

    async def main() -> None:
        before = await _names(repo)
        assert len(before) == 2  # the admin's and the writer's
        admin = await opened(repo)
        try:

            async def fail(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("the backend went away")

            admin._store.write_dictionary = fail  # type: ignore[method-assign]
            with pytest.raises(RuntimeError, match="went away"):
                await admin.keys.rotate(reencrypt=True)
        finally:
            await admin.close()
        assert await _names(repo) == before
        fresh = await opened(repo)
        try:
            await fresh.restore("orders@latest", tmp_path / "out")
        finally:
            await fresh.close()
        assert (tmp_path / "out").read_bytes() == template[1].read_bytes()

    run_asyncio(main())


def test_a_reader_key_cannot_vouch_for_a_dictionary(run_asyncio: Any, repo: Path) -> None:
    async def main() -> None:
        reader = await opened(repo, READER_PW)
        try:
            entry = reader._store.keymaps.dictionary_entry(bytes(range(32)), new_key())
            assert entry.self_key is None
            await reader._store.keymaps.write([entry])
        finally:
            await reader.close()
        admin = await opened(repo)
        try:
            assert admin._store.keymaps.get(DICTIONARY, bytes(range(32))) is None
            assert any("may not vouch" in p for p in admin._store.problems)
        finally:
            await admin.close()

    run_asyncio(main())


# --- formats -----------------------------------------------------------------------------------


def test_only_generations_and_dictionaries_name_an_author() -> None:
    r = os.urandom
    with pytest.raises(ValueError, match="self-wrap"):
        KeyMapEntry(PACK, r(32), 1, read_wrap=r(80), self_key=r(16))
    with pytest.raises(ValueError, match="self-wrap"):
        KeyMapEntry(INDEX, r(32), 1, meta_wrap=r(72), self_key=r(16), self_wrap=r(80))
    assert KeyMapEntry(DICTIONARY, r(32), 1, read_wrap=r(80), self_key=r(16)).self_wrap is None


def test_an_empty_dictionary_object_does_not_open() -> None:
    key = new_key()
    data = seal_record(DICT_MAGIC, DICT_AAD, key, b"")
    with pytest.raises(IntegrityError, match="empty"):
        decode_dictionary(key, dict_name(bytes(8), object_id(data)), data)


def test_names_with_short_or_uppercase_ids_do_not_parse() -> None:
    ref = "0f" * 8
    for bad in (
        f"dicts/{ref}/{'ab' * 31}",
        f"dicts/{ref}/{'AB' * 32}",
        f"dicts/{ref}/{'ab' * 31}a",
    ):
        assert parse_dict_name(bad) is None, bad


def test_a_full_sampler_takes_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dictionaries, "SAMPLES", 3)
    s = PageSampler()
    s.feed([memoryview(bytes([i]) * 64) for i in range(12)])
    assert s.full and len(s.samples) == 3
    s.feed([memoryview(b"x" * 64) for _ in range(8)])
    assert [p[0] for p in s.samples] == [0, 4, 8]


def _header(dictionary: Any) -> dict[str, Any]:
    return {
        "id": "ab" * 32,
        "name": "n",
        "kind": "full",
        "created": "2026-01-01T00:00:00Z",
        "size": 0,
        "chunks": 0,
        "new_chunks": 0,
        "new_bytes": 0,
        "stored_bytes": 0,
        "seconds": 0,
        "dictionary": dictionary,
    }


def test_a_header_names_a_dictionary_only_by_a_well_formed_id() -> None:
    good = "0123456789abcdef" * 4
    assert Generation.from_header(_header(good)).dictionary == good
    for bad in (good.upper(), good[:-1], good + "0", "g" * 64, 7, None, ["x"]):
        assert Generation.from_header(_header(bad)).dictionary is None, bad


def test_verify_blames_a_lost_dictionary_not_the_blobs_that_name_it(
    run_asyncio: Any, repo: Path
) -> None:
    """Blobs that authenticate but name a dictionary the repository lost are not an 'id
    mismatch' (their content was never compared with anything): their copies are
    'dictionary unusable', and the details name the dictionary. With the object back, the
    same blobs verify clean."""

    async def main() -> None:
        name, ref, _dict_id = await orders_dictionary(repo)
        admin = await opened(repo)
        try:
            kept = await admin._store.backend.get(name)
            await admin._store.backend.delete(name)
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            report = await fresh.verify(read_data=True, quarantine=False)
        finally:
            await fresh.close()
        packs = [d for d in report.damaged if d.kind == "pack"]
        assert packs and {d.reason for d in report.damaged} == {DICTIONARY_UNUSABLE}
        for d in packs:
            assert d.chunk_ids and d.generations
            assert all(ref.hex() in detail for detail in d.details), d.details
        admin = await opened(repo)
        try:
            await admin._store.backend.put(name, kept)
        finally:
            await admin.close()
        fresh = await opened(repo)
        try:
            assert (await fresh.verify(read_data=True, quarantine=False)).damaged == []
        finally:
            await fresh.close()

    run_asyncio(main())
