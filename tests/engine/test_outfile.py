"""OutputFile: a restored stream written with O_DIRECT through an aligned staging buffer,
or the ordinary way where the file system refuses O_DIRECT. Either way the file must hold
exactly the stream's bytes, whatever the sizes of the pieces."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from dedupe.engine import outfile
from dedupe.engine.outfile import ALIGN, OutputFile


def pieces(seed: int, total: int) -> list[bytes]:
    """Pieces of awkward sizes: empty, one byte, a page and a byte, several stagings."""
    rnd = random.Random(seed)
    sizes = [0, 1, ALIGN + 1, 3 * ALIGN, 7]
    out, n = [], 0
    while n < total:
        size = sizes.pop() if sizes else rnd.randrange(1, 5 * ALIGN)
        out.append(rnd.randbytes(size))
        n += size
    return out


def opened_direct(path: Path, staging: int, why: str) -> tuple[int, OutputFile]:
    """A new file at `path` and its OutputFile, writing with O_DIRECT; the test is skipped
    (`why`: what it would have shown) where the file system refuses O_DIRECT at open."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    out = OutputFile(fd, staging)
    if not out.direct:
        out.close()
        os.close(fd)
        pytest.skip(f"this file system refuses O_DIRECT at open: {why}")
    return fd, out


def write_file(path: Path, windows: list[list[bytes]], staging: int) -> OutputFile:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    out = OutputFile(fd, staging)
    try:
        for window in windows:
            assert out.write(window) == sum(map(len, window))
        out.finish()
    finally:
        out.close()
        os.close(fd)
    return out


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("total", [0, 1, ALIGN, 2 * ALIGN + 5, 20 * ALIGN + 3])
def test_the_file_holds_exactly_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, total: int
) -> None:
    if not direct:
        monkeypatch.setattr(outfile, "O_DIRECT", 0)  # as on a system without it
    data = pieces(total, total)
    windows = [data[i : i + 3] for i in range(0, len(data), 3)]
    path = tmp_path / "out"
    out = write_file(path, windows, staging=2 * ALIGN)
    assert path.read_bytes() == b"".join(data)
    assert out.written == len(b"".join(data))
    if not direct:
        assert not out.direct


def test_o_direct_refused_in_the_middle_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that accepts O_DIRECT at open but answers EINVAL to a write: the
    staged bytes and everything after them are written the ordinary way."""
    path = tmp_path / "out"
    fd, out = opened_direct(path, 2 * ALIGN, "nothing to fall back from")
    real_pwrite = os.pwrite
    calls = []

    def pwrite_refusing_the_second(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_refusing_the_second)
    data = pieces(7, 9 * ALIGN + 11)
    try:
        for i in range(0, len(data), 2):
            out.write(data[i : i + 2])
        out.finish()
    finally:
        out.close()
        os.close(fd)
    assert len(calls) == 2  # one O_DIRECT write went through, then buffered only
    assert not out.direct
    assert path.read_bytes() == b"".join(data)


def test_a_write_error_is_raised_not_swallowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    out = OutputFile(fd, staging=ALIGN)

    def disk_full(*_args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", disk_full)
    monkeypatch.setattr(os, "writev", disk_full)
    try:
        with pytest.raises(OSError) as info:
            out.write([bytes(3 * ALIGN)])
            out.finish()
        assert info.value.errno == errno.ENOSPC
    finally:
        out.close()
        os.close(fd)


def test_writev_all_survives_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked (a signal, a socket, a disk filling up), often
    ending inside a part: every byte must still be written once, in order."""
    parts = pieces(13, 2 * 1024 * 1024)
    rnd = random.Random(14)
    real_writev = os.writev
    calls = []

    def short_writev(fd: int, views: list[memoryview]) -> int:
        budget = rnd.randrange(1, sum(map(len, views)) + 1)
        cut = []
        for v in views:
            if budget <= 0:
                break
            cut.append(v[:budget])
            budget -= len(cut[-1])
        calls.append(len(cut))
        return real_writev(fd, cut)

    monkeypatch.setattr(os, "writev", short_writev)
    path = tmp_path / "out"
    with open(path, "wb", buffering=0) as f:
        assert outfile.writev_all(f.fileno(), parts) == sum(map(len, parts))
    assert len(calls) > 1
    assert path.read_bytes() == b"".join(parts)


def test_writev_all_into_a_pipe_read_in_small_pieces() -> None:
    import threading

    parts = pieces(11, 3 * 1024 * 1024)
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 10_000):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        assert outfile.writev_all(w, parts) == sum(map(len, parts))
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == b"".join(parts)


def test_a_restore_to_a_file_object_keeps_what_it_had_buffered_first(tmp_path: Path) -> None:
    import asyncio

    from dedupe.engine.restore import write_to_fileobj

    parts = pieces(12, 200_000)

    async def stream():  # type: ignore[no-untyped-def]
        for i in range(0, len(parts), 5):
            yield parts[i : i + 5]

    path = tmp_path / "out"
    with open(path, "wb") as f:  # a BufferedWriter: written straight to its descriptor
        f.write(b"header:")  # still in f's buffer when the restore starts
        n = asyncio.run(write_to_fileobj(stream(), f))
    assert n == sum(map(len, parts))
    assert path.read_bytes() == b"header:" + b"".join(parts)
