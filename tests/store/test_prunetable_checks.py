"""The native prune table's checks, counts and tie-breaks that the model comparison in
test_prunetable.py does not pin down (found by mutation testing csrc/prunetable.c,
dedupe/store/_prunetable.pyx and prune's use of them): argument and order checks of the
wrapper, exact counts of what a call flagged, decisions taken again after a copy went,
and the order of records that share a place."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import make_repo

from dedupe.format.index import ENTRY_RECORD
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store._prunetable import NO_NUMBER, PruneTable


def choose(table: PruneTable, rank: list[int]) -> tuple[int, bytes | None]:
    return table.choose(rank)


def cid(first: int, rest: int = 0) -> bytes:
    """A chunk id whose order is that of (first, rest)."""
    return bytes([first]) + bytes(30) + bytes([rest])


def entries(*ents: tuple[bytes, int, int, int, int]) -> bytes:
    return b"".join(ENTRY_RECORD.pack(*e) for e in ents)


def live(*ids: bytes) -> bytes:
    return b"".join(CHUNK_RECORD.pack(c, 1) for c in ids)


def records(data: bytes) -> list[tuple[bytes, int, int, int, int]]:
    return list(ENTRY_RECORD.iter_unpack(data))


def sorted_table(packs: int, *ents: tuple[bytes, int, int, int, int]) -> PruneTable:
    table = PruneTable(packs)
    table.add(entries(*ents), list(range(packs)))
    table.sort()
    return table


# --- the wrapper's argument checks ------------------------------------------------------


def test_a_local_pack_number_just_past_the_map_is_refused() -> None:
    """Local pack number == len(pack_map) is outside the object's pack table, whatever
    the memory after the map holds (a table of 2^32 - 1 packs accepts almost any global
    number, so reading one past the map would go unnoticed)."""
    for size in (1, 3, 64):
        table = PruneTable(0xFFFFFFFF)
        bad = ENTRY_RECORD.pack(os.urandom(32), size, 0, 1, 1)
        good = ENTRY_RECORD.pack(os.urandom(32), size - 1, 0, 1, 1)
        with pytest.raises(ValueError, match="entry 1 names a pack"):
            table.add(good + bad, list(range(size)))
        assert len(table) == 0  # nothing of the refused call was appended
        table.add(good, list(range(size)))
        assert len(table) == 1


def test_pack_counts_outside_uint32_are_refused() -> None:
    for packs in (-1, 2**32, 2**40):
        with pytest.raises(ValueError, match="uint32"):
            PruneTable(packs)
    assert len(PruneTable(0)) == 0
    assert len(PruneTable(2**32 - 1)) == 0


def test_per_pack_numbers_are_checked_for_length_and_range() -> None:
    table = sorted_table(2, (cid(1), 0, 0, 1, 1), (cid(1), 1, 0, 1, 1))
    table.mark_live(live(cid(1)))
    assert choose(table, [0, 1]) == (0, None)
    for numbers in ([0], [0, 1, 2]):  # one too few, one too many
        with pytest.raises(ValueError, match=f"numbers: {len(numbers)} values for 2 packs"):
            table.kept(numbers)
        with pytest.raises(ValueError, match=f"numbers: {len(numbers)} values for 2 packs"):
            table.kept_count(numbers)
        with pytest.raises(ValueError, match=f"rank: {len(numbers)} values for 2 packs"):
            choose(table, numbers)
    for numbers in ([-1, 0], [0, -(2**70)]):
        with pytest.raises(ValueError, match="numbers: -[0-9]+ is out of range"):
            table.kept_count(numbers)
        with pytest.raises(ValueError, match="rank: -[0-9]+ is out of range"):
            choose(table, numbers)
    for numbers in ([2**32, 0], [0, 2**64]):
        with pytest.raises(ValueError, match="numbers: [0-9]+ is out of range"):
            table.kept(numbers)
        with pytest.raises(ValueError, match="rank: [0-9]+ is out of range"):
            choose(table, numbers)
    with pytest.raises(ValueError, match="pack_map: 4294967296 is out of range"):
        PruneTable(2).add(b"", [2**32])
    with pytest.raises(ValueError, match="pack_map: -1 is out of range"):
        PruneTable(2).add(b"", [-1])
    # The greatest uint32 is in range: NO_NUMBER, and a rank.
    assert table.kept_count([NO_NUMBER, NO_NUMBER]) == 0
    assert choose(table, [2**32 - 1, 0]) == (0, None)
    assert table.usage()[0] == [1, 0]


def test_flags_must_be_one_per_pack() -> None:
    table = sorted_table(2, (cid(1), 0, 0, 1, 1))
    for call in (table.unusable_packs, table.moving):
        for flags in (b"\0", b"\0\0\0"):
            with pytest.raises(ValueError, match="flags for 2 packs"):
                call(flags)


def test_set_unusable_wants_a_whole_chunk_id_and_a_pack_of_the_table() -> None:
    c = cid(7)
    table = sorted_table(2, (c, 0, 0, 1, 1))
    for bad_id in (c[:31], c + b"\0", b""):
        with pytest.raises(ValueError, match="not a chunk id"):
            table.set_unusable(bad_id, 0)
    for pack in (-1, 2):
        with pytest.raises(ValueError, match="not a chunk id"):
            table.set_unusable(c, pack)
    assert table.set_unusable(c, 0) == 1


# --- the order: add, sort, then the rest --------------------------------------------------


def test_every_decision_waits_for_sort() -> None:
    table = PruneTable(2)
    table.add(entries((cid(1), 0, 0, 1, 1), (cid(2), 1, 0, 1, 1), (cid(1), 1, 0, 1, 1)), [0, 1])
    assert table.ids() == 0 and table.live_ids() == 0  # counted once sorted, not before
    calls = {
        "unusable_packs": lambda: table.unusable_packs(b"\0\0"),
        "set_unusable": lambda: table.set_unusable(cid(1), 0),
        "mark_live": lambda: table.mark_live(live(cid(1))),
        "live_bytes": lambda: table.live_bytes(),
        "choose": lambda: choose(table, [0, 1]),
        "usage": lambda: table.usage(),
        "unchecked": lambda: table.unchecked(10),
        "moving": lambda: table.moving(b"\1\1"),
        "kept_count": lambda: table.kept_count([0, 1]),
        "kept": lambda: table.kept([0, 1]),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match="out of order"):
            call()
        assert len(table) == 3, name
    table.sort()
    assert table.ids() == 2


def test_sort_is_refused_a_second_time() -> None:
    table = PruneTable(1)
    table.add(entries((cid(2), 0, 0, 1, 1), (cid(1), 0, 8, 1, 1)), [0])
    table.sort()
    with pytest.raises(RuntimeError, match="out of order"):
        table.sort()
    assert [r[0] for r in records(table.kept([0]))] == [cid(1), cid(2)]


# --- what the calls return ----------------------------------------------------------------


def test_unusable_counts_only_what_it_flagged() -> None:
    a, b = cid(1), cid(2)
    table = sorted_table(
        3, (a, 0, 0, 1, 1), (a, 0, 9, 1, 1), (a, 1, 0, 1, 1), (b, 1, 5, 1, 1), (b, 2, 0, 1, 1)
    )
    assert table.unusable_packs(b"\1\0\0") == 2  # both entries of pack 0
    assert table.unusable_packs(b"\1\0\0") == 0  # flagged already
    assert table.unusable_packs(b"\1\1\0") == 2  # pack 1's two, not pack 0's again
    assert table.set_unusable(a, 0) == 0  # its pack is gone already
    assert table.set_unusable(b, 2) == 1
    assert table.set_unusable(b, 2) == 0
    assert table.set_unusable(cid(3), 2) == 0  # no entry has the id
    assert table.set_unusable(cid(0), 0) == 0
    assert table.set_unusable(cid(255, 255), 1) == 0  # past every id


def test_set_unusable_stays_within_its_id() -> None:
    """(a, pack 0) is flagged; b, the next id, has its own copy in pack 0."""
    a, b = cid(1), cid(2)
    table = sorted_table(2, (a, 0, 0, 1, 1), (b, 0, 4, 3, 1), (b, 1, 0, 3, 1))
    assert table.set_unusable(a, 0) == 1
    table.mark_live(live(b))
    assert table.live_bytes() == [3, 3]


def test_live_bytes_again_after_a_copy_went() -> None:
    """live_bytes is computed from the flags as they are now, not from what an earlier
    call found (the earliest usable copy of an id in a pack changes when copies go)."""
    a, b = cid(1), cid(2)
    table = sorted_table(2, (a, 0, 0, 5, 1), (a, 1, 0, 7, 1), (b, 0, 5, 11, 1), (b, 0, 16, 13, 1))
    table.mark_live(live(a, b))
    assert table.live_bytes() == [5 + 11, 7]
    assert table.set_unusable(a, 0) == 1
    assert table.live_bytes() == [11, 7]
    assert table.set_unusable(b, 0) == 2
    assert table.live_bytes() == [0, 7]


def test_moving_records_at_one_place_are_in_the_order_added() -> None:
    """Two chunk ids indexed at the same (pack, offset) (a lying index can do that) come
    out in the order they were added, not in chunk id order."""
    lo, hi = cid(1), cid(2)
    table = PruneTable(1)
    table.add(entries((hi, 0, 100, 3, 3), (lo, 0, 100, 5, 5), (hi, 0, 50, 1, 1)), [0])
    table.sort()
    table.mark_live(live(lo, hi))
    assert table.live_bytes() == [3 + 5]
    choose(table, [0])
    moving, total = table.moving(b"\1")
    assert records(moving) == [(hi, 0, 100, 3, 3), (lo, 0, 100, 5, 5)]
    assert total == 8


def test_memory_counts_entries_and_directory() -> None:
    n = 5000
    table = PruneTable(1)
    table.add(b"".join(ENTRY_RECORD.pack(os.urandom(32), 0, i, 1, 1) for i in range(n)), [0])
    before = table.memory_bytes()
    assert before >= 56 * n  # the array, grown by doubling
    table.sort()
    after = table.memory_bytes()
    # After sort: exactly the entries, and a directory of 2^k + 1 uint32 for about 4
    # entries a bucket (n = 5000: 2^11 buckets).
    directory = after - 56 * n
    assert (2**11 + 1) * 4 <= directory <= (2**11 + 1) * 4 + 256, directory
    assert after < before


# --- prune over the table ------------------------------------------------------------------


def test_prune_with_a_quarantine_record_of_a_pack_no_index_lists(
    run_asyncio, repo_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A quarantine record can outlive its pack (prune deletes packs before the records
    of them: a prune killed in between leaves both). The next prune goes on: the copy
    is no copy of any pack it knows, and the record goes with the pack."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            data = os.urandom(200_000)
            gen = await repo.backup(io.BytesIO(data), name="a", kind="full")
            _meta, table = await store.generation_chunks(gen.id)
            cid = next(CHUNK_RECORD.iter_unpack(table))[0]
            await store.write_quarantine([(cid, os.urandom(32), "id mismatch")])
            await repo.backup(io.BytesIO(os.urandom(100_000)), name="b", kind="full")
            report = await repo.prune()
            assert report.chunks_live > 0
            assert await store.backend.list("quarantine/") == []
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


def test_prune_refuses_when_a_live_chunk_is_in_no_index_object(
    run_asyncio, repo_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Chunks a generation references that no index object lists (mark_live's missing
    ids) are lost chunks as much as those whose copies are all gone: prune changes
    nothing (it would otherwise delete the unindexed packs that may hold them)."""
    from dedupe.errors import MissingObject

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            a = await repo.backup(io.BytesIO(os.urandom(200_000)), name="a", kind="full")
            first_index = set(await store.backend.list("index/"))
            b = await repo.backup(io.BytesIO(os.urandom(200_000)), name="b", kind="full")
            for name in set(await store.backend.list("index/")) - first_index:
                await store.backend.delete(name)  # b's chunks: in packs no index lists
            ids = {}
            for gen in (a, b):
                _meta, table = await store.generation_chunks(gen.id)
                ids[gen.id] = {c for c, _n in CHUNK_RECORD.iter_unpack(table)}
            lost = len(ids[b.id] - ids[a.id])
            assert lost > 1
            before = sorted(await store.backend.list("packs/"))
            with pytest.raises(MissingObject, match=f"^{lost} chunk\\(s\\) .*no copy in any"):
                await repo.prune()
            assert sorted(await store.backend.list("packs/")) == before

    run_asyncio(go())
