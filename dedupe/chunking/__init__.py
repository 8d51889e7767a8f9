"""Content-defined chunking of backup streams: FastCDC 2020 with a keyed gear table.

The engine cuts every source stream into chunks here before naming them by keyed BLAKE3;
identical content cuts identically, so it is stored once. The cut points are part of the
on-disk format ("fastcdc-2020" in the repository config; spec in docs/CHUNKING.md):

    ch = Chunker(params, gear_table(chunker_key))
    chunks = ch.feed(data)      # any bytes-like; the chunks completed so far
    chunks += ch.finish()       # end of stream: the rest (nothing for empty input)

Cut points do not depend on how the stream is split into feed() calls. Chunks are
read-only memoryview slices, valid (and unchanging) for as long as they are referenced:
`bytes` fed in, and the blocks of a `BlockReader` or a `MapReader`, are sliced in place
(only the chunk that straddles two feeds, at most max_size bytes, is copied); any other
buffer is copied once, since its owner may change it. A chunker holds one stream: do not
feed one from two threads at once (different chunkers run in parallel; the kernel
releases the GIL).
`Chunker` is native (csrc/fastcdc.c, GIL released while scanning) and required: this
package does not import without it. `PyChunker` is its slow pure-Python twin and spec.
"""

from __future__ import annotations

try:
    from ._fastcdc import Block, BlockReader, Chunker, MapReader
except ImportError as exc:  # no silent fallback to the 100x slower twin
    raise ImportError(
        "dedupe's native chunker (dedupe.chunking._fastcdc) is not built: install dedupe "
        "with `pip install .`, or run `python3 setup.py build_ext --inplace` in a checkout"
    ) from exc

from ._pure import PyChunker
from .gear import GEAR_CONTEXT, gear_table
from .params import ALGORITHM, DEFAULT_PARAMS, ChunkerParams
from .strategy import (
    AUTO,
    SNIFF_BYTES,
    FixedChunker,
    StreamChunker,
    describe,
    kept_spec,
    make_chunker,
    parse_spec,
    sniff,
)

__all__ = [
    "ALGORITHM",
    "AUTO",
    "SNIFF_BYTES",
    "Block",
    "BlockReader",
    "MapReader",
    "FixedChunker",
    "StreamChunker",
    "describe",
    "kept_spec",
    "make_chunker",
    "parse_spec",
    "sniff",
    "DEFAULT_PARAMS",
    "GEAR_CONTEXT",
    "Chunker",
    "ChunkerParams",
    "PyChunker",
    "gear_table",
]
