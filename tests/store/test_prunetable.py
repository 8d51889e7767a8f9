"""The native prune table (csrc/prunetable.c) against prune's rules written out in Python.

The model below is the rule set prune applied with dicts and sets before the table
existed (dedupe/engine/prune.py states it): every decision the table takes is compared
with the model's on random repositories, with ids drawn from a small pool (so that a
chunk has several copies, in one pack or several), ids made to share their leading bits
(one bucket holding many), and runs of one id longer than the table's pairwise limit.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe.format.index import ENTRY_RECORD
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store._prunetable import NO_NUMBER, RECORD_BYTES, PruneTable


@dataclass
class Case:
    pack_ids: list[bytes]  # global number -> pack id
    lengths: list[int]
    objects: list[tuple[list[int], list[tuple[bytes, int, int, int, int]]]]  # map, entries
    gone: set[int]
    quarantined: set[tuple[bytes, int]]
    live: list[bytes]  # chunk table ids, repeats allowed
    stale: set[int]

    def entries(self) -> list[tuple[bytes, int, int, int, int, int]]:
        """(id, global pack, offset, stored, raw, seq), in the order added."""
        out = []
        for pack_map, ents in self.objects:
            for cid, local, off, stored, raw in ents:
                out.append((cid, pack_map[local], off, stored, raw, len(out)))
        return out


def make_case(rnd: random.Random, *, shared_prefix: bool = False, long_runs: bool = False) -> Case:
    packs = rnd.randint(1, 6)
    pack_ids = [os.urandom(32) for _ in range(packs)]
    prefix = os.urandom(4)
    pool = [
        (prefix + os.urandom(28)) if shared_prefix and rnd.random() < 0.7 else os.urandom(32)
        for _ in range(rnd.randint(1, 40))
    ]
    # Small stored sizes and pack lengths make ties in the choice (the same live fraction
    # in two packs) common, so that the tie-breaks are exercised.
    small = rnd.random() < 0.5
    objects = []
    for _ in range(rnd.randint(1, 4)):
        local = rnd.sample(range(packs), rnd.randint(1, packs))
        ents = []
        for _ in range(rnd.randint(0, 60)):
            ents.append(
                (
                    rnd.choice(pool[:2] if long_runs and rnd.random() < 0.6 else pool),
                    rnd.randrange(len(local)),
                    rnd.randrange(1 << 20),
                    rnd.randint(1, 3) if small else rnd.randint(1, 5000),
                    rnd.randint(1, 9000),
                )
            )
        objects.append((local, ents))
    case = Case(
        pack_ids,
        [
            rnd.choice([0, 1, 10, 10] if small else [0, 1, rnd.randint(2, 10**6)])
            for _ in range(packs)
        ],
        objects,
        set(),
        set(),
        [],
        set(),
    )
    every = case.entries()
    case.gone = {p for p in range(packs) if rnd.random() < 0.2}
    for cid, pack, *_ in every:
        if rnd.random() < 0.1:
            case.quarantined.add((cid, pack))
    ids = sorted({e[0] for e in every})
    case.live = [rnd.choice(ids) for _ in range(rnd.randint(0, 2 * len(ids)))] if ids else []
    case.stale = {p for p in range(packs) if rnd.random() < 0.3}
    return case


class Model:
    """prune's rules over the case, with Python containers."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.every = case.entries()
        self.bad: set[tuple[bytes, int, int, int, int]] = set()  # entries that did not open
        self.checked: set[int] = set()  # entries (by seq) handed out for a check
        self.live = set(case.live)

    def usable(self, e: tuple[bytes, int, int, int, int, int]) -> bool:
        cid, pack = e[0], e[1]
        return (
            pack not in self.case.gone
            and (cid, pack) not in self.case.quarantined
            and e[:5] not in self.bad
        )

    def copies(self, cid: bytes) -> list[tuple[bytes, int, int, int, int, int]]:
        return [e for e in self.every if e[0] == cid and self.usable(e)]

    def live_bytes(self) -> list[int]:
        out = [0] * len(self.case.pack_ids)
        for cid in self.live:
            seen: set[int] = set()
            for e in self.copies(cid):
                if e[1] not in seen:
                    seen.add(e[1])
                    out[e[1]] += e[3]
        return out

    def preference(self, live_bytes: list[int], p: int) -> tuple[bool, float, bytes]:
        case = self.case
        return (p not in case.stale, live_bytes[p] / max(1, case.lengths[p]), case.pack_ids[p])

    def choose(self, live_bytes: list[int]) -> dict[bytes, tuple[bytes, int, int, int, int, int]]:
        return {
            cid: max(self.copies(cid), key=lambda e: self.preference(live_bytes, e[1]))
            for cid in self.live
            if self.copies(cid)
        }

    def rank(self, live_bytes: list[int]) -> list[int]:
        """The order of packs prune hands the table."""
        order = sorted(range(len(self.case.pack_ids)), key=lambda p: self.preference(live_bytes, p))
        out = [0] * len(order)
        for r, p in enumerate(order):
            out[p] = r
        return out

    def to_check(self, chose: dict[bytes, tuple[bytes, int, int, int, int, int]]) -> list[tuple]:
        """Chosen copies not handed out yet whose id has a usable entry naming other bytes."""
        return sorted(
            e[:5]
            for cid, e in chose.items()
            if e[5] not in self.checked and any(c[1:5] != e[1:5] for c in self.copies(cid))
        )

    def absent(self) -> list[bytes]:
        ids = {e[0] for e in self.every}
        return [cid for cid in self.case.live if cid not in ids]


def build(case: Case) -> PruneTable:
    table = PruneTable(len(case.pack_ids))
    for pack_map, ents in case.objects:
        table.add(b"".join(ENTRY_RECORD.pack(*e) for e in ents), pack_map)
    table.sort()
    gone = bytes(p in case.gone for p in range(len(case.pack_ids)))
    table.unusable_packs(gone)
    for cid, pack in case.quarantined:
        table.set_unusable(cid, pack)
    return table


def records(data: bytes) -> list[tuple[bytes, int, int, int, int]]:
    return list(ENTRY_RECORD.iter_unpack(data))


def check_against_model(case: Case, rnd: random.Random) -> None:
    model = Model(case)
    table = build(case)
    assert len(table) == len(model.every)
    assert table.ids() == len({e[0] for e in model.every})

    missing = table.mark_live(b"".join(CHUNK_RECORD.pack(cid, 1) for cid in case.live))
    assert [missing[i : i + 32] for i in range(0, len(missing), 32)] == model.absent()
    present_ids = {e[0] for e in model.every}
    assert table.live_ids() == len(model.live & present_ids)

    live_bytes = table.live_bytes()
    assert live_bytes == model.live_bytes()
    n = len(case.pack_ids)
    chose = model.choose(live_bytes)
    no_copy, first = table.choose(model.rank(live_bytes))
    lost = sorted(cid for cid in model.live & present_ids if cid not in chose)
    assert no_copy == len(lost)
    assert first == (lost[0] if lost else None)

    # Duplicate checks: the chosen copies of ids with another usable entry naming other
    # bytes (another pack, or another place in the same pack), each handed out once; a bad
    # one is dropped, that entry alone, and the choice made again.
    for _round in range(4):
        handed = records(table.unchecked(1)) + records(table.unchecked(10_000))
        assert sorted(handed) == model.to_check(chose)
        model.checked |= {e[5] for e in chose.values() if e[:5] in set(handed)}
        assert table.unchecked(10_000) == b""
        if not handed:
            break
        bad = handed[rnd.randrange(len(handed))]
        model.bad.add(bad)
        assert table.set_unusable(bad[0], bad[1], *bad[2:]) >= 1
        chose = model.choose(live_bytes)
        table.choose(model.rank(live_bytes))

    used, blobs = table.usage()
    want_used = [0] * n
    for e in chose.values():
        want_used[e[1]] += e[3]
    assert used == want_used
    want_blobs = [len({e[0] for e in model.every if e[1] == p}) for p in range(n)]
    assert blobs == want_blobs

    moving_packs = {p for p in range(n) if rnd.random() < 0.5}
    moving, total = table.moving(bytes(p in moving_packs for p in range(n)))
    want_moving = sorted(
        (e for e in chose.values() if e[1] in moving_packs), key=lambda e: (e[1], e[2], e[5])
    )
    assert records(moving) == [e[:5] for e in want_moving]
    assert total == sum(e[3] for e in want_moving)

    kept = [p for p in range(n) if p not in moving_packs and rnd.random() < 0.7]
    numbers = [NO_NUMBER] * n
    for i, p in enumerate(kept):
        numbers[p] = i
    want_kept = []
    for cid in sorted(present_ids):
        if cid in model.live:
            e = chose.get(cid)
            if e is not None and e[1] in kept:
                want_kept.append((cid, numbers[e[1]], e[2], e[3], e[4]))
        else:
            for e in model.copies(cid):
                if e[1] in kept:
                    want_kept.append((cid, numbers[e[1]], e[2], e[3], e[4]))
                    break
    assert records(table.kept(numbers)) == want_kept
    assert table.kept_count(numbers) == len(want_kept)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_every_decision_is_prunes_rule(seed: int, shared_prefix: bool, long_runs: bool) -> None:
    check_against_model(
        make_case(random.Random(seed), shared_prefix=shared_prefix, long_runs=long_runs),
        random.Random(seed + 1),
    )


def test_one_id_listed_thousands_of_times() -> None:
    """A run far past the pairwise limit (16) is counted by sorting: still once per pack."""
    cid, other = os.urandom(32), os.urandom(32)
    ents = [(cid, i % 3, i, 10 + i % 3, 20) for i in range(5000)] + [(other, 1, 0, 7, 9)]
    table = PruneTable(3)
    table.add(b"".join(ENTRY_RECORD.pack(*e) for e in ents), [0, 1, 2])
    table.sort()
    table.set_unusable(cid, 0)
    assert table.mark_live(CHUNK_RECORD.pack(cid, 1) * 3) == b""
    assert table.live_bytes() == [0, 11, 12]  # pack 0's copies are unusable
    assert table.ids() == 2 and table.live_ids() == 1
    assert table.choose([0, 1, 2]) == (0, None)
    used, blobs = table.usage()
    assert used == [0, 0, 12]  # pack 2's first copy: the earliest of the best pack
    assert blobs == [1, 2, 1]
    assert records(table.moving(b"\0\0\1")[0]) == [(cid, 2, 2, 12, 20)]


def test_ids_made_to_share_their_leading_bits() -> None:
    """A writer can choose index entries' ids: a bucket holding thousands is sorted and
    searched as well as one holding four."""
    prefix = os.urandom(8)
    ids = sorted({prefix + os.urandom(24) for _ in range(3000)})
    rnd = random.Random(5)
    shuffled = ids[:]
    rnd.shuffle(shuffled)
    table = PruneTable(1)
    table.add(b"".join(ENTRY_RECORD.pack(cid, 0, i, 1, 1) for i, cid in enumerate(shuffled)), [0])
    table.sort()
    assert records(table.kept([0]))[0][0] == ids[0]
    assert [r[0] for r in records(table.kept([0]))] == ids
    stranger = prefix + os.urandom(24)
    missing = table.mark_live(b"".join(CHUNK_RECORD.pack(c, 1) for c in ids[::7] + [stranger]))
    assert missing == stranger
    assert table.live_ids() == len(ids[::7])


def test_memory_is_the_entries_and_a_small_directory() -> None:
    n = 100_000
    table = PruneTable(2)
    table.add(b"".join(ENTRY_RECORD.pack(os.urandom(32), i % 2, i, 1, 1) for i in range(n)), [0, 1])
    table.sort()
    assert table.memory_bytes() <= n * (56 + 4) + 4096


def test_bad_input_is_refused() -> None:
    table = PruneTable(2)
    one = ENTRY_RECORD.pack(os.urandom(32), 1, 0, 1, 1)
    with pytest.raises(ValueError, match="pack table"):
        table.add(one, [0])  # local pack 1, but the object lists one pack
    with pytest.raises(ValueError, match="pack table"):
        table.add(one, [0, 2])  # maps to global 2 of 2 packs
    with pytest.raises(ValueError, match="whole"):
        table.add(one[:-1], [0, 1])
    assert len(table) == 0
    with pytest.raises(RuntimeError, match="out of order"):
        table.mark_live(CHUNK_RECORD.pack(os.urandom(32), 1))
    table.add(one, [0, 1])
    table.sort()
    with pytest.raises(RuntimeError, match="out of order"):
        table.add(one, [0, 1])
    with pytest.raises(ValueError, match="whole"):
        table.mark_live(b"x" * (CHUNK_RECORD.size + 1))
    with pytest.raises(ValueError, match="packs"):
        table.choose([0])
    with pytest.raises(ValueError):
        table.set_unusable(os.urandom(32), 2)
    assert RECORD_BYTES == ENTRY_RECORD.size == 48
    assert struct.calcsize("<32sIIII") == RECORD_BYTES
