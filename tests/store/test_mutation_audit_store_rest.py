"""Mutation audit of dedupe/store/packer.py, readbuffers.py and tables.py (issue 12, the
rest of store/). Each test names the property it pins and the mutant(s) it was shown red
on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

from typing import Any

import pytest

from dedupe.hashing import ChunkHasher
from dedupe.store import PackWriter
from dedupe.store import packer as packer_module
from dedupe.store.blobs import BlobCodec, PyFramedBatch

HASHER = ChunkHasher(bytes(range(32)))


def test_a_pack_writer_that_raised_never_finishes_its_half_built_pack() -> None:
    """A batch fails part-way through sealing (its second blob has no id): the first blob
    is already in the pack being built. From then on the writer refuses: neither flush()
    nor add() hands out that half-built pack or seals more into it.

    Property: a PackWriter that raised stays failed (its contract), so a pack missing
    blobs its caller believes stored is never written (integrity, no data loss).
    Killed: PackWriter.add forgetting the failure (`self._failed = None`)."""
    codec = BlobCodec(1, HASHER, native=False)
    writer = PackWriter(1 << 20)
    chunks = [b"first chunk " * 100, b"second chunk " * 100]
    batch = codec.frame(chunks, HASHER.chunk_ids(chunks))
    assert isinstance(batch, PyFramedBatch)
    batch.ids = batch.ids[:1]  # the second blob's id is missing: sealing it fails
    with pytest.raises(IndexError):
        writer.add(batch)
    assert batch.next == 1  # the first blob was sealed into the pack being built
    with pytest.raises(RuntimeError):
        writer.flush()
    good = codec.frame(chunks, HASHER.chunk_ids(chunks))
    with pytest.raises(RuntimeError):
        writer.add(good)
    assert good.pending == len(chunks)  # nothing more was sealed


def test_a_failed_packwriter_refuses_an_empty_batch_too(monkeypatch: pytest.MonkeyPatch) -> None:
    writer = PackWriter(64 * 1024)

    def broken(*args: Any) -> int:
        raise MemoryError

    monkeypatch.setattr(packer_module, "seal_batch", broken)
    with pytest.raises(MemoryError):
        writer.fill(PyFramedBatch([bytes(32)], [b"x" * 100], [100]))
    with pytest.raises(RuntimeError, match="failed earlier"):
        writer.flush()
    with pytest.raises(RuntimeError, match="failed earlier"):
        writer.add(PyFramedBatch([], [], []))
