#!/usr/bin/env python3
"""Generate tests/vectors/fastcdc.json: known-answer cut points of the fastcdc-2020 chunker.

    python3 tests/vectors/make_fastcdc_vectors.py            # rewrite the JSON
    python3 tests/vectors/make_fastcdc_vectors.py --check    # exit 1 if it would change

Never edit the JSON by hand. The vectors pin the on-disk format: if a regenerated file
differs, the chunker changed, and dedupe would stop deduplicating against every existing
repository. Cut points come from the native chunker and are checked against the
pure-Python twin before anything is written.

Every input is described in the file itself, so other implementations can use it:
  random: BLAKE3 XOF (unkeyed) of the UTF-8 seed string, `length` bytes;
  text:   BLAKE3 XOF of the seed, `length` bytes; each XOF byte b picks
          words[b % len(words)], words joined by a space except every 12th word, which is
          followed by "\n"; the UTF-8 result cut to `length` bytes;
  zeros:  `length` zero bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "fastcdc.json")

WORDS = [
    "insert",
    "into",
    "messages",
    "values",
    "select",
    "from",
    "where",
    "user",
    "id",
    "null",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "they",
    "be",
    "at",
    "one",
    "have",
]

KEYS = {
    "counting": bytes(range(32)).hex(),
    "derived": blake3.blake3(b"dedupe fastcdc test key").digest().hex(),
}

PARAMS = {
    "tiny": {"min_size": 64, "avg_size": 256, "max_size": 1024, "normalization": 2},
    "small-nc0": {"min_size": 256, "avg_size": 1024, "max_size": 4096, "normalization": 0},
    "small-nc3": {"min_size": 512, "avg_size": 2048, "max_size": 8192, "normalization": 3},
    "default": {"min_size": 4096, "avg_size": 16384, "max_size": 65536, "normalization": 2},
}

# (name, key, params, input description)
CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("tiny-random", "counting", "tiny", {"kind": "random", "seed": "tiny", "length": 20000}),
    ("tiny-zeros", "counting", "tiny", {"kind": "zeros", "length": 5000}),
    (
        "small-nc0-random",
        "derived",
        "small-nc0",
        {"kind": "random", "seed": "nc0", "length": 100000},
    ),
    ("small-nc0-text", "derived", "small-nc0", {"kind": "text", "seed": "nc0", "length": 60000}),
    (
        "small-nc3-random",
        "counting",
        "small-nc3",
        {"kind": "random", "seed": "nc3", "length": 100000},
    ),
    (
        "default-random",
        "derived",
        "default",
        {"kind": "random", "seed": "default", "length": 600000},
    ),
    (
        "default-text",
        "counting",
        "default",
        {"kind": "text", "seed": "default-text", "length": 400000},
    ),
    ("default-zeros", "counting", "default", {"kind": "zeros", "length": 200000}),
    ("default-empty", "counting", "default", {"kind": "zeros", "length": 0}),
    ("default-short", "derived", "default", {"kind": "random", "seed": "short", "length": 4097}),
]


def make_input(desc: dict[str, Any]) -> bytes:
    """The bytes an input description stands for (see the module docstring)."""
    length = desc["length"]
    if desc["kind"] == "zeros":
        return bytes(length)
    xof = blake3.blake3(desc["seed"].encode()).digest(length=length)
    if desc["kind"] == "random":
        return xof
    if desc["kind"] == "text":
        parts = []
        for i, b in enumerate(xof):
            parts.append(WORDS[b % len(WORDS)])
            parts.append("\n" if i % 12 == 11 else " ")
        return "".join(parts).encode()[:length]
    raise ValueError(f"unknown input kind {desc['kind']!r}")


def cut_digest(vectors: list[dict[str, Any]]) -> str:
    """BLAKE3 over every vector's name and cut points, in file order (the golden digest)."""
    h = blake3.blake3()
    for v in vectors:
        h.update(v["name"].encode() + b"\0")
        for end in v["cut_points"]:
            h.update(end.to_bytes(8, "little"))
        h.update(b"\xff" * 8)
    return str(h.hexdigest())


def build() -> dict[str, Any]:
    sys.path.insert(0, ROOT)
    from dedupe.chunking import Chunker, ChunkerParams, PyChunker, gear_table
    from dedupe.chunking.gear import GEAR_CONTEXT

    vectors = []
    for name, key_name, params_name, desc in CASES:
        key = bytes.fromhex(KEYS[key_name])
        params = ChunkerParams(**PARAMS[params_name])
        gear = gear_table(key)
        data = make_input(desc)
        native = Chunker(params, gear).chunk_all(data)
        twin = PyChunker(params, gear).chunk_all(data)
        ends, pos = [], 0
        for c in native:
            pos += len(c)
            ends.append(pos)
        twin_ends, pos = [], 0
        for c in twin:
            pos += len(c)
            twin_ends.append(pos)
        if ends != twin_ends:
            raise SystemExit(f"{name}: native and pure-Python chunkers disagree; not writing")
        vectors.append(
            {
                "name": name,
                "key": KEYS[key_name],
                "params": params.to_dict(),
                "gear_table_blake3": blake3.blake3(gear).hexdigest(),
                "input": desc,
                "input_blake3": blake3.blake3(data).hexdigest(),
                "cut_points": ends,
            }
        )
    return {
        "description": "fastcdc-2020 known-answer cut points; generated by "
        "tests/vectors/make_fastcdc_vectors.py, never edited by hand",
        "algorithm": "fastcdc-2020",
        "gear_derivation": f"blake3 derive_key(context={GEAR_CONTEXT!r}, key material = key), "
        "2048 bytes = 256 little-endian uint64",
        "cut_points_are": "exclusive end offsets of each chunk in the input",
        "input_kinds": __doc__.split(
            "Every input is described in the file itself, so other implementations can use it:\n"
        )[1].strip(),
        "text_words": WORDS,
        "cut_points_blake3": cut_digest(vectors),
        "vectors": vectors,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on change")
    args = ap.parse_args()
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        with open(OUT) as f:
            same = f.read() == text
        print("fastcdc.json is up to date" if same else "fastcdc.json WOULD CHANGE")
        raise SystemExit(0 if same else 1)
    with open(OUT, "w") as f:
        f.write(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
