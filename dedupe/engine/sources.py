"""Turn what the caller hands to backup() into an async iterator of large byte blocks.

A regular file is mapped window by window (dedupe.chunking.MapReader): the chunker and
the hashes read the page cache's pages in place, with no copy. If the file shrinks under
a window in use, the backup fails before its commit (dedupe.engine.backup.ingest checks
the reader's `torn`). Other files (pipes, devices), and file objects over a descriptor
(stdin, a pipe from pg_dump), are read into reusable read-only blocks (BlockReader), read
into again only once no chunk, digest or queue refers to them; a fresh buffer per read
would cost a page fault per 4 KiB. Any other file object is read with its own read()."""

from __future__ import annotations

import asyncio
import io
import mmap
import os
import stat
from collections.abc import AsyncIterable, AsyncIterator
from typing import BinaryIO

import aiofiles

from dedupe.chunking import Block, BlockReader, MapReader
from dedupe.engine.commands import Command, command_output
from dedupe.errors import SourceError

READ_SIZE = 2 * 1024 * 1024

Source = str | os.PathLike[str] | BinaryIO | AsyncIterable[bytes] | Command


def iter_source(source: Source, read_size: int = READ_SIZE) -> AsyncIterator[bytes | Block]:
    if isinstance(source, Command):
        return command_output(source, read_size)
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
        fd = f.fileno()
        # A regular file is mapped, not copied in (MapReader); pipes and devices are read.
        mappable = stat.S_ISREG(os.fstat(fd).st_mode) and read_size % mmap.PAGESIZE == 0
        mapped = 0
        if mappable:
            async for block in _blocks(MapReader(read_size), fd, path):
                mapped += len(block)
                yield block
            # MapReader stops at the size the file reports. Some report less than they
            # hold (/proc files say 0; a log may grow): read on to the real end.
            os.lseek(fd, mapped, os.SEEK_SET)
        async for block in _blocks(BlockReader(read_size), fd, path):
            yield block
    finally:
        await f.close()


async def _blocks(reader: MapReader | BlockReader, fd: int, what: str) -> AsyncIterator[Block]:
    """The blocks of fd, read on a worker thread; SourceError if a read fails."""
    while True:
        try:
            block = await asyncio.to_thread(reader.read, fd)
        except OSError as e:
            raise SourceError(f"reading {what} failed: {e.strerror}") from None
        if block is None:
            return
        yield block


async def _iter_fileobj(f: BinaryIO, read_size: int) -> AsyncIterator[bytes | Block]:
    try:
        direct = await asyncio.to_thread(_descriptor_after_buffer, f)
    except OSError as e:
        raise SourceError(f"reading the source failed: {e.strerror or e}") from None
    if direct is not None:
        # A file object over a descriptor (stdin, a pipe from pg_dump, an open file):
        # what it had buffered, then the descriptor read into reusable blocks. A fresh
        # bytes object per read would page-fault its megabytes in every time.
        fd, buffered = direct
        if buffered:
            yield buffered
        async for block in _blocks(BlockReader(read_size), fd, "the source"):
            yield block
        return
    while True:
        try:
            data = await asyncio.to_thread(f.read, read_size)
        except OSError as e:
            raise SourceError(f"reading the source failed: {e.strerror or e}") from None
        if not data:
            return
        yield bytes(data)


def _descriptor_after_buffer(f: BinaryIO) -> tuple[int, bytes] | None:
    """(descriptor, the bytes f has already buffered from it) when the rest of f can be
    read straight from its descriptor; None for any other file object. Takes the
    buffered bytes out of f (one read of the descriptor if it had none)."""
    if type(f) is io.FileIO:
        return f.fileno(), b""
    if type(f) is io.BufferedReader:
        try:
            fd = f.fileno()
        except (OSError, ValueError, io.UnsupportedOperation):
            return None
        # peek() returns what is buffered, or does one read of the descriptor if nothing
        # is; read() of exactly that many bytes then empties the buffer without reading.
        return fd, f.read(len(f.peek(1)))
    return None


async def _iter_async(source: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    async for block in source:
        if not isinstance(block, bytes | bytearray | memoryview):
            raise TypeError(f"the async source yielded {type(block).__name__}, not bytes")
        if block:
            yield bytes(block)
