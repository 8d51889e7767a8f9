"""How restore cuts a generation's table into windows (`_windows`, engine/restore.py), and
how prune groups the blobs of one pack into ranged reads (`_coalesce`, engine/prune.py):
every blob in exactly one range, in offset order; a range is read through a gap only when
the gap is at most COALESCE_GAP, and never grows past MAX_RANGE unless one blob alone is
larger. (Fewer, longer reads are the point; the bound keeps a read's buffer bounded.)
Restore groups a window's blobs by the same rules natively: tests/store/test_window_plan.py
checks it against the same model on these layouts."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dedupe.engine.prune import COALESCE_GAP as PRUNE_GAP
from dedupe.engine.prune import MAX_RANGE as PRUNE_MAX_RANGE
from dedupe.engine.prune import _coalesce, _Copy
from dedupe.engine.restore import COALESCE_GAP, WINDOW_BYTES, _windows
from dedupe.format.manifest import CHUNK_RECORD

# Blobs laid out one after another with gaps around COALESCE_GAP (as in a pack, where
# dead blobs leave gaps), so that ranges do merge and do reach MAX_RANGE.
blobs = st.lists(
    st.tuples(st.integers(0, 2 * COALESCE_GAP), st.integers(1, 3 * 1024 * 1024)), max_size=40
).map(
    lambda spec: [
        (sum(g + n for g, n in spec[:i]) + gap, stored) for i, (gap, stored) in enumerate(spec)
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3 * WINDOW_BYTES // 4), max_size=60), st.integers(1, 5))
def test_windows_hold_every_record_once_and_stay_bounded(lengths: list[int], pieces: int) -> None:
    """Restore works through a generation's table a window at a time: every record once,
    in order, and no window past WINDOW_BYTES by more than its last chunk (so what a
    window holds in memory stays bounded however long the table)."""
    records = [CHUNK_RECORD.pack(bytes([i % 256]) * 32, n) for i, n in enumerate(lengths)]
    step = max(1, len(records) // pieces)
    table = [b"".join(records[i : i + step]) for i in range(0, len(records), step)]
    windows = [list(CHUNK_RECORD.iter_unpack(w)) for w in _windows(table)]
    assert [cid for w in windows for cid, _n in w] == [r[:32] for r in records]
    assert [n for w in windows for _cid, n in w] == lengths
    for w in windows:
        assert w
        assert sum(n for _cid, n in w) - w[-1][1] < WINDOW_BYTES
    for w in windows[:-1]:
        assert sum(n for _cid, n in w) >= WINDOW_BYTES  # a window ends only when full


@settings(max_examples=300, deadline=None)
@given(blobs)
@example([(0, 100), (100 + PRUNE_GAP, 100)])  # a gap of exactly PRUNE_GAP: read through
@example(
    [(0, PRUNE_MAX_RANGE - 100), (PRUNE_MAX_RANGE - 100, 100)]
)  # exactly PRUNE_MAX_RANGE: one range
def test_prune_ranges_cover_each_blob_once_and_respect_the_bounds(
    spec: list[tuple[int, int]],
) -> None:
    items = [
        (bytes([i % 256]) * 32, _Copy(b"p" * 32, offset, stored, i))
        for i, (offset, stored) in enumerate(spec)
    ]
    ranges = _coalesce(list(reversed(items)))
    grouped = [c for _s, _e, group in ranges for _cid, c in group]
    assert sorted(c.raw for c in grouped) == list(range(len(items)))
    assert [c.offset for c in grouped] == sorted(offset for offset, _n in spec)  # offset order
    for i, (start, end, group) in enumerate(ranges):
        copies = [c for _cid, c in group]
        assert start == copies[0].offset
        assert end == max(c.offset + c.stored for c in copies)
        if len(copies) > 1:
            assert end - start <= PRUNE_MAX_RANGE
        for k in range(1, len(copies)):
            reach = max(c.offset + c.stored for c in copies[:k])
            assert copies[k].offset - reach <= PRUNE_GAP  # read through only small gaps
        if i + 1 < len(ranges):  # a new range only where it had to start
            nxt = ranges[i + 1][2][0][1]
            assert nxt.offset - end > PRUNE_GAP or nxt.offset + nxt.stored - start > PRUNE_MAX_RANGE
