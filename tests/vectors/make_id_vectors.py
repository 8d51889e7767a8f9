"""Known-answer chunk ids and stream digests (docs/FORMAT.md 2 and 4.1), computed from the
spec with the blake3 package alone, not with dedupe's code:

    chunk id      = BLAKE3(chunk, key=id_key)
    digest key    = BLAKE3-derive-key(context="dedupe 2026-11 stream digest v1", id_key)
    stream digest = BLAKE3(whole stream, key=digest key)

Run it to (re)write ids.json beside it; tests/store/test_id_vectors.py checks that dedupe
computes the same values and that this script still writes exactly that file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import blake3

KEY = bytes(range(32))  # the fixed id_key of the vectors
CONTEXT = "dedupe 2026-11 stream digest v1"
LENGTHS = [0, 1, 63, 64, 1023, 1024, 1025, 4096, 16384, 65543]
HERE = os.path.dirname(os.path.abspath(__file__))


def pattern(length: int) -> bytes:
    """BLAKE3's own test input: byte i is i mod 251."""
    return bytes(i % 251 for i in range(length))


def vectors() -> dict[str, Any]:
    digest_key = blake3.blake3(KEY, derive_key_context=CONTEXT).digest()
    chunks = [pattern(n) for n in LENGTHS]
    return {
        "id_key": KEY.hex(),
        "input": "byte i of a chunk of length n is i mod 251",
        "chunk_ids": {
            str(n): blake3.blake3(c, key=KEY).hexdigest()
            for n, c in zip(LENGTHS, chunks, strict=True)
        },
        "digest_key": digest_key.hex(),
        "stream": "the chunks above, in order, concatenated",
        "stream_digest": blake3.blake3(b"".join(chunks), key=digest_key).hexdigest(),
    }


def render() -> str:
    return json.dumps(vectors(), indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    path = os.path.join(HERE, "ids.json")
    with open(path, "w") as f:
        f.write(render())
    sys.stdout.write(f"wrote {path}\n")
