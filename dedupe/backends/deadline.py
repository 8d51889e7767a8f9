"""Blocking storage calls with a deadline, for directories that may stop answering.

A repository on NFS (or any network file system mounted `hard`, as NFS is by default)
blocks every call on it, in the kernel, for as long as its server is gone: a replica
sync or a backup feeding a sync replica would wait forever, and nothing would say why.
With a deadline, each call runs on a daemon thread of its own and the caller waits at
most `seconds` for it; then the call fails with BackendTimeout and every later call on
the same backend fails at once with the same error (one stalled call means the storage
is gone, and a second wait would only double the delay before the error is reported).

What a call that timed out may still do. Its thread cannot be stopped: it stays in the
kernel until the storage answers, and then goes on. So a put, create_new, swap or
delete_if checks, at its commit point (LocalBackend's rename, link or conditional unlink),
whether its caller gave up, and if so stops there and removes its temporary file: one
abandoned before its commit point changes nothing. That matters most for a put, whose
caller may reuse the buffer once it gave up (the bytes written could then no longer be
the object its name says), and for the conditional calls of locks, whose state must not
change after the caller was told it failed. A plain delete may still complete, as may
any call abandoned at or after its commit point, as any write whose answer was lost may
have. The threads are daemons, so a process whose storage never answers can still exit.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from dedupe.errors import BackendTimeout

T = TypeVar("T")

_local = threading.local()


class _Abandoned(Exception):
    """Raised inside an abandoned call at its commit point; never reaches a caller."""


def check_abandoned() -> None:
    """Call at a blocking call's commit point: raise (inside the call's thread) if the
    caller stopped waiting for it. A no-op in a call that Deadline.run did not start."""
    abandoned: threading.Event | None = getattr(_local, "abandoned", None)
    if abandoned is not None and abandoned.is_set():
        raise _Abandoned


class Deadline:
    """Runs a backend's blocking calls with at most `seconds` of waiting for each."""

    def __init__(self, seconds: float, location: str) -> None:
        if not seconds > 0:
            raise ValueError("a deadline is a positive number of seconds")
        self.seconds = seconds
        self.location = location
        self._stalled: str | None = None  # the call that timed out first

    def _error(self, what: str) -> BackendTimeout:
        first = self._stalled
        since = "" if first is None or first == what else f"; it stopped answering at {first}"
        return BackendTimeout(
            f"{self.location} did not answer within {self.seconds:g} s ({what}{since})",
            hint="a network file system whose server is unreachable blocks every call (NFS "
            "mounted 'hard'); check the mount and the server. If the storage is only slow, "
            "raise DEDUPE_REPLICA_IO_TIMEOUT (seconds; 0: wait for ever)",
        )

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a daemon thread; BackendTimeout after `seconds`, or at once when
        an earlier call timed out. `what` names the call in the error."""
        if self._stalled is not None:
            raise self._error(what)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        abandoned = threading.Event()

        def deliver(ok: bool, value: Any) -> None:
            if done.done():  # cancelled: the caller gave up
                return
            if ok:
                done.set_result(value)
            else:
                done.set_exception(value)

        context = contextvars.copy_context()  # as asyncio.to_thread hands it on

        def work() -> None:
            _local.abandoned = abandoned
            value: object
            try:
                value, ok = context.run(fn, *args), True
            except _Abandoned:
                return
            except BaseException as e:  # handed to the caller's task, as to_thread does
                value, ok = e, False
            finally:
                _local.abandoned = None
            try:
                loop.call_soon_threadsafe(deliver, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits for this any more
                pass

        threading.Thread(target=work, name="dedupe-io", daemon=True).start()
        # asyncio.wait, not wait_for: the call's own TimeoutError (ETIMEDOUT from a soft
        # mount is one) must reach the caller as itself, and on Python 3.11 wait_for
        # drops a cancellation (Ctrl-C, SIGTERM) that lands with the result (gh-86296).
        try:
            await asyncio.wait([done], timeout=self.seconds)
        except asyncio.CancelledError:
            abandoned.set()
            done.cancel()
            raise
        if not done.done():
            abandoned.set()
            done.cancel()
            if self._stalled is None:
                self._stalled = what
            raise self._error(what)
        return done.result()


def until_abandoned(parts: Iterable[T]) -> Iterator[T]:
    """`parts`, stopping (with the call) before the next one once the call's caller gave
    up: a put_stream's parts are read from the caller's scratch file, which the caller
    closes once it stopped waiting, and whose descriptor number the next open reuses."""
    for part in parts:
        yield part
        check_abandoned()
