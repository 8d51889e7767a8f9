"""Chunking strategies, named in the format (DESIGN.md, "Chunkers are strategies").

- `fastcdc-2020`: content-defined (the repository's parameters, keyed gear table). Suits
  logical dumps and anything where an insert shifts every later byte.
- `fixed`: blocks of `block_size` bytes at fixed offsets. Suits page files (SQLite
  databases, PostgreSQL relation files), which keep each page at its offset: measured on
  the shared 256 MiB SQLite pair, day 2 stores 19.5 MB with 4 KiB blocks against 60.4 MB
  with FastCDC 16 KiB (docs/CHUNKING.md).
- `tar`: a tar stream cut member by member, PostgreSQL relation files into 8 KiB pages
  counted from each file's start, the rest by FastCDC (dedupe.chunking.tarcut). Suits
  physical PostgreSQL backups (`pg_basebackup -Ft`).
- `auto` (the default of a backup) picks per file from its first bytes: a SQLite database
  gets `fixed` at its own page size, a tar `tar`, everything else `fastcdc-2020`.

The strategy used is recorded in each generation's header; restore does not depend on it
(a generation lists its chunks), so strategies can be added without a format break.
"""

from __future__ import annotations

from typing import Any, Protocol

from typing_extensions import Buffer

from ._fastcdc import Block
from .params import ALGORITHM as FASTCDC
from .params import ChunkerParams
from .tarcut import TarChunker, looks_like_tar, tar_spec

FIXED = "fixed"
TAR = "tar"
POSTGRES_PAGE = 8192  # BLCKSZ of a stock PostgreSQL build
AUTO = "auto"
SQLITE_MAGIC = b"SQLite format 3\x00"
MIN_BLOCK = 512
SNIFF_BYTES = 512  # what auto looks at: a tar header is 512 bytes
MAX_BLOCK = 16 << 20


class StreamChunker(Protocol):
    def feed(self, data: Buffer) -> list[memoryview]: ...
    def finish(self) -> list[memoryview]: ...


class FixedChunker:
    """Cuts a stream into `block_size` pieces at fixed offsets; the last may be shorter.
    Same contract as the FastCDC Chunker: feed() returns the blocks completed so far as
    read-only memoryview slices, independent of how the stream is split into feeds, and
    like it copies no immutable input (bytes, a reader's Block): only a mutable buffer,
    and the few bytes of a block that straddles two feeds."""

    def __init__(self, block_size: int) -> None:
        if not MIN_BLOCK <= block_size <= MAX_BLOCK:
            raise ValueError(f"block size must be within {MIN_BLOCK}..{MAX_BLOCK} bytes")
        self.block_size = block_size
        self._rest = b""

    def feed(self, data: Buffer) -> list[memoryview]:
        n = self.block_size
        view = memoryview(data if immutable(data) else bytes(data)).toreadonly()
        out: list[memoryview] = []
        if self._rest:
            need = n - len(self._rest)
            if len(view) < need:
                self._rest += bytes(view)
                return out
            out.append(memoryview(self._rest + bytes(view[:need])).toreadonly())
            view = view[need:]
        whole = len(view) - len(view) % n
        out += [view[i : i + n] for i in range(0, whole, n)]
        self._rest = bytes(view[whole:])
        return out

    def finish(self) -> list[memoryview]:
        rest, self._rest = self._rest, b""
        return [memoryview(rest).toreadonly()] if rest else []


def immutable(data: Buffer) -> bool:
    """Whether `data`'s bytes can never change: bytes, a reader's Block, or a view of
    one (chunks may then be slices of it; anything else is copied first)."""
    owner = data.obj if type(data) is memoryview else data
    return type(owner) is bytes or type(owner) is Block


def fixed_spec(block_size: int) -> dict[str, Any]:
    FixedChunker(block_size)  # validates
    return {"algorithm": FIXED, "block_size": block_size}


def parse_spec(text: str, params: ChunkerParams) -> dict[str, Any] | str:
    """A user's choice: "auto", "fastcdc", "tar", or "fixed:SIZE" (e.g. fixed:4096)."""
    if text == AUTO:
        return AUTO
    if text == TAR:
        return tar_spec(POSTGRES_PAGE, params.to_dict())
    if text in ("fastcdc", FASTCDC):
        return params.to_dict()
    if text.startswith("fixed:") and text[6:].isdigit():
        return fixed_spec(int(text[6:]))
    raise ValueError(f"unknown chunker {text!r}: use auto, fastcdc, tar or fixed:SIZE")


def kept_spec(previous: Any, params: ChunkerParams) -> dict[str, Any] | str:
    """The strategy a backup uses when none is asked for: the one the name's latest
    generation recorded (`previous`: its header's "chunker"), so that a name keeps its
    chunk boundaries and keeps deduplicating; several (a tree cut by auto) mean auto.
    A new name (nothing recorded) gets auto: page files (SQLite) are cut on their page
    boundaries, anything else by FastCDC. A strategy this version cannot use: fastcdc."""
    if previous is None or isinstance(previous, list):
        return AUTO
    try:
        if isinstance(previous, dict) and previous.get("algorithm") == FIXED:
            return fixed_spec(int(previous["block_size"]))
        if isinstance(previous, dict) and previous.get("algorithm") == FASTCDC:
            return ChunkerParams.from_dict(previous).to_dict()
        if isinstance(previous, dict) and previous.get("algorithm") == TAR:
            fastcdc = ChunkerParams.from_dict(previous["fastcdc"]).to_dict()
            return tar_spec(_page_size(previous["page_size"]), fastcdc)
    except (KeyError, TypeError, ValueError):  # not a strategy this version can use
        pass
    return params.to_dict()


def describe(spec: Any) -> str:
    """A strategy for people: "fastcdc (avg 16384 B)", "fixed:4096", "auto"."""
    if isinstance(spec, list):
        return " + ".join(describe(s) for s in spec)
    if isinstance(spec, dict) and spec.get("algorithm") == FIXED:
        return f"fixed:{spec.get('block_size')}"
    if isinstance(spec, dict) and spec.get("algorithm") == TAR:
        return f"tar (pages {spec.get('page_size')} B)"
    if isinstance(spec, dict):
        return f"fastcdc (avg {spec.get('avg_size')} B)"
    return str(spec)


def sniff(first: bytes, params: ChunkerParams) -> dict[str, Any]:
    """The strategy `auto` picks for content starting with `first` (its first SNIFF_BYTES,
    or all of it when shorter)."""
    if first.startswith(SQLITE_MAGIC) and len(first) >= 18:
        page = int.from_bytes(first[16:18], "big")
        page = 65536 if page == 1 else page
        if MIN_BLOCK <= page <= 65536 and page & (page - 1) == 0:
            return fixed_spec(page)
    if looks_like_tar(first):
        return tar_spec(POSTGRES_PAGE, params.to_dict())
    return params.to_dict()


def make_chunker(spec: dict[str, Any], params: ChunkerParams, gear: bytes) -> StreamChunker:
    from . import Chunker

    def fastcdc(spec: dict[str, Any]) -> StreamChunker:
        return Chunker(ChunkerParams.from_dict(spec) if spec != params.to_dict() else params, gear)

    if spec.get("algorithm") == FIXED:
        return FixedChunker(int(spec["block_size"]))
    if spec.get("algorithm") == TAR:
        return TarChunker(_page_size(spec["page_size"]), lambda: fastcdc(spec["fastcdc"]))
    return fastcdc(spec)


def _page_size(value: Any) -> int:
    size = int(value)
    if not MIN_BLOCK <= size <= 65536 or size & (size - 1) or size % 512:
        raise ValueError(
            f"a tar strategy's page size must be a power of two of 512..65536, not {size}"
        )
    return size
