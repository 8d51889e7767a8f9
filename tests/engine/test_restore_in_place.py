"""A restore to a file writes each window with O_DIRECT from the memory it was opened into
(restore.Window.align, OutputFile.write): no copy through the staging buffer but for the
partial blocks at a window's two ends, whatever the chunk sizes make of the windows'
offsets. Should the promised alignment be wrong, the kernel refuses the write (EINVAL)
and the file is still written whole, the ordinary way."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import io
import mmap
import os
import random
from pathlib import Path

import pytest
from conftest import make_repo
from engine.test_outfile import opened_direct

from dedupe.engine import outfile
from dedupe.engine import restore as restore_module
from dedupe.engine.outfile import ALIGN, OutputFile


class _Recording(OutputFile):
    """An OutputFile that remembers its instances, to read their counters afterwards."""

    made: list[OutputFile] = []

    def __init__(self, fd: int, staging: int = outfile.STAGING) -> None:
        super().__init__(fd, staging)
        _Recording.made.append(self)


class _PyBuffer(ctypes.Structure):
    _fields_ = [  # Py_buffer (Include/pybuffer.h)
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def address_of(data: object) -> int:
    """Where a buffer's bytes lie in memory (read-only ones too)."""
    view = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    if get(data, ctypes.byref(view), 0) != 0:
        raise BufferError("no buffer")
    try:
        return view.buf or 0
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


class StrictDevice:
    """os.pwrite as the strictest device would take O_DIRECT: address, offset and length
    all multiples of ALIGN, else EINVAL (kernels differ in what memory they accept). It
    records the direct writes, and can refuse the one numbered `refuse` (from 1) as a
    file system that takes O_DIRECT at open and not for writes."""

    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.direct: list[tuple[int, int, int]] = []  # (inode, offset, length) of each taken
        self.real = os.pwrite

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            return self.real(fd, data, offset)
        n = memoryview(data).nbytes
        if address_of(data) % ALIGN or offset % ALIGN or n % ALIGN:
            raise OSError(errno.EINVAL, "Invalid argument")
        if len(self.direct) + 1 == self.refuse:
            self.refuse = None
            raise OSError(errno.EINVAL, "Invalid argument")
        self.direct.append((os.fstat(fd).st_ino, offset, n))
        return self.real(fd, data, offset)

    def each_block_once(self) -> bool:
        """No two direct writes covered the same bytes of a file."""
        spans = sorted(self.direct)
        return all(
            f != g or a + n <= b for (f, a, n), (g, b, _m) in zip(spans, spans[1:], strict=False)
        )


@pytest.fixture
def strict_device(monkeypatch: pytest.MonkeyPatch) -> StrictDevice:
    device = StrictDevice()
    monkeypatch.setattr(os, "pwrite", device.pwrite)
    return device


def test_a_restored_file_is_written_from_where_its_windows_lie(
    run,
    tmp_path: Path,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    strict_device: StrictDevice,
) -> None:  # type: ignore[no-untyped-def]
    """Content-defined chunks end anywhere, so the windows (256 KiB here) start at every
    kind of offset: each must still go to the file in place."""
    fd, probe = opened_direct(tmp_path / "probe", ALIGN, "nothing is written in place")
    probe.close()
    os.close(fd)
    rnd = random.Random(5)
    data = rnd.randbytes(3_000_000) + bytes(500_000) + rnd.randbytes(1_234_567)
    monkeypatch.setattr(restore_module, "WINDOW_BYTES", 256 * 1024)
    monkeypatch.setattr(restore_module, "OutputFile", _Recording)
    _Recording.made = []

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = (await repo.backup(io.BytesIO(data), name="s")).id
            await repo.restore(gen, tmp_path / "out")

    run(go())
    assert (tmp_path / "out").read_bytes() == data
    (out,) = _Recording.made
    assert not out.refused  # every write taken: the in-place ones were aligned
    assert strict_device.each_block_once()
    windows = -(-len(data) // (256 * 1024))
    # Per window at most two partial blocks are copied; the rest went in place.
    assert out.in_place >= len(data) - 2 * ALIGN * windows
    assert out.in_place > 0.9 * len(data)


def _aligned_window(data: bytes, stream_offset: int, lead: int | None = None) -> memoryview:
    """`data` in page-aligned memory, starting `lead` bytes in (by default where an
    address has the alignment of `stream_offset`), as restore lays a window out."""
    lead = stream_offset % ALIGN if lead is None else lead
    block = mmap.mmap(-1, lead + len(data) + 1)
    block[lead : lead + len(data)] = data
    return memoryview(block)[lead : lead + len(data)]


def _write_windows(path: Path, off_by: int | None) -> tuple[bytes, int, OutputFile]:
    """Windows that promise alignment between ordinary pieces of awkward sizes, written to
    a new file at `path` with O_DIRECT: the stream, the bytes the windows' whole blocks
    hold, and the (closed) OutputFile."""
    fd, out = opened_direct(path, 4 * ALIGN, "nothing is written in place")
    rnd = random.Random(11)
    # Nine sizes, so that each is a window in one round and an ordinary piece in another.
    sizes = [3 * ALIGN + 5, 7, 2 * ALIGN, ALIGN - 1, 9 * ALIGN + 100, 1, 5 * ALIGN, 4097, 8193]
    expected = bytearray()
    in_blocks = 0
    try:
        for i, size in enumerate(sizes * 3):
            piece = rnd.randbytes(size)
            if i % 2:  # a window, laid out as restore lays it (or one byte off)
                lead = None if off_by is None else (len(expected) + off_by) % ALIGN
                out.write([_aligned_window(piece, len(expected), lead)], ALIGN)
                if size >= 2 * ALIGN:  # smaller windows are staged whole
                    head = -len(expected) % ALIGN
                    in_blocks += (size - head) // ALIGN * ALIGN
            else:
                out.write([piece])
            expected += piece
        out.finish()
    finally:
        out.close()
        os.close(fd)
    return bytes(expected), in_blocks, out


@pytest.mark.parametrize("off_by", [None, 1], ids=["aligned", "promise_broken"])
def test_windows_written_in_place_among_ordinary_writes(
    tmp_path: Path, off_by: int | None, strict_device: StrictDevice
) -> None:
    """Every whole block of a window goes in place, and each block is written once. A
    broken promise (each window one byte off) is refused and written buffered."""
    path = tmp_path / "out"
    expected, in_blocks, out = _write_windows(path, off_by)
    assert path.read_bytes() == expected
    if off_by is None:
        assert out.in_place == in_blocks and not out.refused
        assert strict_device.each_block_once()
    else:
        assert out.in_place == 0 and out.refused  # refused, then buffered


@pytest.mark.parametrize("refuse", range(1, 8))
def test_o_direct_refused_at_any_write_among_windows(
    tmp_path: Path, strict_device: StrictDevice, refuse: int
) -> None:
    """Whichever direct write the file system refuses (a staged block before a window, a
    window's blocks, a partial block after one), the file holds exactly the stream."""
    strict_device.refuse = refuse
    path = tmp_path / "out"
    expected, _in_blocks, out = _write_windows(path, None)
    assert path.read_bytes() == expected
    assert out.refused and len(strict_device.direct) == refuse - 1
