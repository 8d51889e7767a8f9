"""Writes repo-v2/, a small repository of format version 2, and repo-v2.json, what it holds.

Every later dedupe must still read this repository (or refuse it with a clear message, if
the format version it is at says so: docs/FORMAT.md 12); tests/store/test_stored_repository.py
checks that. The content of every generation is regenerated from `content()` (fixed seeds),
so the expectations hold no copy of the data. Keys are random (a repository cannot be made
with fixed keys), so run this only to make a new vector, and commit both outputs:

    python tests/vectors/make_repo_vector.py
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE / "repo-v2"
EXPECTED = HERE / "repo-v2.json"
PASSPHRASE = "dedupe format vector, version 2"
READER_PASSPHRASE = "dedupe format vector, reader"


def content() -> dict[str, Any]:
    """The data of every generation, by step: three stream versions and one tree."""
    rnd = random.Random(20261205)
    day1 = rnd.randbytes(300_000)
    day2 = day1[:100_000] + rnd.randbytes(40_000) + day1[140_000:] + rnd.randbytes(20_000)
    day3 = day2[:200_000] + rnd.randbytes(30_000) + day2[230_000:]
    tree = {
        "etc/app.conf": b"listen = 127.0.0.1:5432\nmax_connections = 100\n",
        "etc/empty": b"",
        "data/blob.bin": rnd.randbytes(90_000),
    }
    return {"day1": day1, "day2": day2, "day3": day3, "tree": tree}


async def make() -> dict[str, Any]:
    from dedupe import Repository
    from dedupe.crypto import KdfParams

    data = content()
    weak = KdfParams.weakest()
    gens: list[dict[str, Any]] = []
    async with await Repository.init(REPO, PASSPHRASE, pack_size=64 * 1024, kdf=weak) as repo:
        for step, kind in (("day1", "full"), ("day2", "incremental"), ("day3", "differential")):
            stats = await repo.backup(io.BytesIO(data[step]), name="db", kind=kind)
            gens.append({"id": stats.id, "name": "db", "kind": stats.kind, "step": step})
        with tempfile.TemporaryDirectory() as tmp:
            for rel, raw in data["tree"].items():
                path = Path(tmp, "src", rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(raw)
            stats = await repo.backup(Path(tmp, "src"), name="etc", kind="full")
            gens.append({"id": stats.id, "name": "etc", "kind": stats.kind, "step": "tree"})
        await repo.keys.add(READER_PASSPHRASE, role="reader", name="reader", kdf=weak)
        parents = {g.id: g.parent for g in await repo.generations()}
    for g in gens:
        g["parent"] = parents[g["id"]]
    return {
        "format_version": 2,
        "passphrase": PASSPHRASE,
        "reader_passphrase": READER_PASSPHRASE,
        "generations": gens,
    }


if __name__ == "__main__":
    if REPO.exists():
        shutil.rmtree(REPO)
    os.environ["DEDUPE_STATE_DIR"] = tempfile.mkdtemp()  # not this user's client state
    expected = asyncio.run(make())
    for lock in (REPO / "locks").glob("*"):
        lock.unlink()
    EXPECTED.write_text(json.dumps(expected, indent=1) + "\n")
    sys.stdout.write(f"wrote {REPO} and {EXPECTED}\n")
