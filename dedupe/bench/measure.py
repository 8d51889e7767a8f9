"""Run one command and measure it alone: wall clock, CPU time and peak RSS.

Each measured command is started by a small launcher process that reaps it with
``os.wait4`` and reports its ``ru_maxrss``. ``Popen.wait()`` would throw the child's
resource usage away, and ``RUSAGE_CHILDREN`` mixes every child ever reaped. The launcher is
needed because Linux carries the memory high-water mark of the parent across vfork + exec:
started directly from the benchmark (which may hold a whole sample, or be the embedding
tool), every child would report at least the benchmark's peak.

Standard output and error go to files, not pipes: nobody drains a pipe while the clock
runs, and the bytes are read after it has stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Measured", "fsync_time", "last_json", "measure_command", "tree_bytes", "warm"]

_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
_READ_BLOCK = 4 << 20

# Started with `python -I -S -c`: starts in ~10 ms and stays small (~10 MiB), so the
# high-water mark it hands to the measured command across vfork + exec is its own.
_LAUNCHER = """\
import json, os, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
with open(spec["stdin"] or os.devnull, "rb") as i, open(spec["stdout"], "wb") as o, \\
        open(spec["stderr"], "wb") as e:
    t0 = time.perf_counter()
    p = subprocess.Popen(spec["argv"], stdin=i, stdout=o, stderr=e, cwd=spec["cwd"])
    signal.signal(signal.SIGTERM, lambda *_: p.terminate())
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"rc": p.returncode, "wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime,
                  "maxrss": ru.ru_maxrss}))
"""


@dataclass
class Measured:
    """What one measured command did."""

    argv: list[str]
    rc: int
    wall_s: float  # from just before its fork to just after it was reaped
    user_s: float
    sys_s: float
    maxrss_bytes: int  # the command's own peak resident set
    stdout: bytes
    stderr: bytes

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def failure(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else "(no error output)"
        return f"`{' '.join(self.argv[:3])} ...` exited with {self.rc}: {last}"


async def measure_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str],
    scratch: Path,
    stdin: str | os.PathLike[str] | None = None,
) -> Measured:
    """Run `argv` to completion as a grandchild, through the launcher, and return its wall
    time, CPU time and peak RSS. stdout and stderr go to files in `scratch` and are read
    afterwards; `stdin` is a file path, else /dev/null. Cancelling terminates the launcher,
    which terminates the command."""
    out, err = scratch / "stdout", scratch / "stderr"
    args = [str(a) for a in argv]
    spec = {
        "argv": args,
        "cwd": os.fspath(cwd),
        "stdin": os.fspath(stdin) if stdin is not None else None,
        "stdout": str(out),
        "stderr": str(err),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-S",
        "-c",
        _LAUNCHER,
        json.dumps(spec),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    try:
        report, launcher_err = await proc.communicate()
    except BaseException:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"bench launcher failed: {launcher_err.decode(errors='replace')}")
    r = json.loads(report)
    return Measured(
        argv=args,
        rc=r["rc"],
        wall_s=r["wall"],
        user_s=r["user"],
        sys_s=r["sys"],
        maxrss_bytes=r["maxrss"] * _MAXRSS_UNIT,
        stdout=out.read_bytes(),
        stderr=err.read_bytes(),
    )


def tree_bytes(root: str | os.PathLike[str]) -> int:
    """Apparent size of the regular files under `root` (like `du -sb`, without the sizes of
    directory entries: restic alone has 256 data directories, ~1 MiB of noise)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def fsync_time(path: str | os.PathLike[str]) -> float:
    """Seconds to fsync `path` (about 0 when the tool already did)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def prefault(directory: str | os.PathLike[str], size: int) -> None:
    """Write `size` bytes of zeros to a scratch file in `directory` and remove it, so that
    the memory a timed command's writes will land in is in place. On a VM that hands
    freed guest memory back to its host (virtio-balloon free page reporting), the first
    writes into fresh page cache fault every page in from the host: measured here, 160
    MiB took 0.84 s of CPU instead of 0.035 s, billed to whichever tool ran first.
    Call it before the `sync` that precedes the step, so that what it wrote is settled
    first. A disk too full for it is not an error: the step runs without."""
    path = Path(directory) / ".prefault"
    block = bytes(_READ_BLOCK)
    try:
        with open(path, "wb", buffering=0) as f:
            for _ in range(size // len(block) + 1):
                f.write(block)
    except OSError:
        pass
    finally:
        path.unlink(missing_ok=True)


def warm(path: str | os.PathLike[str]) -> None:
    """Read `path` once, so that a timed command reads it from the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_BLOCK)
        while f.readinto(buf):
            pass


def last_json(raw: bytes) -> dict[str, Any]:
    """The JSON object a command printed (its whole stdout, or its last JSON line)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("{")]
        if not lines:
            raise RuntimeError(f"no JSON object in the output: {text[-300:]!r}") from None
        obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise RuntimeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj
