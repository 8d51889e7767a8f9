"""Known-answer cut points: tests/vectors/fastcdc.json (made by make_fastcdc_vectors.py)."""

from __future__ import annotations

import importlib.util
import json
import os
from types import ModuleType
from typing import Any

import blake3
import pytest

from dedupe.chunking import Chunker, ChunkerParams, PyChunker, gear_table

VECTORS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vectors")

# BLAKE3 over the names and cut points of every vector in fastcdc.json.
# changing this breaks dedupe against every existing repository
GOLDEN_CUT_POINTS_BLAKE3 = "b7bd403caae77f5bee25a904a7fc920309027cfd6e501f72a908fec4a1b2195b"


def load_maker() -> ModuleType:
    path = os.path.join(VECTORS_DIR, "make_fastcdc_vectors.py")
    spec = importlib.util.spec_from_file_location("make_fastcdc_vectors", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKER = load_maker()
with open(os.path.join(VECTORS_DIR, "fastcdc.json")) as f:
    FILE: dict[str, Any] = json.load(f)


def test_golden_digest() -> None:
    assert MAKER.cut_digest(FILE["vectors"]) == FILE["cut_points_blake3"]
    assert FILE["cut_points_blake3"] == GOLDEN_CUT_POINTS_BLAKE3


def ends(chunks: list[memoryview]) -> list[int]:
    out, pos = [], 0
    for c in chunks:
        pos += len(c)
        out.append(pos)
    return out


@pytest.mark.parametrize("vector", FILE["vectors"], ids=lambda v: v["name"])
def test_vector(vector: dict[str, Any]) -> None:
    gear = gear_table(bytes.fromhex(vector["key"]))
    assert blake3.blake3(gear).hexdigest() == vector["gear_table_blake3"]
    data = MAKER.make_input(vector["input"])
    assert blake3.blake3(data).hexdigest() == vector["input_blake3"]
    params = ChunkerParams.from_dict(vector["params"])
    assert ends(Chunker(params, gear).chunk_all(data)) == vector["cut_points"]
    assert ends(PyChunker(params, gear).chunk_all(data)) == vector["cut_points"]
    ch = Chunker(params, gear)
    streamed = []
    for off in range(0, len(data), 12345):
        streamed += ch.feed(data[off : off + 12345])
    assert ends(streamed + ch.finish()) == vector["cut_points"]
