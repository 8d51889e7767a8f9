"""BlockReader: a file read into reusable blocks that the chunker slices without a copy.
A block must never change under anyone who still refers to it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dedupe.chunking import DEFAULT_PARAMS, Block, BlockReader, Chunker, gear_table

GEAR = gear_table(bytes(32))


def blocks_of(path: Path, size: int, keep: int = 8) -> list[bytes]:
    reader = BlockReader(size, keep)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        while (block := reader.read(fd)) is not None:
            assert isinstance(block, Block)
            out.append(bytes(memoryview(block)))
        return out
    finally:
        os.close(fd)


def test_reads_the_whole_file_in_blocks(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(1_000_003)
    path = tmp_path / "f"
    path.write_bytes(data)
    got = blocks_of(path, 65536)
    assert b"".join(got) == data
    assert [len(b) for b in got[:-1]] == [65536] * (len(got) - 1)  # short only at the end
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert blocks_of(empty, 4096) == []


def test_a_block_in_use_is_never_rewritten(tmp_path: Path) -> None:
    """Chunks (and any memoryview) keep their block: the reader takes fresh blocks instead,
    and reuses one only once everything that referred to it is gone."""
    rnd = random.Random(2)
    data = rnd.randbytes(40 * 65536)
    path = tmp_path / "f"
    path.write_bytes(data)
    reader = BlockReader(65536, keep=2)
    chunker = Chunker(DEFAULT_PARAMS, GEAR)
    fd = os.open(path, os.O_RDONLY)
    kept: list[tuple[memoryview, bytes]] = []
    seen_ids = set()
    try:
        while (block := reader.read(fd)) is not None:
            seen_ids.add(id(block))
            for chunk in chunker.feed(block):
                assert chunk.readonly
                if rnd.random() < 0.3:  # hold on to some chunks, drop the rest
                    kept.append((chunk, bytes(chunk)))
            del block
        for chunk in chunker.finish():
            kept.append((chunk, bytes(chunk)))
    finally:
        os.close(fd)
    assert kept
    for chunk, copy in kept:
        assert bytes(chunk) == copy  # not one byte changed under a live chunk
    # Blocks were reused (fewer distinct blocks than reads) while chunks were dropped.
    assert len(seen_ids) < 40


def test_blocks_are_sliced_in_place_and_cut_as_bytes_are(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    reader = BlockReader(1 << 20)
    from_blocks = Chunker(DEFAULT_PARAMS, GEAR)
    lengths = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while (block := reader.read(fd)) is not None:
            chunks = from_blocks.feed(block)
            # No copy: apart from a chunk that straddles two blocks, chunks view the block.
            assert all(c.obj is block for c in chunks[1:])
            if len(block) == 1 << 20:
                assert chunks[-1].obj is block
            lengths += [len(c) for c in chunks]
    finally:
        os.close(fd)
    lengths += [len(c) for c in from_blocks.finish()]
    whole = Chunker(DEFAULT_PARAMS, GEAR).chunk_all(data)
    assert lengths == [len(c) for c in whole]


def test_read_errors_are_oserrors(tmp_path: Path) -> None:
    reader = BlockReader(4096)
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: read() fails with EISDIR
    try:
        with pytest.raises(IsADirectoryError):
            reader.read(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        reader.read(10_000)  # not an open descriptor
    with pytest.raises(ValueError):
        BlockReader(0)
