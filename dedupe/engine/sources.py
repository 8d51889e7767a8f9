"""Turn what the caller hands to backup() into an async iterator of large byte blocks.

A regular file is mapped window by window (dedupe.chunking.MapReader): the chunker and
the hashes read the page cache's pages in place, with no copy. If the file shrinks under
a window in use, the backup fails before its commit (dedupe.engine.backup.ingest checks
the reader's `torn`). Other files (pipes, devices) are read into reusable read-only blocks
(BlockReader), read into again only once no chunk, digest or queue refers to them; a
fresh buffer per read would cost a page fault per 4 KiB."""

from __future__ import annotations

import asyncio
import mmap
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator
from typing import BinaryIO

import aiofiles

from dedupe.chunking import Block, BlockReader, MapReader
from dedupe.errors import SourceError

READ_SIZE = 2 * 1024 * 1024

Source = str | os.PathLike[str] | BinaryIO | AsyncIterable[bytes]


def iter_source(source: Source, read_size: int = READ_SIZE) -> AsyncIterator[bytes | Block]:
    if isinstance(source, str | os.PathLike):
        return _iter_path(os.fspath(source), read_size)
    if hasattr(source, "__aiter__"):
        return _iter_async(source)
    if hasattr(source, "read"):
        return _iter_fileobj(source, read_size)
    raise TypeError(
        "source must be a path, a binary file object or an async iterable of bytes, "
        f"not {type(source).__name__}"
    )


async def _iter_path(path: str, read_size: int) -> AsyncIterator[Block]:
    try:
        if os.path.isdir(path):
            raise SourceError(f"{path} is a directory; this version backs up files and streams")
        f = await aiofiles.open(path, "rb", buffering=0)
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    try:
        # A regular file is mapped, not copied in (MapReader); pipes and devices are read.
        mappable = stat.S_ISREG(os.fstat(f.fileno()).st_mode) and read_size % mmap.PAGESIZE == 0
        reader = MapReader(read_size) if mappable else BlockReader(read_size)
        while True:
            try:
                block = await asyncio.to_thread(reader.read, f.fileno())
            except OSError as e:
                raise SourceError(f"reading {path} failed: {e.strerror}") from None
            if block is None:
                return
            yield block
    finally:
        await f.close()


async def _iter_fileobj(f: BinaryIO, read_size: int) -> AsyncIterator[bytes]:
    while True:
        try:
            block = await asyncio.to_thread(f.read, read_size)
        except OSError as e:
            raise SourceError(f"reading the source failed: {e.strerror or e}") from None
        if not block:
            return
        yield bytes(block)


async def _iter_async(source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for block in source:
        if not isinstance(block, bytes | bytearray | memoryview):
            raise TypeError(f"the async source yielded {type(block).__name__}, not bytes")
        if block:
            yield bytes(block)
