"""Run one child process and measure it alone: wall clock, CPU time, peak RSS.

Used by ``bench_e2e.py``. Stdlib only.

Why not ``subprocess.run``: ``Popen.wait()`` reaps the child and throws away its
resource usage. ``os.wait4(pid, 0)`` reaps it *and* returns a ``struct rusage``
for that child (and whatever descendants it waited for itself), so ``ru_maxrss``
is the peak resident set of the tool under test, not of the benchmark or of
earlier children (which ``RUSAGE_CHILDREN`` would mix in).

One bias to know: Linux carries the memory high-water mark across ``exec``, and
``subprocess`` starts children with ``vfork``, so a child's ``ru_maxrss`` is at
least this process's own RSS when it spawned the child (~15-20 MiB for the
benchmark; every tool measured peaks far above that). Keep the parent small:
stream files, never read them whole.

Standard output and error go to files, not pipes: nobody has to drain a pipe
while the child runs (no deadlock, no CPU spent in the parent during the timed
window), and the bytes are read after the clock has stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = ["CommandFailed", "ProcResult", "run_measured", "tree_bytes", "warm_page_cache"]

# ru_maxrss is in KiB on Linux and in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


@dataclass
class ProcResult:
    """What one measured child did."""

    argv: list[str]
    returncode: int
    wall_s: float  # from just before fork/exec to just after reaping
    user_s: float  # CPU time of the child (ru_utime)
    sys_s: float  # kernel time of the child (ru_stime)
    maxrss_bytes: int  # peak resident set size of the child (ru_maxrss)
    stdout: bytes = field(repr=False, default=b"")
    stderr: bytes = field(repr=False, default=b"")

    @property
    def maxrss_mib(self) -> float:
        return self.maxrss_bytes / (1 << 20)

    def stderr_tail(self, lines: int = 15) -> str:
        text = self.stderr.decode("utf-8", "replace").rstrip()
        return "\n".join(text.splitlines()[-lines:])


class CommandFailed(RuntimeError):
    """A measured command exited non-zero; carries its result for the report."""

    def __init__(self, result: ProcResult) -> None:
        self.result = result
        last = result.stderr_tail(1) or "(no error output)"
        super().__init__(f"`{' '.join(result.argv)}` exited with {result.returncode}: {last}")


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin_path: str | os.PathLike[str] | None = None,
    stdout_path: str | os.PathLike[str] | None = None,
    check: bool = True,
) -> ProcResult:
    """Run ``argv`` to completion and return its :class:`ProcResult`.

    ``stdin_path``: a file opened as the child's standard input (else /dev/null).
    ``stdout_path``: a file the child's standard output is written to; its bytes
    are then not kept in ``ProcResult.stdout`` (use it for restores to stdout).
    ``check``: raise :class:`CommandFailed` on a non-zero exit status.
    """
    argv = [str(a) for a in argv]
    with (
        tempfile.TemporaryFile() as err_f,
        _open_out(stdout_path) as out_f,
        _open_in(stdin_path) as in_f,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=in_f, stdout=out_f, stderr=err_f, env=dict(env) if env else None, cwd=cwd
        )
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except BaseException:
            # Interrupted (Ctrl-C): do not leave the child running behind us.
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        # Tell Popen the child is reaped, so it never waits on a recycled pid.
        proc.returncode = os.waitstatus_to_exitcode(status)
        err_f.seek(0)
        stderr = err_f.read()
        stdout = b""
        if stdout_path is None:
            out_f.seek(0)
            stdout = out_f.read()
    result = ProcResult(
        argv=argv,
        returncode=proc.returncode,
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        maxrss_bytes=ru.ru_maxrss * _MAXRSS_UNIT,
        stdout=stdout,
        stderr=stderr,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result)
    return result


def _open_out(path: str | os.PathLike[str] | None) -> IO[bytes]:
    return open(path, "wb") if path is not None else tempfile.TemporaryFile()


def _open_in(path: str | os.PathLike[str] | None) -> IO[bytes]:
    return open(path, "rb") if path is not None else open(os.devnull, "rb")


def tree_bytes(root: str | os.PathLike[str]) -> int:
    """Apparent size of all regular files under ``root`` (like ``du -sb``).

    Unlike ``du -sb`` this leaves out the sizes of directory entries themselves
    (restic alone has 256 data subdirectories: ~1 MiB of noise), so it counts
    exactly the bytes a tool stored.
    """
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            total += st.st_size
    return total


def warm_page_cache(path: str | os.PathLike[str], block: int = 1 << 20) -> None:
    """Read ``path`` once so that the timed tool reads it from the page cache."""
    with open(Path(path), "rb", buffering=0) as f:
        buf = bytearray(block)
        while f.readinto(buf):
            pass
