"""MapReader: a regular file read as mapped windows that the chunker slices in place.

The risk of a mapping is SIGBUS when the file shrinks under it; the reader must turn that
into zeros plus a `torn` flag for its own windows, and leave every other fault alone."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dedupe.chunking import DEFAULT_PARAMS, Block, Chunker, MapReader, gear_table

GEAR = gear_table(bytes(32))
PAGE = os.sysconf("SC_PAGESIZE")


def windows_of(path: Path, size: int) -> list[Block]:
    reader = MapReader(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        while (block := reader.read(fd)) is not None:
            assert isinstance(block, Block)
            out.append(block)
        return out
    finally:
        os.close(fd)  # a mapping outlives its descriptor


def test_reads_the_whole_file_in_windows(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(1_000_003)
    path = tmp_path / "f"
    path.write_bytes(data)
    got = windows_of(path, 16 * PAGE)
    assert b"".join(bytes(memoryview(b)) for b in got) == data
    assert [len(b) for b in got[:-1]] == [16 * PAGE] * (len(got) - 1)  # short only at the end
    assert all(b.reader is not None for b in got)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert windows_of(empty, PAGE) == []


def test_rejects_what_it_cannot_map(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="page size"):
        MapReader(PAGE + 1)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="regular files"):
            MapReader(PAGE).read(r)
    finally:
        os.close(r)
        os.close(w)


def test_windows_are_sliced_in_place_and_cut_as_bytes_are(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    mapped = Chunker(DEFAULT_PARAMS, GEAR)
    lengths = []
    for n, window in enumerate(windows_of(path, 1 << 20)):
        chunks = mapped.feed(window)
        # Slices of the window itself, not copies; only a chunk straddling the previous
        # window (the first of a later feed) is joined into a buffer of its own.
        assert all(c.obj is window for c in chunks[1 if n else 0 :])
        lengths += [len(c) for c in chunks]
    lengths += [len(c) for c in mapped.finish()]
    expected = [len(c) for c in Chunker(DEFAULT_PARAMS, GEAR).chunk_all(data)]
    assert lengths == expected


def test_a_window_whose_file_shrank_reads_zeros_and_tears_the_reader(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(3 << 20)
    path = tmp_path / "f"
    path.write_bytes(data)
    reader = MapReader(1 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        windows = []
        while (block := reader.read(fd)) is not None:
            windows.append(block)
    finally:
        os.close(fd)
    assert not reader.torn
    cut = (1 << 20) + 5000  # inside the second window, not on a page boundary
    os.truncate(path, cut)
    # The pages past the new end are gone: touching them would be SIGBUS without the
    # handler. The process lives, and the reader says its windows cannot be trusted.
    got = b"".join(bytes(memoryview(b)) for b in windows)
    assert reader.torn
    assert len(got) == len(data)
    last_page = cut - cut % PAGE + PAGE  # bytes up to the end of the cut page survive
    assert got[:cut] == data[:cut]
    assert got[last_page:] == bytes(len(data) - last_page)


def test_windows_past_the_slot_table_are_read_by_copy(tmp_path: Path) -> None:
    """More windows alive at once than the native table holds: the rest are read with
    pread into ordinary blocks, byte for byte the same."""
    pages = 300  # DDP_MAP_SLOTS is 256
    data = random.Random(5).randbytes(pages * PAGE)
    path = tmp_path / "f"
    path.write_bytes(data)
    windows = windows_of(path, PAGE)
    assert b"".join(bytes(memoryview(b)) for b in windows) == data
    mapped = [b.reader is not None for b in windows]
    assert mapped[0] and not mapped[-1]


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


FOREIGN_FAULT = """
    import mmap, os, sys
    {setup}
    from dedupe.chunking import MapReader
    MapReader(os.sysconf("SC_PAGESIZE"))  # installs the SIGBUS handler
    path = {path!r}
    with open(path, "wb") as f:
        f.write(b"x" * 65536)
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)  # not a MapReader window
    os.truncate(path, 0)
    print("touching", flush=True)
    m[40000]
    print("survived", flush=True)
"""


@pytest.mark.parametrize("faulthandler_first", [False, True])
def test_a_fault_outside_its_windows_still_ends_the_process(
    tmp_path: Path, faulthandler_first: bool
) -> None:
    """The handler claims only faults in its own windows: any other SIGBUS ends the
    process as before, through the handler installed before it (faulthandler's traceback)
    or the default action."""
    setup = "import faulthandler; faulthandler.enable()" if faulthandler_first else ""
    done = _child(FOREIGN_FAULT.format(setup=setup, path=str(tmp_path / "foreign")))
    assert done.returncode == -signal.SIGBUS, done
    assert "touching" in done.stdout and "survived" not in done.stdout
    if faulthandler_first:
        assert "Bus error" in done.stderr
