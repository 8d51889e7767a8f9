"""Prune's check of the copy it keeps (docs/FORMAT.md 14.3), where a copy lies in its
pack: every range of a pack is read as the range it is, wherever it starts.

Prune reads the chosen copies of duplicated chunks in coalesced ranges of each pack and
drops those that do not open. A good copy judged bad is dropped too, and the next best
copy, when it is the only other one, is kept without a check: a writer's forged copy
then replaces the real one, and the real pack goes.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest
from conftest import make_repo

from dedupe.format.manifest import CHUNK_RECORD
from security.test_adversary import (
    Run,
    files_under,
    plant_indexed_pack,
    restores,
    with_key,
)

KiB = 1024


def test_a_good_copy_after_a_dead_gap_is_checked_as_good(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real pack holds the live chunks of `a` and `b` with a dead run (the chunks of
    a forgotten generation, longer than the gap prune reads through) between them, so
    `b`'s copies are a range of their own, far into the pack. A writer indexes garbage
    copies of `b`'s chunks in a pack a third of it dead: less full than the real pack, so
    the real copies are chosen and checked first, but not sparse enough to be repacked
    (which would open its copies). The real copies are good: prune keeps them, deletes the
    writer's pack, and the generation restores. (A range read as any other length than
    its own, past the pack's end, would fail `b`'s copies: the garbage would be kept
    unchecked and the real pack deleted.)"""

    async def go() -> None:
        rnd = random.Random(41)
        a, dead, b = rnd.randbytes(512 * KiB), rnd.randbytes(300 * KiB), rnd.randbytes(512 * KiB)
        async with await make_repo(repo_path, pack_size=4096 * KiB) as repo:
            first = await repo.backup(io.BytesIO(a + dead + b), name="x", kind="full")
            kept = await repo.backup(io.BytesIO(a + b), name="y", kind="full")
            await repo.forget(ids=[first.id])
            reports: list[str] = []
            monkeypatch.setattr(repo._store, "report", reports.append)
            # The chunks of `b` in the real pack: past `a` and the dead run.
            index = repo._store.index
            _meta, table = await repo._store.generation_chunks(kept.id)
            far = [
                (cid, loc.raw_length)
                for cid, _n in CHUNK_RECORD.iter_unpack(table)
                if (loc := index.get(cid)) is not None and loc.offset > len(a) + len(dead) // 2
            ]
            assert len(far) > 3
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                garbage = [(cid, os.urandom(raw)) for cid, raw in far]
                filler = (os.urandom(32), os.urandom(sum(raw for _c, raw in far) // 2))
                forged = await plant_indexed_pack(
                    writer._store, repo_path, [*garbage, filler], claimed_raw=dict(far)
                )

            await repo.prune()
            left = {p.name for p in files_under(repo_path, "packs")}
            assert forged.hex() not in left
            # No good copy judged bad. (The writer's copies may be checked first and fail:
            # which pack looks fuller depends on where the repository's keyed chunker
            # cuts, which changes with each repository; that is a report of its pack.)
            real = [r for r in reports if "does not open" in r and forged.hex() not in r]
            assert not real, reports
            assert await restores(repo, kept.id, a + b)

    run_asyncio(go())
