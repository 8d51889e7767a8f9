"""The local backend writes large objects around the page cache (dedupe/backends/_direct.py):
the bytes read back are exactly those written, whatever their length and however they
arrive; the aligned blocks really go direct; a file system that refuses direct I/O, at
once or midway, still gets every byte; a full disk is a clear error that leaves nothing."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import mmap
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from dedupe.backends import LocalBackend, _direct
from dedupe.backends._direct import ALIGN, DIRECT_MIN, STAGE_SIZE
from dedupe.errors import BackendError

MiB = 1 << 20
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1,
         STAGE_SIZE, STAGE_SIZE + ALIGN - 1, 2 * STAGE_SIZE + 17]  # fmt: skip


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(".tmp-*")]


class PwriteSpy:
    """Records every os.pwrite (offset, length, whether the descriptor had O_DIRECT) and
    can make a direct one fail with EINVAL, as a device with larger blocks would."""

    def __init__(self, fail_direct_at: int | None = None) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.fail_direct_at = fail_direct_at
        self._pwrite = os.pwrite

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if direct and self.fail_direct_at is not None and offset >= self.fail_direct_at:
            raise OSError(errno.EINVAL, "Invalid argument")
        n = self._pwrite(fd, data, offset)
        self.calls.append((offset, n, direct))
        return n


@pytest.mark.parametrize("direct", [True, False])
def test_objects_read_back_exactly(tmp_path: Path, direct: bool) -> None:
    backend = LocalBackend(tmp_path / "store", direct_io=direct)
    rnd = random.Random(1)

    async def go() -> None:
        for n in SIZES:
            data = rnd.randbytes(n)
            await backend.put(f"packs/ab/{n}", data)
            assert await backend.get(f"packs/ab/{n}") == data, n
        # A stream of parts of any lengths (a manifest spilled as it is made), some empty.
        parts = [rnd.randbytes(rnd.choice([0, 1, 4095, 70_000, 3 * MiB])) for _ in range(9)]
        await backend.put_stream("generations/g", iter(parts))
        assert await backend.get("generations/g") == b"".join(parts)

    asyncio.run(go())
    assert backend.direct_io is direct
    assert _leftovers(tmp_path) == []


def test_aligned_blocks_go_direct_and_the_end_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every whole block of a large object is written with O_DIRECT, from the aligned
    staging buffer, at aligned offsets; only the unaligned end goes through the cache. A
    small object never goes direct."""
    spy = PwriteSpy()
    monkeypatch.setattr(os, "pwrite", spy)
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    size = 2 * STAGE_SIZE + 3 * ALIGN + 17
    data = random.Random(2).randbytes(size)
    asyncio.run(backend.put("packs/ab/big", data))
    assert (tmp_path / "store/packs/ab/big").read_bytes() == data
    direct = [(o, n) for o, n, d in spy.calls if d]
    cached = [(o, n) for o, n, d in spy.calls if not d]
    assert sum(n for _, n in direct) == size - 17
    assert all(o % ALIGN == 0 and n % ALIGN == 0 for o, n in direct)
    assert cached == [(size - 17, 17)]

    spy.calls.clear()
    asyncio.run(backend.put("keymaps/small", data[: DIRECT_MIN - 1]))
    assert not any(d for _, _, d in spy.calls)


def test_a_file_system_that_refuses_direct_io(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fcntl refuses O_DIRECT (as some file systems do): the object is written the
    ordinary way and the backend stops asking."""
    set_direct = _direct.set_direct
    monkeypatch.setattr(_direct, "set_direct", lambda fd, on: False if on else set_direct(fd, on))
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    data = random.Random(3).randbytes(3 * MiB + 5)
    asyncio.run(backend.put("packs/ab/x", data))
    assert (tmp_path / "store/packs/ab/x").read_bytes() == data
    assert backend.direct_io is False


def test_a_direct_write_refused_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first blocks go direct, then a direct write fails with EINVAL: nothing of that
    block was written, so the rest goes through the cache from there, and the file holds
    every byte in order."""
    spy = PwriteSpy(fail_direct_at=STAGE_SIZE)
    monkeypatch.setattr(os, "pwrite", spy)
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    data = random.Random(4).randbytes(3 * STAGE_SIZE + 99)
    asyncio.run(backend.put("packs/ab/x", data))
    assert (tmp_path / "store/packs/ab/x").read_bytes() == data
    assert [d for _, _, d in spy.calls][:1] == [True] and not any(d for _, _, d in spy.calls[1:])
    assert backend.direct_io is False


def test_direct_io_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEDUPE_DIRECT_IO", "0")
    assert LocalBackend(tmp_path).direct_io is False
    monkeypatch.delenv("DEDUPE_DIRECT_IO")
    assert LocalBackend(tmp_path).direct_io is True


_FULL_DISK = """
import asyncio, resource, sys
from dedupe.backends import LocalBackend
from dedupe.errors import BackendError
resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
backend = LocalBackend(sys.argv[1], direct_io=True)
try:
    asyncio.run(backend.put("packs/ab/x", bytes(5 << 20)))
except BackendError as e:
    print("BackendError:", e)
"""


def test_a_full_disk_during_a_direct_write(tmp_path: Path) -> None:
    """The file system stops the write midway (a file size limit, RLIMIT_FSIZE, fails it
    with EFBIG as a full disk fails it with ENOSPC): a BackendError, no object and no
    temporary file."""
    root = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BackendError:"), proc.stdout
    assert "too large" in proc.stdout.lower()
    assert not (root / "packs/ab/x").exists()
    assert _leftovers(tmp_path) == []


def test_staging_buffers_are_kept_few(tmp_path: Path) -> None:
    """Concurrent large writes each take a staging buffer; at most a couple are kept
    afterwards, so memory does not grow with the number of threads that ever wrote."""
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    data = bytes(DIRECT_MIN + 1)

    async def go() -> None:
        await asyncio.gather(*(backend.put(f"packs/ab/{i}", data) for i in range(6)))

    asyncio.run(go())
    assert len(_direct._stages) <= _direct._STAGES_KEPT


def _is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


@pytest.fixture
def fresh_pool(monkeypatch: pytest.MonkeyPatch) -> list[mmap.mmap]:
    pool: list[mmap.mmap] = []
    monkeypatch.setattr(_direct, "_stages", pool)
    return pool


def test_a_small_stream_is_written_the_ordinary_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream of parts (put_stream: manifests) that ends before DIRECT_MIN bytes never
    turns direct I/O on: a small manifest costs no staging copy of its own to the device
    and no fcntl; one that reaches DIRECT_MIN goes direct from there."""
    spy = PwriteSpy()
    monkeypatch.setattr(os, "pwrite", spy)
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    asyncio.run(backend.put_stream("generations/small", iter([b"tiny", bytes(5000)])))
    assert (tmp_path / "store/generations/small").read_bytes() == b"tiny" + bytes(5000)
    assert spy.calls and not any(d for _, _, d in spy.calls)
    spy.calls.clear()
    big = [bytes(700_000), bytes(700_000)]  # reaches DIRECT_MIN at its end
    asyncio.run(backend.put_stream("generations/big", iter(big)))
    assert (tmp_path / "store/generations/big").read_bytes() == b"".join(big)
    assert any(d for _, _, d in spy.calls)


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT")
def test_a_full_disk_with_a_full_staging_pool_is_a_backend_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_pool: list[mmap.mmap]
) -> None:
    """Two other large writes gave their staging buffers back while this one was under
    way (three concurrent puts; test_direct_io.py's own test makes six), so the pool is
    full when this one, failing, gives its buffer back."""
    fresh_pool.extend(mmap.mmap(-1, STAGE_SIZE) for _ in range(_direct._STAGES_KEPT + 1))
    real = os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    with pytest.raises(BackendError, match="no space left"):
        asyncio.run(backend.put("packs/ab/x", bytes(2 * MiB + 5)))
    assert not list((tmp_path / "store").rglob(".tmp-*"))


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT")
def test_a_refusal_is_not_undone_by_a_concurrent_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_pool: list[mmap.mmap]
) -> None:
    """A file system that refuses direct writes of some objects only: put A (on its own
    thread) goes direct and is slow, put B is refused meanwhile and turns direct I/O off;
    A then finishes and turns it back on."""
    real = os.pwrite
    a_writing, b_done = threading.Event(), threading.Event()

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if _is_direct(fd) and threading.current_thread() is a:
            a_writing.set()
            assert b_done.wait(30)
        elif _is_direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    backend = LocalBackend(tmp_path / "store", direct_io=True)
    a = threading.Thread(target=backend._put_sync, args=("packs/aa/a", (bytes(2 * MiB),)))
    a.start()
    assert a_writing.wait(30)
    backend._put_sync("packs/bb/b", (bytes(3 * MiB),))
    assert backend.direct_io is False  # B saw the refusal
    b_done.set()
    a.join(30)
    assert backend.direct_io is False, "a concurrent success turned direct I/O back on"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_staging_buffers_are_not_shared_with_a_forked_child(
    fresh_pool: list[mmap.mmap],
) -> None:
    """An embedder that backed up once (a staging buffer pooled) and then forks workers
    (multiprocessing's default start method on Linux) that back up concurrently: the
    child starts with no pooled buffer, and even a buffer object it inherited is its own
    copy (a private mapping), so neither process's staged bytes land in the other's pack."""
    held = _direct._take_stage()
    _direct._give_back(_direct._take_stage())
    assert len(fresh_pool) == 1
    pid = os.fork()
    if pid == 0:  # the child: stage bytes of its own
        status = 1
        try:
            held[:8] = b"child!!!"
            status = 0 if not _direct._stages else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child inherited the pool"
    assert held[:8] != b"child!!!", "the child's staged bytes are in the parent's buffer"
    held.close()
