"""The backend contract every storage backend implements and the conformance suite
(tests/backends) checks.

Names are '/'-separated relative paths ("packs/ab/ab12..."). Semantics:

- `put(name, data)`: atomic and durable. When it returns, the object is on stable storage
  under `name` in full; readers never see a partial object, a crash never leaves one
  under `name`. Putting an existing name replaces it atomically (objects are
  content-addressed, so in practice the bytes are the same).
- `put_stream(name, parts)`: put() of the concatenation of `parts`, an iterable of
  bytes-like pieces that may block (it reads a temporary file) and is consumed on a worker
  thread. A backend that can store an object piece by piece overrides it, so that an
  object larger than memory (a manifest spilled to disk) is never held whole; the default
  joins the pieces and calls put().
- `get(name, offset=0, length=None)`: exactly `length` bytes from `offset` (to the end
  when `length` is None). Raises `MissingObject` when there is no such object and
  `TruncatedObject` when it ends before `offset + length`.
- `read_into(name, offset, into)`: fills the writable buffer `into` with exactly
  `len(into)` bytes from `offset`, with get()'s errors. Readers that go through many
  large ranges (restore, verify) reuse one buffer rather than a fresh `bytes` per range,
  whose pages the kernel must fault in and zero one by one. A backend that can read in
  place overrides it; the default copies what get() returns.
- `list(prefix)`: names of all complete objects whose name starts with `prefix`
  (a directory-like prefix ending in "/"), in no particular order. `list_sized(prefix)`:
  the same names with their sizes in bytes (the local object cache compares them).
- `stat(name)`: the size in bytes; `MissingObject` if absent.
- `delete(name)`: removes the object; `MissingObject` if absent.
- `exists(name)`: whether an object is there.
- `get_small(name, limit)`: get() of an object that cannot be larger than `limit`; a
  larger one is refused (IntegrityError) without being read.
- `create_new(name, data)`: put() only if no object `name` exists, atomically with respect
  to every other create_new, swap and delete_if of that name (O_EXCL; a conditional put,
  `If-None-Match: *`); raises `ObjectChanged` if one exists.
- `swap(name, data, expected)`: replace the object by `data` only if it holds exactly
  `expected` (compare-and-swap; `If-Match` on object stores). `MissingObject` if it is
  gone, `ObjectChanged` if it holds other bytes; in both cases nothing is written: a
  deleted object is never brought back.
- `delete_if(name, expected)`: delete() only if the object holds exactly `expected`, with
  swap()'s errors. Locks (dedupe.store.locks) are made, refreshed and judged stale with
  these three, so that a refresh cannot resurrect a lock another process removed, nor a
  stale-lock removal delete one that was refreshed meanwhile.
- `is_empty()`: whether the location holds nothing at all; `init` refuses one that does,
  so that a repository is never mixed into other files.
- `remove_leftovers()`: delete what interrupted puts left behind (temporary files, a
  store's incomplete uploads); returns how many. Only called under the repository's
  exclusive lock, when no put of a dedupe process is in flight.
Operational failures of the store (disk full, permission denied, network down after
retries) raise `BackendError` with what happened and where.
"""

from __future__ import annotations

import asyncio
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable

Buffer = bytes | bytearray | memoryview


# What turns an on-by-default switch in the environment off (DEDUPE_DIRECT_IO=0, ...).
OFF_WORDS = ("0", "false", "no", "off")


def switched_off(variable: str) -> bool:
    """Whether environment `variable` turns its default-on behaviour off."""
    return os.environ.get(variable, "1").strip().lower() in OFF_WORDS


class Backend(ABC):
    location: str
    # Whether each request is a round trip to another machine (an object store): such a
    # repository is opened with the local object cache by default (store/cache.py).
    remote = False

    @abstractmethod
    async def put(self, name: str, data: Buffer) -> None: ...

    async def put_stream(self, name: str, parts: Iterable[Buffer]) -> None:
        data = await asyncio.to_thread(b"".join, parts)
        await self.put(name, data)

    @abstractmethod
    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    async def get_small(self, name: str, limit: int) -> bytes:
        """get() of an object that cannot legitimately exceed `limit` bytes (a key map, a
        keyring, a key file): a larger one is refused unread, as TruncatedObject's
        sibling IntegrityError, so that a planted huge or sparse file exhausts nothing."""
        from dedupe.errors import IntegrityError

        size = await self.stat(name)
        if size > limit:
            raise IntegrityError(
                f"object {name} is {size} bytes, more than such an object can be ({limit}): "
                "refused unread"
            )
        return await self.get(name)

    async def read_into(self, name: str, offset: int, into: memoryview) -> None:
        data = await self.get(name, offset, len(into))
        into[:] = data

    @abstractmethod
    async def list(self, prefix: str) -> list[str]: ...

    async def list_sized(self, prefix: str) -> dict[str, int]:
        """list() with each object's size. Object stores have it in the listing; the
        default asks stat() for each (an object deleted meanwhile is left out)."""
        from dedupe.errors import MissingObject

        sizes: dict[str, int] = {}
        for name in await self.list(prefix):
            try:
                sizes[name] = await self.stat(name)
            except MissingObject:
                continue
        return sizes

    @abstractmethod
    async def stat(self, name: str) -> int: ...

    @abstractmethod
    async def delete(self, name: str) -> None: ...

    async def exists(self, name: str) -> bool:
        from dedupe.errors import MissingObject

        try:
            await self.stat(name)
        except MissingObject:
            return False
        return True

    @abstractmethod
    async def create_new(self, name: str, data: Buffer) -> None: ...

    @abstractmethod
    async def swap(self, name: str, data: Buffer, expected: bytes) -> None: ...

    @abstractmethod
    async def delete_if(self, name: str, expected: bytes) -> None: ...

    async def is_empty(self) -> bool:
        return not await self.list("")

    async def remove_leftovers(self) -> int:
        """Delete what interrupted puts left; the default has nothing to delete."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; the default has nothing to release."""
