"""`verify`: a clean repository passes both checks; every kind of damage is found, named
with the chunks it loses and exactly the generations it breaks; subsets read about the
fraction asked; damaged chunk copies are quarantined; the command's exit codes.

One repository is built per module and copied per test: three generations with 64 KiB
packs, "a" and "b" of unrelated data and "c" = a's bytes plus a tail (it shares a's chunks).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import random
import shutil
import stat
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.crypto import OVERHEAD, new_key
from dedupe.crypto.aead import seal_into
from dedupe.engine.verify import (
    AUTH_FAILED,
    ID_MISMATCH,
    MALFORMED,
    MISSING,
    NOT_INDEXED,
    TRUNCATED,
    VerifyReport,
    check_records,
    load_quarantine,
    parse_subset,
)
from dedupe.errors import (
    BackendError,
    IntegrityError,
    MissingObject,
    RepositoryLocked,
    ScratchError,
    VerifyFailed,
)
from dedupe.format.index import ENTRY_RECORD, PackRecord
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import ChunkHasher
from dedupe.store.blobs import BlobCodec
from dedupe.store.locks import RepositoryLock
from dedupe.store.repository import pack_name

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
KiB = 1024


@dataclass(frozen=True)
class Place:
    chunk_id: bytes
    pack_id: bytes
    offset: int
    stored_length: int


@dataclass(frozen=True)
class Pristine:
    path: Path
    gens: dict[str, str]  # name -> generation id
    index_of: dict[str, str]  # name -> the index object its backup wrote
    places: dict[str, list[Place]]  # generation id -> where each of its chunks is


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def _build(path: Path) -> Pristine:
    a = _data(320 * KiB, 1)
    sources = {"a": a, "b": _data(320 * KiB, 2), "c": a + _data(64 * KiB, 3)}
    gens: dict[str, str] = {}
    index_of: dict[str, str] = {}
    async with await make_repo(path) as repo:
        backend = repo._store.backend
        for name, data in sources.items():
            before = set(await backend.list("index/"))
            gens[name] = (await repo.backup(io.BytesIO(data), name=name)).id
            (index_of[name],) = set(await backend.list("index/")) - before
        places = {gid: await _places(repo, gid) for gid in gens.values()}
    return Pristine(path, gens, index_of, places)


async def _places(repo: Repository, gen_id: str) -> list[Place]:
    store = repo._store
    _meta, table = await store.generation_chunks(gen_id)
    out = []
    for chunk_id, _length in CHUNK_RECORD.iter_unpack(table):
        loc = store.index.get(chunk_id)
        assert loc is not None
        pack_id = store.index.packs[loc.pack_no].pack_id
        out.append(Place(chunk_id, pack_id, loc.offset, loc.stored_length))
    return out


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return asyncio.run(_build(tmp_path_factory.mktemp("verify") / "repo"))


@pytest.fixture
def repo(pristine: Pristine, tmp_path: Path) -> Pristine:
    """A private copy of the pristine repository."""
    path = tmp_path / "repo"
    shutil.copytree(pristine.path, path)
    return Pristine(path, pristine.gens, pristine.index_of, pristine.places)


def pack_file(repo: Pristine, pack_id: bytes) -> Path:
    return repo.path / pack_name(pack_id)


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def users(repo: Pristine, chunk_ids: set[bytes]) -> list[str]:
    """The generations whose chunk tables hold any of `chunk_ids`, sorted."""
    return sorted(
        gid for gid, places in repo.places.items() if any(p.chunk_id in chunk_ids for p in places)
    )


def chunks_in_pack(repo: Pristine, pack_id: bytes) -> list[Place]:
    found = {p.chunk_id: p for ps in repo.places.values() for p in ps if p.pack_id == pack_id}
    return sorted(found.values(), key=lambda p: p.offset)


def all_packs(repo: Pristine) -> set[bytes]:
    return {p.pack_id for ps in repo.places.values() for p in ps}


async def verify(repo: Pristine, **kwargs: Any) -> VerifyReport:
    async with await Repository.open(repo.path, PASSPHRASE) as r:
        return await r.verify(**kwargs)


async def quarantine_pairs(repo: Pristine) -> set[tuple[bytes, bytes]]:
    async with await Repository.open(repo.path, PASSPHRASE) as r:
        return await load_quarantine(r._store)


# --- a clean repository ----------------------------------------------------------------------


def test_clean_repository_passes_both_checks(repo: Pristine, run: Run[Any]) -> None:
    packs = all_packs(repo)
    structure = run(verify(repo))
    assert structure.ok and structure.damaged == []
    assert structure.generations == 3 and structure.index_objects == 3
    assert structure.packs == len(packs) >= 10
    assert structure.packs_read == structure.bytes_read == structure.chunks_read == 0
    assert structure.chunks == len({p.chunk_id for ps in repo.places.values() for p in ps})

    data = run(verify(repo, read_data=True))
    assert data.ok and data.damaged == []
    assert data.packs_read == len(packs)
    assert data.chunks_read == data.chunks
    assert data.bytes_read == sum(pack_file(repo, p).stat().st_size for p in packs)
    assert data.quarantine is None and not (repo.path / "quarantine").exists()
    assert json.loads(json.dumps(data.to_dict()))["ok"] is True


def test_progress_events(repo: Pristine, run_asyncio: Run[Any]) -> None:
    stages: list[str] = []
    read: list[int] = []

    def progress(p: Any) -> None:
        assert p.operation == "verify"
        stages.append(p.stage)
        read.append(p.bytes_read)

    report = run_asyncio(verify(repo, read_data=True, progress=progress))
    assert stages[0] == "checking index" and stages[-1] == "done"
    assert "reading packs" in stages and "checking generations" in stages
    assert max(read) == report.bytes_read


# --- damaged data ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["shared", "unique"])
def test_flipped_byte_in_a_blob(repo: Pristine, which: str, run_asyncio: Run[Any]) -> None:
    # A chunk of a that c shares, or a chunk only b has.
    victim = repo.places[repo.gens["a"]][1] if which == "shared" else repo.places[repo.gens["b"]][2]
    expected_gens = (
        sorted([repo.gens["a"], repo.gens["c"]]) if which == "shared" else [repo.gens["b"]]
    )
    assert users(repo, {victim.chunk_id}) == expected_gens
    flip_byte(pack_file(repo, victim.pack_id), victim.offset + victim.stored_length // 2)

    # The structure check reads no pack data: it cannot see a flipped byte, and passes.
    structure = run_asyncio(verify(repo))
    assert structure.ok and structure.bytes_read == 0 and structure.quarantine is None

    report = run_asyncio(verify(repo, read_data=True))
    assert not report.ok
    (damaged,) = report.damaged
    assert damaged.kind == "pack"
    assert damaged.name == pack_name(victim.pack_id)
    assert damaged.reason == AUTH_FAILED
    assert damaged.chunk_ids == [victim.chunk_id.hex()]
    assert damaged.generations == expected_gens
    assert any("hash to its name" in d for d in damaged.details)  # the pack id check too

    # One quarantine record names exactly the damaged copy.
    assert report.quarantine is not None
    assert [p.name for p in (repo.path / "quarantine").iterdir()] == [
        report.quarantine.split("/")[1]
    ]
    assert run_asyncio(quarantine_pairs(repo)) == {(victim.chunk_id, victim.pack_id)}


def test_no_quarantine_record_when_asked(repo: Pristine, run_asyncio: Run[Any]) -> None:
    victim = repo.places[repo.gens["b"]][0]
    flip_byte(pack_file(repo, victim.pack_id), victim.offset + 30)
    report = run_asyncio(verify(repo, read_data=True, quarantine=False))
    assert not report.ok and report.quarantine is None
    assert not (repo.path / "quarantine").exists()


def test_flipped_byte_in_a_trailer_loses_no_chunk(repo: Pristine, run_asyncio: Run[Any]) -> None:
    pack_id = repo.places[repo.gens["b"]][0].pack_id
    path = pack_file(repo, pack_id)
    flip_byte(path, path.stat().st_size - 96 - 20)  # inside the sealed trailer
    report = run_asyncio(verify(repo, read_data=True))
    (damaged,) = report.damaged
    assert damaged.name == pack_name(pack_id) and damaged.reason == AUTH_FAILED
    assert damaged.chunk_ids == [] and damaged.generations == []
    assert report.quarantine is None  # no chunk copy is lost: nothing to store again


def test_truncated_pack(repo: Pristine, run_asyncio: Run[Any]) -> None:
    pack_id = repo.places[repo.gens["b"]][3].pack_id
    path = pack_file(repo, pack_id)
    new_size = path.stat().st_size // 2
    os.truncate(path, new_size)
    cut = {
        p.chunk_id for p in chunks_in_pack(repo, pack_id) if p.offset + p.stored_length > new_size
    }
    assert cut

    report = run_asyncio(verify(repo))  # the structure check alone finds it
    assert not report.ok
    (damaged,) = report.damaged
    assert (damaged.name, damaged.kind, damaged.reason) == (pack_name(pack_id), "pack", TRUNCATED)
    assert set(damaged.chunk_ids) == {c.hex() for c in cut}
    assert damaged.generations == users(repo, cut) == [repo.gens["b"]]

    # Reading the data opens the blobs before the cut and agrees on the ones after it.
    data = run_asyncio(verify(repo, read_data=True))
    (damaged,) = data.damaged
    assert damaged.reason == TRUNCATED and set(damaged.chunk_ids) == {c.hex() for c in cut}
    assert run_asyncio(quarantine_pairs(repo)) == {(c, pack_id) for c in cut}


def test_deleted_pack(repo: Pristine, run_asyncio: Run[Any]) -> None:
    pack_id = repo.places[repo.gens["a"]][0].pack_id  # a pack c uses too
    pack_file(repo, pack_id).unlink()
    lost = {p.chunk_id for p in chunks_in_pack(repo, pack_id)}

    report = run_asyncio(verify(repo))
    assert not report.ok
    (damaged,) = report.damaged
    assert (damaged.name, damaged.kind, damaged.reason) == (pack_name(pack_id), "pack", MISSING)
    assert set(damaged.chunk_ids) == {c.hex() for c in lost}
    assert damaged.generations == users(repo, lost) == sorted([repo.gens["a"], repo.gens["c"]])
    assert run_asyncio(quarantine_pairs(repo)) == {(c, pack_id) for c in lost}

    data = run_asyncio(verify(repo, read_data=True))  # a missing pack is not read
    assert data.packs_read == len(all_packs(repo)) - 1
    assert [d.name for d in data.damaged] == [pack_name(pack_id)]


def test_deleted_index_object(repo: Pristine, run_asyncio: Run[Any]) -> None:
    (repo.path / repo.index_of["b"]).unlink()
    report = run_asyncio(verify(repo))
    assert not report.ok
    (damaged,) = report.damaged
    assert (damaged.name, damaged.kind, damaged.reason) == ("index", "index", NOT_INDEXED)
    b_chunks = {p.chunk_id for p in repo.places[repo.gens["b"]]}
    assert set(damaged.chunk_ids) == {c.hex() for c in b_chunks}
    assert damaged.generations == [repo.gens["b"]]
    assert report.index_objects == 2
    assert report.packs_unindexed == len({p.pack_id for p in repo.places[repo.gens["b"]]})
    assert report.quarantine is None  # unindexed chunks are stored again anyway


def test_damaged_manifest(repo: Pristine, run_asyncio: Run[Any]) -> None:
    gen = repo.gens["c"]
    flip_byte(repo.path / "generations" / gen, 40)
    report = run_asyncio(verify(repo))
    (damaged,) = report.damaged
    assert (damaged.name, damaged.kind) == (f"generations/{gen}", "generation")
    assert damaged.reason == ID_MISMATCH and damaged.generations == [gen]


def test_damaged_quarantine_record(repo: Pristine, run_asyncio: Run[Any]) -> None:
    victim = repo.places[repo.gens["b"]][0]
    flip_byte(pack_file(repo, victim.pack_id), victim.offset + 30)
    name = run_asyncio(verify(repo, read_data=True)).quarantine
    assert name is not None
    flip_byte(repo.path / name, 20)
    with pytest.raises(IntegrityError, match="quarantine record"):
        run_asyncio(quarantine_pairs(repo))
    report = run_asyncio(verify(repo, quarantine=False))
    assert [(d.kind, d.name) for d in report.damaged] == [("quarantine", name)]


# --- subsets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_subset_reads_about_the_fraction(
    repo: Pristine, fraction: float, run_asyncio: Run[Any]
) -> None:
    n = len(all_packs(repo))
    report = run_asyncio(verify(repo, subset=fraction))
    assert report.ok and report.read_data
    assert report.packs_read == math.ceil(fraction * n)
    assert report.subset == f"{fraction * 100:g}%"


def test_subset_slices_cover_every_pack_once(repo: Pristine, run_asyncio: Run[Any]) -> None:
    reads = [run_asyncio(verify(repo, subset=(k, 3))).packs_read for k in (1, 2, 3)]
    assert sum(reads) == len(all_packs(repo))
    assert all(r < len(all_packs(repo)) for r in reads)


def test_parse_subset() -> None:
    assert parse_subset("10%") == pytest.approx(0.1)
    assert parse_subset("100%") == 1.0
    assert parse_subset("2/5") == (2, 5)
    for bad in ("0%", "101%", "0/5", "6/5", "1/0", "ten%", "0.1", "a/b"):
        with pytest.raises(ValueError):
            parse_subset(bad)


def test_subset_argument_is_checked(repo: Pristine, run_asyncio: Run[Any]) -> None:
    with pytest.raises(ValueError):
        run_asyncio(verify(repo, subset=0.0))
    with pytest.raises(ValueError):
        run_asyncio(verify(repo, subset=(4, 3)))


# --- the command -----------------------------------------------------------------------------


def test_command_exit_codes(repo: Pristine, cli: Any) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DEDUPE_") or k == "DEDUPE_STATE_DIR"
    }
    env.update(DEDUPE_REPO=str(repo.path), DEDUPE_PASSWORD=PASSPHRASE)

    ok = cli("verify", "--read-data", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    victim = repo.places[repo.gens["b"]][1]
    flip_byte(pack_file(repo, victim.pack_id), victim.offset + victim.stored_length // 2)
    bad = cli("verify", "--read-data", "--json", env=env)
    assert bad.returncode == VerifyFailed.exit_code == 33
    assert b"Traceback" not in bad.stderr
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert report["damaged"][0]["chunk_ids"] == [victim.chunk_id.hex()]
    assert json.loads(bad.stderr)["error"] == "VerifyFailed"

    human = cli("verify", "--read-data-subset", "100%", "--no-quarantine", env=env)
    assert human.returncode == 33 and b"Traceback" not in human.stderr
    assert b"DAMAGED pack" in human.stdout and repo.gens["b"][:12].encode() in human.stdout

    usage = cli("verify", "--read-data-subset", "0%", env=env)
    assert usage.returncode == 2 and b"Traceback" not in usage.stderr


def test_takes_a_shared_lock(repo: Pristine, run_asyncio: Run[Any]) -> None:
    async def go() -> None:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            backend = r._store.backend
            async with RepositoryLock(backend, exclusive=True, operation="prune"):
                with pytest.raises(RepositoryLocked):
                    await r.verify()
            assert (await r.verify()).ok
            assert await backend.list("locks/") == []  # released

    run_asyncio(go())


class FailingReads(LocalBackend):
    """Pack reads fail as a backend that retried and gave up would."""

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._fail_packs(name)
        return await super().get(name, offset, length)

    async def read_into(self, name: str, offset: int, into: memoryview) -> None:
        self._fail_packs(name)
        await super().read_into(name, offset, into)

    @staticmethod
    def _fail_packs(name: str) -> None:
        if name.startswith("packs/"):
            raise BackendError(f"reading {name} failed")


def test_an_index_entry_the_trailer_lacks_is_reported(
    repo: Pristine, run_asyncio: Run[Any]
) -> None:
    place = repo.places[repo.gens["b"]][0]

    async def go() -> VerifyReport:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            store = r._store
            await store.refresh_index()
            loc = store.index.get(place.chunk_id)
            assert loc is not None
            # A second index object lists the pack's first blob with a raw length its
            # trailer does not have (as a buggy writer, or a forged index, might).
            wrong = ENTRY_RECORD.pack(
                place.chunk_id, 0, loc.offset, loc.stored_length, loc.raw_length + 1
            )
            await store.write_index([store.index.packs[loc.pack_no]], wrong)
            return await r.verify(read_data=True)

    report = run_asyncio(go())
    (damaged,) = [d for d in report.damaged if d.name == pack_name(place.pack_id)]
    assert damaged.kind == "pack"
    assert damaged.details[0] == "1 index entries are not in the pack's trailer"
    # The wrong entry fails to open: the copy it points to cannot be trusted, so the
    # chunk is reported (and the next full stores it again) with what it breaks.
    assert damaged.reason == ID_MISMATCH
    assert damaged.chunk_ids == [place.chunk_id.hex()]
    assert damaged.generations == users(repo, {place.chunk_id})


@pytest.mark.parametrize("where", ["in the magic", "past the footer"])
def test_an_index_entry_pointing_outside_its_pack_is_reported(
    repo: Pristine, run_asyncio: Run[Any], where: str
) -> None:
    place = repo.places[repo.gens["b"]][0]

    async def go() -> VerifyReport:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            store = r._store
            await store.refresh_index()
            loc = store.index.get(place.chunk_id)
            assert loc is not None
            record = store.index.packs[loc.pack_no]
            offset = 2 if where == "in the magic" else record.length - loc.stored_length
            bad = ENTRY_RECORD.pack(place.chunk_id, 0, offset, loc.stored_length, loc.raw_length)
            await store.write_index([record], bad)
            return await r.verify()  # structure only: the index alone shows it

    report = run_asyncio(go())
    (damaged,) = [d for d in report.damaged if d.kind == "index"]
    assert damaged.reason == MALFORMED
    assert damaged.details == [f"1 entries point outside pack {place.pack_id.hex()}"]
    assert damaged.chunk_ids == [place.chunk_id.hex()]


# --- the fast path and the window plan: what a check-deletion review found untested ------


async def _rewrite_index_object(r: Repository, name: str, chunk_id: bytes, raw_delta: int) -> None:
    """Replace index object `name` by one that lists exactly the same entries, in the same
    order, except that `chunk_id`'s raw length is off by raw_delta (a buggy or forged
    index: it is signed, so only a key holder can write it)."""
    store = r._store
    data = await store.backend.get(name)
    packs, records = await store.open_index_object(name, data)
    entries = [list(e) for e in ENTRY_RECORD.iter_unpack(records)]
    hit = [e for e in entries if e[0] == chunk_id]
    assert len(hit) == 1
    hit[0][4] += raw_delta
    await store.write_index(packs, b"".join(ENTRY_RECORD.pack(*e) for e in entries))
    await store.backend.delete(name)


def test_an_index_with_as_many_entries_as_the_trailer_but_a_wrong_one_is_reported(
    repo: Pristine, run_asyncio: Run[Any]
) -> None:
    """Mutant V1: verify's fast path taken when the index lists as many entries for a pack
    as its trailer (`len(info.records) == len(records)`) instead of exactly the trailer's.
    The existing trailer-mismatch test adds an extra entry (a second index object), so
    the count differs and the slow path runs anyway. Here the count is equal: only the
    byte-for-byte comparison sends the pack to the per-entry check. Without it verify
    says the repository is clean, and restore then fails (the index's raw length is not
    the chunk table's)."""
    place = repo.places[repo.gens["b"]][0]

    async def go() -> VerifyReport:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            await _rewrite_index_object(r, repo.index_of["b"], place.chunk_id, +1)
            return await r.verify(read_data=True)

    report = run_asyncio(go())
    (damaged,) = [d for d in report.damaged if d.name == pack_name(place.pack_id)]
    assert damaged.details[0] == "1 index entries are not in the pack's trailer"
    assert damaged.chunk_ids == [place.chunk_id.hex()]
    assert not report.ok


def test_a_chunk_whose_index_length_is_not_its_table_length_fails_restore_as_integrity(
    repo: Pristine, run_asyncio: Run[Any]
) -> None:
    """Mutant R1 (restore maps PLAN_LENGTH to MissingObject, or drops the branch): a
    length disagreement between the chunk table and the index is damage (IntegrityError,
    'run verify'), not a lost chunk; MissingObject subclasses IntegrityError, so check
    the type exactly and the message."""
    place = repo.places[repo.gens["b"]][0]

    async def go() -> None:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            await _rewrite_index_object(r, repo.index_of["b"], place.chunk_id, +1)
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            out = io.BytesIO()
            with pytest.raises(IntegrityError) as info:
                await r.restore(repo.gens["b"], out)
            assert not isinstance(info.value, MissingObject)
            assert "in its chunk table but not in the index" in str(info.value)
            assert place.chunk_id.hex()[:16] in str(info.value)
            assert out.getvalue() == b""  # nothing of the window handed out

    run_asyncio(go())


def test_an_index_object_naming_a_pack_shorter_than_a_footer_is_reported_not_raised(
    repo: Pristine, run_asyncio: Run[Any]
) -> None:
    """Mutant V5 (`max(0, length - FOOTER_SIZE)` dropped): entries_by_pack takes its
    bounds as unsigned 64-bit integers, so a pack record shorter than a footer (an index
    object can say anything) must not reach it negative: OverflowError would abort the
    whole verify. The old per-entry Python comparison reported such entries as outside."""
    cid = os.urandom(32)
    ghost = PackRecord(os.urandom(32), 10)

    async def go() -> VerifyReport:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            await r._store.write_index([ghost], ENTRY_RECORD.pack(cid, 0, 8, 1, 1))
            return await r.verify()

    report = run_asyncio(go())
    assert not report.ok
    index = [d for d in report.damaged if d.kind == "index" and d.reason == MALFORMED]
    assert index and cid.hex() in index[0].chunk_ids


def test_a_trailer_record_past_the_end_of_the_read_pack_is_classified_not_raised() -> None:
    """Mutant V4 (check_records catching only IntegrityError). The fast path is taken
    when the index's entries equal the trailer's; entries_by_pack bounds them by the
    *index's* pack length, not by the bytes read. A key holder can index (and seal in
    the trailer) a blob past the real end of a pack whose record claims a longer length:
    open_records then raises ValueError, which must fall back to the per-blob check
    (TRUNCATED), not abort the whole verify."""
    hasher = ChunkHasher(bytes(range(32)))
    key = new_key()
    chunk = os.urandom(100)
    cid = hasher.chunk_id(chunk)
    blob = bytearray(len(chunk) + 1 + OVERHEAD)
    seal_into(key, b"\x00" + chunk, cid, blob, 0)
    gone = os.urandom(32)
    record = struct.Struct("<32sIII")  # a trailer record: id, offset, stored, raw
    trailer = record.pack(cid, 0, len(blob), 100) + record.pack(gone, len(blob), 500, 100)
    for native in (True, False):
        store = SimpleNamespace(codec=BlobCodec(1, hasher, native=native))
        bad = check_records(store, key, bytes(blob), trailer, 0, 2)  # type: ignore[arg-type]
        assert [(c, reason) for c, reason, _detail in bad] == [(gone, TRUNCATED)]


def test_an_index_object_naming_a_pack_it_does_not_list_is_reported_not_raised(
    repo: Pristine, run_asyncio: Run[Any]
) -> None:
    """An authentic index object (a key holder's bug or forgery) whose entry names pack
    number 1 of a one-pack table: verify reports the object, it does not stop."""
    cid = os.urandom(32)

    async def go() -> tuple[str, VerifyReport]:
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            store = r._store
            # Sealed and stored as write_index does, without its own load of the entries
            # (which refuses them): another writer's object, as verify meets it.
            sealed = store.seal_index(
                [PackRecord(os.urandom(32), 1000)], ENTRY_RECORD.pack(cid, 1, 8, 1, 1)
            )
            await store.keymaps.write([sealed.entry])
            await store.backend.put(sealed.name, sealed.data)
        async with await Repository.open(repo.path, PASSPHRASE) as r:
            return sealed.name, await r.verify()

    name, report = run_asyncio(go())
    assert not report.ok
    (damaged,) = [d for d in report.damaged if d.name == name]
    assert damaged.kind == "index" and damaged.reason == MALFORMED
    assert "pack number 1 of 1" in damaged.details[0]


class PackGoesWhileRead(LocalBackend):
    """Deletes, or cuts in half, one pack between verify's stat of it and its read, as a
    concurrent prune or a failing disk would."""

    def __init__(self, root: Path, pack: str, how: str) -> None:
        super().__init__(root)
        self.pack, self.how = pack, how

    async def read_into(self, name: str, offset: int, into: memoryview) -> None:
        if name == self.pack:
            path = Path(self.root) / name
            if self.how == "delete":
                path.unlink()
            else:
                os.truncate(path, path.stat().st_size // 2)
        await super().read_into(name, offset, into)


@pytest.mark.parametrize(("how", "reason"), [("delete", MISSING), ("truncate", TRUNCATED)])
def test_a_pack_that_goes_while_being_read_is_reported(
    repo: Pristine, run_asyncio: Run[Any], how: str, reason: str
) -> None:
    pack_id = repo.places[repo.gens["a"]][0].pack_id
    lost = {p.chunk_id for p in chunks_in_pack(repo, pack_id)}

    async def go() -> VerifyReport:
        backend = PackGoesWhileRead(repo.path, pack_name(pack_id), how)
        async with await Repository.open(backend, PASSPHRASE) as r:
            return await r.verify(read_data=True)

    report = run_asyncio(go())
    (damaged,) = report.damaged
    assert (damaged.name, damaged.reason) == (pack_name(pack_id), reason)
    assert "while verifying" in damaged.details[0]
    assert set(damaged.chunk_ids) == {c.hex() for c in lost}
    assert damaged.generations == users(repo, lost)


def test_a_backend_failure_is_raised_not_reported(repo: Pristine, run_asyncio: Run[Any]) -> None:
    async def go() -> None:
        async with await Repository.open(FailingReads(repo.path), PASSPHRASE) as r:
            assert (await r.verify()).ok  # the structure check reads no pack
            with pytest.raises(BackendError, match="reading packs/"):
                await r.verify(read_data=True)
            assert await r._store.backend.list("locks/") == []

    run_asyncio(go())
    assert not (repo.path / "quarantine").exists()


def test_verify_keeps_each_packs_index_entries_in_a_scratch_file(
    repo: Pristine, run: Run[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's entries per pack go to an unnamed file in TMPDIR (not held in memory:
    bench/README.md, "Peak memory at 4 GiB"). Where none can be made, verify fails with
    ScratchError naming the place, and reports no damage it did not see."""
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    report = run(verify(repo, read_data=True))
    assert report.ok and report.chunks_read == report.chunks > 0
    assert os.listdir(scratch) == []  # unnamed: nothing left behind
    scratch.rmdir()
    with pytest.raises(ScratchError, match=str(scratch)):
        run(verify(repo, read_data=True))
    assert not (repo.path / "quarantine").exists()
