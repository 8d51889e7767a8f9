"""A repository in a local directory: the embedded default.

Writes go to a temporary name in the target directory, are fsynced, renamed over the
final name, and the directory is fsynced, so an object is either absent or complete
after a crash. Blocking file calls run on worker threads, or, with `io_timeout`, on
threads of their own with a deadline (dedupe.backends.deadline: for replicas on network
file systems).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from dedupe.backends._direct import DIRECT_MIN, write_parts
from dedupe.backends.base import Backend, Buffer, switched_off
from dedupe.backends.deadline import Deadline, check_abandoned, until_abandoned
from dedupe.errors import (
    BackendError,
    LocationNotEmpty,
    MissingObject,
    ObjectChanged,
    TruncatedObject,
)

TMP_PREFIX = ".tmp-"
T = TypeVar("T")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: str) -> None:
    """Create `directory` and any missing parents, fsyncing the parent of each directory
    created: a new `packs/ab/` is only durable once `packs/` records it (and a crash must
    not lose an object whose rename was fsynced into a directory that itself was not)."""
    missing: list[str] = []
    d = directory
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # a concurrent writer made it; fsync its parent anyway
            pass
        _fsync_dir(os.path.dirname(d))


def _backend_error(e: OSError, action: str, path: str) -> BackendError:
    if e.errno == errno.ENOSPC:
        return BackendError(
            f"no space left on the device while {action} {path}",
            hint="free space or move the repository; nothing already stored was changed",
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return BackendError(f"permission denied while {action} {path}: {e.strerror}")
    return BackendError(f"{action} {path} failed: {e.strerror or e}")


def _truncated(name: str, offset: int, length: int, ends: int) -> TruncatedObject:
    return TruncatedObject(
        f"object {name} is truncated: wanted bytes {offset}..{offset + length}, it ends at {ends}",
        hint="run 'dedupe verify' to see which generations are affected",
    )


def sized(parts: Iterable[Buffer]) -> int:
    """The bytes `parts` hold if it is a list or tuple (a put); a stream of parts
    (put_stream, a manifest spilled as it is made) counts as large here, and goes direct
    only once it has come to DIRECT_MIN bytes (write_parts)."""
    if isinstance(parts, list | tuple):
        return sum(memoryview(p).nbytes for p in parts)
    return DIRECT_MIN


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextmanager
def _guard(directory: str) -> Iterator[None]:
    """An exclusive flock on `directory`, held across the read-compare-write of a
    conditional operation, so that no other create_new, swap or delete_if of a name in it
    (by any process of this host, or of another over a file system whose flock is
    coherent, as NFSv4's is) comes in between."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class LocalBackend(Backend):
    def __init__(
        self,
        root: str | os.PathLike[str],
        direct_io: bool | None = None,
        io_timeout: float | None = None,
    ) -> None:
        """`direct_io`: write objects of DIRECT_MIN bytes or more (packs) around the page
        cache (dedupe.backends._direct); None: unless DEDUPE_DIRECT_IO is "0". Turned
        off for good once the file system refuses it. `io_timeout`: seconds a call may
        take before it fails with BackendTimeout (None: no limit)."""
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root
        if direct_io is None:
            direct_io = not switched_off("DEDUPE_DIRECT_IO")
        self.direct_io = direct_io
        self._deadline = None if io_timeout is None else Deadline(io_timeout, self.root)

    def _run(self, what: str, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """fn(*args) off the event loop: on the default executor, or with the deadline."""
        if self._deadline is None:
            return asyncio.to_thread(fn, *args)
        return self._deadline.run(what, fn, *args)

    def _path(self, name: str) -> str:
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"invalid object name {name!r}")
        return os.path.join(self.root, *name.split("/"))

    # --- blocking halves, run on threads ---------------------------------------------------

    def _inside(self, directory: str) -> None:
        """Refuse to write through a symbolic link: a directory of the repository replaced
        by a link to elsewhere would send new objects out of it."""
        real_root = os.path.realpath(self.root)
        expected = os.path.join(real_root, os.path.relpath(directory, self.root))
        if os.path.realpath(directory) != os.path.normpath(expected):
            raise BackendError(
                f"{directory} leads out of the repository through a symbolic link: "
                "refusing to write there",
                hint="replace the link by a directory (someone with access to the storage made it)",
            )

    def _write_tmp(self, directory: str, parts: Iterable[Buffer]) -> str:
        """A fsynced temporary file in `directory` holding the parts, not yet visible under
        any object name (its name starts with TMP_PREFIX). The caller renames or links it
        into place, and removes it on failure."""
        _make_dirs(directory)
        self._inside(directory)
        tmp = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if self.direct_io and sized(parts) >= DIRECT_MIN:
                if not write_parts(fd, parts, True):
                    self.direct_io = False  # only ever turned off: see _direct
            else:
                write_parts(fd, parts, False)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        return tmp

    def _install(
        self,
        name: str,
        parts: Iterable[Buffer],
        verb: str,
        place: Callable[[str, str], bool],
        guarded: bool,
    ) -> None:
        """Write `parts` to a fsynced temporary file, then `place(tmp, path)` it (under the
        directory's guard if `guarded`; it says whether it moved the file away, and calls
        check_abandoned just before it changes the object), then fsync the directory. The
        temporary file never outlives the call."""
        path = self._path(name)
        directory = os.path.dirname(path)
        tmp = None
        try:
            if not isinstance(parts, list | tuple):  # a stream, read as it is written
                parts = until_abandoned(parts)
            tmp = self._write_tmp(directory, parts)
            with _guard(directory) if guarded else nullcontext():
                if place(tmp, path):
                    tmp = None
            _fsync_dir(directory)
        except OSError as e:
            raise _backend_error(e, verb, path) from None
        finally:
            if tmp is not None:
                _unlink_quietly(tmp)

    def _put_sync(self, name: str, parts: Iterable[Buffer]) -> None:
        def rename(tmp: str, path: str) -> bool:
            check_abandoned()
            os.replace(tmp, path)
            return True

        self._install(name, parts, "writing", rename, guarded=False)

    def _create_new_sync(self, name: str, data: Buffer) -> None:
        # link() of a complete temporary file: the object appears whole or not at all, and
        # only if the name is free (an O_EXCL create of the object itself could be seen
        # half written).
        def link(tmp: str, path: str) -> bool:
            check_abandoned()
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ObjectChanged(f"object {name} exists already") from None
            return False  # the temporary name goes, the object stays

        self._install(name, (data,), "creating", link, guarded=True)

    def _current(self, name: str, expected: bytes) -> None:
        """Raise unless the object holds exactly `expected` (called under the guard)."""
        if self._get_sync(name, 0, None) != expected:
            raise ObjectChanged(f"object {name} was changed by someone else")

    def _swap_sync(self, name: str, data: Buffer, expected: bytes) -> None:
        def swap(tmp: str, path: str) -> bool:
            self._current(name, expected)
            check_abandoned()
            os.replace(tmp, path)
            return True

        self._install(name, (data,), "replacing", swap, guarded=True)

    def _delete_if_sync(self, name: str, expected: bytes) -> None:
        path = self._path(name)
        directory = os.path.dirname(path)
        try:
            with _guard(directory):
                self._current(name, expected)
                check_abandoned()
                os.unlink(path)
            _fsync_dir(directory)
        except FileNotFoundError:  # not even its directory: the object is missing
            raise MissingObject(f"object {name} is missing from the repository") from None
        except OSError as e:
            raise _backend_error(e, "deleting", path) from None

    def _open_for_reading(self, name: str) -> tuple[int, str]:
        path = self._path(name)
        try:
            # Non-blocking, so that a FIFO planted where an object should be cannot hang
            # the reader; only regular files are objects.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise MissingObject(
                f"object {name} is missing from the repository",
                hint="run 'dedupe verify' to see which generations are affected",
            ) from None
        except OSError as e:
            raise _backend_error(e, "opening", path) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise MissingObject(f"{path} is not a regular file, so no object of a repository")
        return fd, path

    def _get_sync(self, name: str, offset: int, length: int | None) -> bytes:
        fd, path = self._open_for_reading(name)
        try:
            if length is None:
                size = os.fstat(fd).st_size
                if offset > size:
                    raise _truncated(name, offset, 0, size)
                length = size - offset
            data = os.pread(fd, length, offset)
            # pread may return less than asked for on some filesystems; keep reading.
            while len(data) < length:
                more = os.pread(fd, length - len(data), offset + len(data))
                if not more:
                    raise _truncated(name, offset, length, offset + len(data))
                data += more
            return data
        except OSError as e:
            raise _backend_error(e, "reading", path) from None
        finally:
            os.close(fd)

    def _read_into_sync(self, name: str, offset: int, into: memoryview) -> None:
        fd, path = self._open_for_reading(name)
        try:
            view = memoryview(into).cast("B")
            got = 0
            while got < len(view):
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise _truncated(name, offset, len(view), offset + got)
                got += n
        except OSError as e:
            raise _backend_error(e, "reading", path) from None
        finally:
            os.close(fd)

    def _list_sync(self, prefix: str) -> list[str]:
        return list(self._list_sized_sync(prefix))

    def _list_sized_sync(self, prefix: str) -> dict[str, int]:
        """Regular files only, found without following symbolic links: a FIFO, a device
        or a link planted in the repository is no object."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        names: dict[str, int] = {}
        stack = [base]
        while stack:
            directory = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                continue
            except OSError as e:
                raise _backend_error(e, "listing", directory) from None
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False) and not entry.name.startswith(TMP_PREFIX):
                    rel = os.path.relpath(entry.path, self.root).replace(os.sep, "/")
                    if rel.startswith(prefix):
                        try:
                            names[rel] = entry.stat(follow_symlinks=False).st_size
                        except FileNotFoundError:
                            continue  # deleted since it was listed
        return names

    def _remove_leftovers_sync(self) -> int:
        """Temporary files of puts that were killed before their rename."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(TMP_PREFIX):
                    try:
                        os.unlink(os.path.join(dirpath, f))
                        removed += 1
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        raise _backend_error(e, "deleting", os.path.join(dirpath, f)) from None
        return removed

    def _stat_sync(self, name: str) -> int:
        path = self._path(name)
        try:
            return os.stat(path).st_size
        except (FileNotFoundError, NotADirectoryError):  # a file where a directory should be
            raise MissingObject(f"object {name} is missing from the repository") from None
        except OSError as e:
            raise _backend_error(e, "reading", path) from None

    def _delete_sync(self, name: str) -> None:
        path = self._path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise MissingObject(f"object {name} is missing from the repository") from None
        except OSError as e:
            raise _backend_error(e, "deleting", path) from None

    # --- async interface --------------------------------------------------------------------

    async def put(self, name: str, data: Buffer) -> None:
        await self._run(f"writing {name}", self._put_sync, name, (data,))

    async def put_stream(self, name: str, parts: Iterable[Buffer]) -> None:
        await self._run(f"writing {name}", self._put_sync, name, parts)

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return await self._run(f"reading {name}", self._get_sync, name, offset, length)

    async def read_into(self, name: str, offset: int, into: memoryview) -> None:
        await self._run(f"reading {name}", self._read_into_sync, name, offset, into)

    async def list(self, prefix: str) -> list[str]:
        return await self._run(f"listing {prefix}", self._list_sync, prefix)

    async def list_sized(self, prefix: str) -> dict[str, int]:
        return await self._run(f"listing {prefix}", self._list_sized_sync, prefix)

    async def stat(self, name: str) -> int:
        return await self._run(f"reading {name}", self._stat_sync, name)

    async def delete(self, name: str) -> None:
        await self._run(f"deleting {name}", self._delete_sync, name)

    async def create_new(self, name: str, data: Buffer) -> None:
        await self._run(f"creating {name}", self._create_new_sync, name, data)

    async def swap(self, name: str, data: Buffer, expected: bytes) -> None:
        await self._run(f"replacing {name}", self._swap_sync, name, data, expected)

    async def delete_if(self, name: str, expected: bytes) -> None:
        await self._run(f"deleting {name}", self._delete_if_sync, name, expected)

    async def remove_leftovers(self) -> int:
        return await self._run("removing leftovers", self._remove_leftovers_sync)

    async def is_empty(self) -> bool:
        return await self._run("reading the directory", self._is_empty_sync)

    def _is_empty_sync(self) -> bool:
        """No such path, or an empty directory. A path that is a file is not a place for a
        repository: LocationNotEmpty, as for a directory with files in it."""
        try:
            with os.scandir(self.root) as entries:
                return next(entries, None) is None
        except FileNotFoundError:
            return True
        except NotADirectoryError:
            raise LocationNotEmpty(
                f"{self.root} is a file, not a directory",
                hint="give the path of a new or empty directory for the repository",
            ) from None
        except OSError as e:
            raise _backend_error(e, "reading", self.root) from None
