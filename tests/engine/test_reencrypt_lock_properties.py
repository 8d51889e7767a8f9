"""`key rotate --reencrypt` runs prune under the lock the rotation took (run_prune with
lock=False), and that prune confirms the lock before each step that writes or deletes,
as the prune command does (FORMAT.md 14.1; tests/store/test_locks.py for the command)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo

from dedupe.errors import RepositoryLocked


@pytest.mark.parametrize("stage", ["repacking", "deleting packs"])
def test_a_reencryption_whose_lock_is_removed_stops_before_its_next_step(  # type: ignore[no-untyped-def]
    run_asyncio, repo_path: Path, stage: str
) -> None:
    """The rotation's lock removed when its prune reaches `stage` (as a run stopped past
    the stale time would find it, with a backup perhaps started beside it since): it
    raises RepositoryLocked before that step does anything (no old pack deleted), and
    every generation still restores."""
    data = [os.urandom(300_000), os.urandom(200_000)]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gens = [await repo.backup(io.BytesIO(d), name=f"n{i}") for i, d in enumerate(data)]
            before = {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}
            seen: list[str] = []

            def steal(progress: Any) -> None:
                seen.append(progress.stage)
                if progress.stage == stage:
                    for lock in (repo_path / "locks").iterdir():
                        lock.unlink()

            with pytest.raises(RepositoryLocked, match="removed or replaced"):
                await repo.keys.rotate(reencrypt=True, progress=steal)
            assert stage in seen
            after = {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}
            assert before <= after
            for gen, d in zip(gens, data, strict=True):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == d

    run_asyncio(go())
