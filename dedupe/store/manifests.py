"""Writing a generation manifest (docs/FORMAT.md section 8) without holding its table.

A backup's chunk table is the one thing it produces that grows with the snapshot: 36
bytes per chunk, so 2.3 MiB per GiB at the default chunk size, and more for a snapshot
whose chunks repeat (a large run of zeros is one chunk in the repository but a record per
chunk in the table). A `ManifestWriter` takes the records as the pipeline produces them,
compresses and seals each 16,384 of them as a frame, and spills the sealed frames to an
unnamed temporary file (`TMPDIR`; nothing is left if the process dies). At the commit it
seals the meta frame and the header, which carries the statistics and the body's hash,
and the backend stores the object from the spilled frames. The header and the body have
keys of their own (writers read every header, readers every body). What it holds in memory is
one frame of records and its sealed copy, whatever the size of the snapshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

import blake3
import zstandard

from dedupe.crypto import new_key, seal
from dedupe.errors import ScratchError
from dedupe.format.manifest import (
    CHUNK_RECORD,
    FRAME_LENGTH,
    FRAME_RECORDS,
    HEADER_AAD,
    HEADER_VERSION,
    MAX_META_FRAME,
    encode_meta,
    encode_prefix,
    frame_aad,
)

FRAME_BYTES = FRAME_RECORDS * CHUNK_RECORD.size
# Pieces in which the spilled body is read back (to hash it, to store it).
READ_PIECE = 1 << 20
COMPRESSION_LEVEL = 3

Buffer = bytes | bytearray | memoryview


class ManifestWriter:
    """One manifest being written: `add` the table's records in order, then `finish` with
    the header and meta, then store `parts()` under `generations/<gen_id>`, after a key
    map entry made from `header_key` and `body_key`. `close` removes the spill; use it as
    a context manager. No key is written into the manifest's bytes."""

    def __init__(self) -> None:
        self.header_key = new_key()
        self.body_key = new_key()
        self._compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
        self._body_hash = blake3.blake3()
        self._pending = bytearray()  # fewer than FRAME_RECORDS records
        self._frames = 0
        self._prefix: bytes | None = None
        self._body_size = 0
        self.records = 0
        try:
            self._spill = self._open_spill()
        except OSError as e:
            raise scratch_error(e, "creating", "the manifest's") from None

    @staticmethod
    def _open_spill() -> BinaryIO:
        return tempfile.TemporaryFile(prefix="dedupe-manifest-")

    def __enter__(self) -> ManifestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Whatever is still buffered is discarded with the file: a full disk that failed
        # the backup must not fail its clean-up too.
        with contextlib.suppress(OSError):
            self._spill.close()

    def add(self, records: Buffer) -> None:
        """Append CHUNK_RECORDs (a whole number of them) to the table."""
        if self._prefix is not None:
            raise ValueError("the manifest is already finished")
        view = memoryview(records).cast("B")
        if len(view) % CHUNK_RECORD.size:
            raise ValueError("a chunk table holds whole CHUNK_RECORDs")
        self.records += len(view) // CHUNK_RECORD.size
        if self._pending:
            take = min(len(view), FRAME_BYTES - len(self._pending))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < FRAME_BYTES:
                return
            self._seal_frame(self._pending)
            self._pending = bytearray()
        while len(view) >= FRAME_BYTES:
            self._seal_frame(view[:FRAME_BYTES])
            view = view[FRAME_BYTES:]
        self._pending += view

    def finish(self, header: dict[str, Any], meta: dict[str, Any]) -> str:
        """Seal the last table frame, the meta frame and the header. `meta["chunk_count"]`
        must be the number of records added; the header gets the body's hash. Returns the
        generation id: the BLAKE3 of the prefix (magic, length, sealed header)."""
        if int(meta["chunk_count"]) != self.records:
            raise ValueError(
                f"meta says {meta['chunk_count']} records, the table has {self.records}"
            )
        if self._pending:
            self._seal_frame(self._pending)
            self._pending = bytearray()
        meta_json = encode_meta(meta)
        if len(meta_json) > MAX_META_FRAME:
            raise ValueError(
                f"the manifest's meta is {len(meta_json)} bytes, over {MAX_META_FRAME}"
            )
        self._seal_frame(meta_json)
        try:
            self._spill.flush()
        except OSError as e:
            raise scratch_error(e, "writing", "the manifest's") from None
        header = dict(header, version=HEADER_VERSION, body=self._body_hash.hexdigest())
        sealed = seal(self.header_key, json.dumps(header).encode(), HEADER_AAD)
        self._prefix = encode_prefix(sealed)
        return str(blake3.blake3(self._prefix).hexdigest())

    @property
    def prefix(self) -> bytes:
        """The manifest's prefix (magic, length, sealed header), once finished: the bytes
        its id is the hash of."""
        if self._prefix is None:
            raise RuntimeError("the manifest is not finished")
        return self._prefix

    @property
    def size(self) -> int:
        """The finished manifest's length in bytes."""
        return len(self.prefix) + self._body_size

    def parts(self) -> Iterator[bytes]:
        """The manifest's bytes, in order, in pieces of at most 1 MiB (blocking reads)."""
        if self._prefix is None:
            raise ValueError("finish() the manifest first")
        yield self._prefix
        yield from read_scratch(self._spill, 0, self._body_size, READ_PIECE)

    def _seal_frame(self, payload: Buffer) -> None:
        # One zstd frame that records its content size, as readers decompress in one shot.
        sealed = seal(self.body_key, self._compressor.compress(payload), frame_aad(self._frames))
        self._frames += 1
        self._write(FRAME_LENGTH.pack(len(sealed)))
        self._write(sealed)

    def _write(self, data: bytes) -> None:
        try:
            self._spill.write(data)
        except OSError as e:
            raise scratch_error(e, "writing", "the manifest's") from None
        self._body_hash.update(data)
        self._body_size += len(data)


def open_scratch() -> BinaryIO:
    """An unnamed temporary file in TMPDIR (O_TMPFILE where the OS has it, else unlinked
    at once), so nothing is left behind when the process dies. ScratchError on failure."""
    try:
        return tempfile.TemporaryFile(prefix="dedupe-")
    except OSError as e:
        raise scratch_error(e, "creating", "a") from None


def read_scratch(f: BinaryIO, start: int, end: int, piece: int) -> Iterator[bytes]:
    """Bytes `start`..`end` of a scratch file, in pieces of `piece` bytes (the last may
    be shorter), with pread: the file's position is left alone. ScratchError when it
    cannot be read or ends early."""
    fd = f.fileno()
    pos = start
    while pos < end:
        want = min(piece, end - pos)
        try:
            data = os.pread(fd, want, pos)
            while 0 < len(data) < want:  # a short read: go on from where it stopped
                more = os.pread(fd, want - len(data), pos + len(data))
                if not more:
                    break
                data += more
        except OSError as e:
            raise scratch_error(e, "reading", "a") from None
        if len(data) != want:
            raise ScratchError(f"a temporary file ended at {pos + len(data)} of {end} bytes")
        pos += want
        yield data


def write_scratch(f: BinaryIO, data: Buffer) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise scratch_error(e, "writing", "a") from None


def scratch_error(e: OSError, action: str, whose: str) -> ScratchError:
    where = tempfile.gettempdir()
    return ScratchError(
        f"{action} {whose} temporary file in {where} failed: {e.strerror or e}",
        hint="set TMPDIR to a directory with room (about 2.5 MiB per GiB of snapshot); "
        "nothing was committed",
    )
