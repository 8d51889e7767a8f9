"""How restore groups the blobs of one pack into ranged reads (engine/restore.py, `_ranges`):
every blob in exactly one range, in offset order; a range is read through a gap only when
the gap is at most COALESCE_GAP, and never grows past MAX_RANGE unless one blob alone is
larger. (Fewer, longer reads are the point; the bound keeps a read's buffer bounded.)"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dedupe.engine.restore import COALESCE_GAP, MAX_RANGE, _ranges

blobs = st.lists(
    st.tuples(
        st.integers(0, 64 * 1024 * 1024),  # offset
        st.integers(1, 3 * 1024 * 1024),  # stored length
    ),
    max_size=40,
    unique_by=lambda b: b[0],
)


@settings(max_examples=300, deadline=None)
@given(blobs)
@example([(0, 100), (100 + COALESCE_GAP, 100)])  # a gap of exactly COALESCE_GAP: read through
@example([(0, MAX_RANGE - 100), (MAX_RANGE - 100, 100)])  # exactly MAX_RANGE: one range
def test_ranges_cover_each_blob_once_and_respect_the_bounds(spec: list[tuple[int, int]]) -> None:
    items = [(bytes([i % 256]) * 32, offset, stored, i) for i, (offset, stored) in enumerate(spec)]
    ranges = list(_ranges(list(items)))
    grouped = [it for _s, _e, group in ranges for it in group]
    assert sorted(grouped, key=lambda it: it[3]) == sorted(items, key=lambda it: it[3])
    assert [it[1] for it in grouped] == sorted(it[1] for it in items)  # offset order
    for i, (start, end, group) in enumerate(ranges):
        after = ranges[i + 1] if i + 1 < len(ranges) else None
        assert start == group[0][1]
        assert end == max(it[1] + it[2] for it in group)
        if len(group) > 1:
            assert end - start <= MAX_RANGE
        for k in range(1, len(group)):
            reach = max(p[1] + p[2] for p in group[:k])
            assert group[k][1] - reach <= COALESCE_GAP  # read through only small gaps
        if after is not None:  # a new range only where it had to start
            nxt = after[2][0]
            assert nxt[1] - end > COALESCE_GAP or nxt[1] + nxt[2] - start > MAX_RANGE
