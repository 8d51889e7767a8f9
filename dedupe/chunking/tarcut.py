"""Member-aware cutting of tar streams (the `tar` strategy).

A physical PostgreSQL backup (`pg_basebackup -Ft`) is a tar of the data directory. Its
relation files keep each 8 KiB page at its offset, like a SQLite file, but inside the tar
they start wherever the previous member ended (a multiple of 512 bytes): FastCDC over the
whole stream stores a changed page with its ~16 KiB of neighbours, and fixed blocks over
the whole stream straddle pages. This chunker follows the tar headers and cuts the data
of every relation file (`base/<db>/<relfilenode>[_fsm|_vm|_init][.<segment>]`, `global/...`,
the directories of tablespaces) into pages counted from the file's own start,
so an unchanged page gives the same chunk whatever moved before it in the archive.
Everything else (headers, other files, padding, the end of the archive) goes through
FastCDC as one sub-stream, which is cut (finished) where a relation file's pages begin.

The cuts never affect what is stored, only how it deduplicates, so the chunker is
lenient: a header whose checksum does not verify, or a stream that is not a tar after
all, makes it hand the rest of the stream to FastCDC. Like the other chunkers, the chunks
do not depend on how the stream is split into feeds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from typing_extensions import Buffer

BLOCK = 512  # a tar header; member data is padded to a multiple of it
USTAR_MAGIC = b"ustar"  # at offset 257 of a POSIX (ustar) or GNU header
# In base.tar: base/<db>/, global/ and pg_tblspc/<oid>/<version dir>/<db>/; in the tar of
# a tablespace (pg_basebackup -Ft -D DIR writes one per tablespace): <version dir>/<db>/.
RELATION_FILE = re.compile(
    rb"(?:\./)?(?:base/\d+|global|(?:pg_tblspc/\d+/)?PG_[^/]+/\d+)"  # its directory
    rb"/\d+(?:_(?:fsm|vm|init))?(?:\.\d+)?"  # relfilenode, fork, segment
)
_REGULAR = (b"0", b"\x00", b"7")  # typeflags of a regular file's header

_HEADER, _PAGES, _OTHER, _RAW = range(4)


class _Chunker(Protocol):
    def feed(self, data: Buffer) -> list[memoryview]: ...
    def finish(self) -> list[memoryview]: ...


def looks_like_tar(first: bytes) -> bool:
    """Whether `first` (at least 512 bytes) starts with a ustar header that verifies."""
    return len(first) >= BLOCK and _parse(first[:BLOCK]) is not None


def _octal(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:  # GNU base-256: a big-endian number
        return int.from_bytes(field[1:], "big") if field[0] == 0x80 else None
    text = field.split(b"\x00", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _parse(header: bytes) -> tuple[bytes, int, bytes] | None:
    """(path, size, typeflag) of a ustar/GNU header; None when it is not one (wrong
    magic or checksum, an unreadable size)."""
    if header[257:262] != USTAR_MAGIC:
        return None
    recorded = _octal(header[148:156])
    if recorded is None or recorded != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        return None
    size = _octal(header[124:136])
    if size is None:
        return None
    name = header[:100].split(b"\x00", 1)[0]
    prefix = header[345:500].split(b"\x00", 1)[0] if header[257:263] == b"ustar\x00" else b""
    return (prefix + b"/" + name if prefix else name), size, header[156:157]


class TarChunker:
    """Cuts a tar stream member by member (see the module); feed() and finish() as the
    FastCDC Chunker's. `other` makes the FastCDC chunker for everything that is not a
    relation file's pages."""

    def __init__(self, page_size: int, other: Callable[[], _Chunker]) -> None:
        from .strategy import FixedChunker  # (strategy imports this module)

        self.page_size = page_size
        self._other = other()
        self._pages = FixedChunker(page_size)  # a relation file's, finished at its end
        self._reset()

    def _reset(self) -> None:
        self._state = _HEADER
        self._header = bytearray()  # the header being gathered
        self._left = 0  # bytes of the current region (pages, or other data) still to come

    def feed(self, data: Buffer) -> list[memoryview]:
        from .strategy import immutable

        view = memoryview(data if immutable(data) else bytes(data)).toreadonly()
        out: list[memoryview] = []
        while view:
            if self._state == _RAW:
                out += self._other.feed(view)
                break
            if self._state == _HEADER:
                take = BLOCK - len(self._header)
                self._header += view[:take]
                out += self._other.feed(view[:take])
                view = view[take:]
                if len(self._header) == BLOCK:
                    out += self._begin_member()
            elif self._state == _OTHER:
                part = view[: self._left]
                out += self._other.feed(part)
                self._left -= len(part)
                view = view[len(part) :]
                if not self._left:
                    self._state = _HEADER
            else:
                view = self._cut_pages(view, out)
        return out

    def _begin_member(self) -> list[memoryview]:
        header, self._header = bytes(self._header), bytearray()
        parsed = _parse(header)
        if parsed is None:
            # The end of the archive (zero blocks), or not a tar after all: the rest of
            # the stream, whatever it is, goes to FastCDC.
            self._state = _RAW
            return []
        path, size, typeflag = parsed
        padded = -size % BLOCK + size
        if (
            typeflag in _REGULAR
            and size
            and not size % self.page_size
            and RELATION_FILE.fullmatch(path)
        ):
            self._state, self._left = _PAGES, size
            return self._other.finish()  # pages start on a cut of their own
        self._state, self._left = (_OTHER, padded) if padded else (_HEADER, 0)
        return []

    def _cut_pages(self, view: memoryview, out: list[memoryview]) -> memoryview:
        """Cut the pages of the current relation file from the start of `view`; return
        what follows them (or nothing, when the file goes on in the next feed)."""
        mine = view[: self._left]
        self._left -= len(mine)
        out += self._pages.feed(mine)
        if not self._left:
            # Sizes are whole pages (nothing is left pending) and multiples of 512 (no
            # padding follows).
            out += self._pages.finish()
            self._state = _HEADER
        return view[len(mine) :]

    def finish(self) -> list[memoryview]:
        # One of the two holds bytes at most: the other was finished where pages began,
        # and the pages are finished where their file ends.
        out = self._other.finish() + self._pages.finish()
        self._reset()
        return out


def tar_spec(page_size: int, fastcdc: dict[str, Any]) -> dict[str, Any]:
    return {"algorithm": "tar", "page_size": page_size, "fastcdc": fastcdc}
