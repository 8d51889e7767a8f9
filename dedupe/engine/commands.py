"""Commands as sources and targets: a backup reads a command's standard output (a
`pg_dump`), a restore writes into a command's standard input (a `pg_restore`).

A command is run without a shell, from an argument list (`Command.parse` splits a command
line as a POSIX shell would, quotes and all; run `sh -c '...'` for pipes). Its standard
error is kept (the last STDERR_TAIL bytes) for the error that names it. A source command
that exits with a status other than 0, is killed by a signal, or cannot be started fails
the backup with SourceError naming its status and the tail of its standard error: the
backup commits nothing (a dump that failed half way is never a generation). A target
command that fails, or stops reading, fails the restore with TargetError the same way.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from dedupe.chunking import Block, BlockReader
from dedupe.errors import SourceError, TargetError

# How much of a command's standard error an error message quotes.
STDERR_TAIL = 4096


@dataclass(frozen=True)
class Command:
    """A command to run: `argv` (the program, then its arguments), `env` (None: this
    process's environment), and what the generation records of it: `label` (default:
    the command line) and `info` (merged into the generation's `source`)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    label: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    # Facts the command states on its standard error once it succeeded (pg_basebackup's
    # WAL positions): `learn(stderr)` -> more of `info`, merged in before the commit.
    learn: Callable[[str], Mapping[str, Any]] | None = None
    learned: dict[str, Any] = field(default_factory=dict, compare=False)
    # A command a restore writes into whose own output is not wanted (a drill's check:
    # its output would mix with dedupe's): its stdout goes to /dev/null.
    discard_stdout: bool = False

    def __post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise ValueError("a command needs a program and string arguments")

    @classmethod
    def parse(cls, line: str, **kwargs: Any) -> Command:
        """A command line split as a POSIX shell splits it (no shell runs it)."""
        try:
            argv = shlex.split(line)
        except ValueError as e:
            raise ValueError(f"cannot split the command line {line!r}: {e}") from None
        if not argv:
            raise ValueError("the command line is empty")
        return cls(tuple(argv), **kwargs)

    def describe(self) -> str:
        return self.label or shlex.join(self.argv)


class _Tail:
    """The last STDERR_TAIL bytes a pipe gives, read on a thread until it closes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:
            while piece := pipe.read1(65536):  # type: ignore[attr-defined]
                self._data += piece
                del self._data[:-STDERR_TAIL]

    async def text(self) -> str:
        await asyncio.to_thread(self._thread.join, 5.0)
        return bytes(self._data).decode(errors="replace").strip()


def _start(command: Command, **pipes: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            list(command.argv),
            env=None if command.env is None else dict(command.env),
            stderr=subprocess.PIPE,
            close_fds=True,
            **pipes,
        )
    except OSError as e:
        raise OSError(e.errno, f"cannot run {command.describe()}: {e.strerror}") from None


def _outcome(command: Command, status: int, stderr: str) -> str | None:
    """What went wrong with a command that ended with `status`, or None."""
    if status == 0:
        return None
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        what = f"{command.describe()} was killed by {name}"
    else:
        what = f"{command.describe()} exited with status {status}"
    return f"{what}: {stderr}" if stderr else what


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill a command that is still running (a backup or restore that stopped early)."""
    if proc.poll() is None:
        proc.kill()
    await asyncio.to_thread(proc.wait)


async def command_output(command: Command, read_size: int) -> AsyncIterator[bytes | Block]:
    """The standard output of `command`, in blocks; SourceError (after the last block)
    if it fails, and nothing is committed then (see the module docstring)."""
    try:
        proc = _start(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as e:
        raise SourceError(e.strerror or str(e)) from None
    assert proc.stdout is not None and proc.stderr is not None
    tail = _Tail(proc.stderr)
    reader = BlockReader(read_size)
    fd = proc.stdout.fileno()
    try:
        while True:
            try:
                block = await asyncio.to_thread(reader.read, fd)
            except OSError as e:
                raise SourceError(
                    f"reading from {command.describe()} failed: {e.strerror}"
                ) from None
            if block is None:
                break
            yield block
        status = await asyncio.to_thread(proc.wait)
        stderr = await tail.text()
        problem = _outcome(command, status, stderr)
        if problem is not None:
            raise SourceError(f"{problem}; nothing was committed")
        if command.learn is not None:
            command.learned.update(command.learn(stderr))
    finally:
        await _stop(proc)
        proc.stdout.close()


async def write_to_command(stream: AsyncIterator[Iterable[Any]], command: Command) -> int:
    """Write the pieces `stream` yields (lists of buffers) into `command`'s standard
    input, close it, and wait for the command. -> bytes written. TargetError when the
    command fails or stops reading; when `stream` raises (damage found), the command is
    killed before it sees the end of its input, and the error goes on."""
    try:
        out = subprocess.DEVNULL if command.discard_stdout else None
        proc = _start(command, stdin=subprocess.PIPE, stdout=out)
    except OSError as e:
        raise TargetError(e.strerror or str(e)) from None
    assert proc.stdin is not None and proc.stderr is not None
    tail = _Tail(proc.stderr)
    fd = proc.stdin.fileno()
    written = 0
    try:
        try:
            async for parts in stream:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        n = await asyncio.to_thread(os.write, fd, view)
                        view = view[n:]
                        written += n
        except (BrokenPipeError, ConnectionResetError):
            status = await asyncio.to_thread(proc.wait)
            problem = _outcome(command, status, await tail.text())
            raise TargetError(
                f"{command.describe()} stopped reading after {written} bytes"
                + (f" ({problem})" if problem else "")
            ) from None
        proc.stdin.close()
        status = await asyncio.to_thread(proc.wait)
        problem = _outcome(command, status, await tail.text())
        if problem is not None:
            raise TargetError(problem)
        return written
    finally:
        await _stop(proc)
        if not proc.stdin.closed:
            proc.stdin.close()
