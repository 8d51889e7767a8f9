"""How restore splits the blobs of one ranged read into executor jobs (`split_by_bytes`,
engine/restore.py): every blob once, in order, in consecutive runs, each closed as soon as
its stored bytes reach the batch size and not before (so that every worker thread gets a
share of a large range, and no job holds much more than the batch)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from dedupe.engine.restore import split_by_bytes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 3000), max_size=60), st.integers(1, 5000))
@example([100, 100], 100)  # a blob that reaches the batch size exactly closes it
@example([99, 5], 100)  # one byte short: not closed yet
@example([100, 99, 5], 100)  # so for every batch, not only the first
def test_decode_batches_hold_every_blob_once_and_close_at_the_batch_size(
    stored: list[int], batch: int
) -> None:
    items = [(bytes([i % 256]) * 32, 8 + 10 * i, n, 2 * n + 1) for i, n in enumerate(stored)]
    parts = list(split_by_bytes(items, batch))
    assert [it for part in parts for it in part] == items
    for k, part in enumerate(parts):
        sizes = [it[2] for it in part]
        assert part and sum(sizes[:-1]) < batch  # not closed before it reached the size
        if k + 1 < len(parts):
            assert sum(sizes) >= batch  # closed once it did
