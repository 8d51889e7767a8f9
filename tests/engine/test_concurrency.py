"""Several backups into one repository at once; progress events; the stage runner."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Progress, Repository
from dedupe.engine.stages import run_stages
from dedupe.errors import SourceError


def test_concurrent_backups_share_one_repository(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = os.urandom(600_000)
    inputs = {f"db{i}": shared + os.urandom(200_000) for i in range(3)}

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await asyncio.gather(
                *(repo.backup(io.BytesIO(data), name=name) for name, data in inputs.items())
            )
            assert sorted(s.name for s in stats) == sorted(inputs)
        # A second process (here: a second open) sees every generation and restores each.
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            for name, data in inputs.items():
                out = io.BytesIO()
                await repo.restore(f"{name}@latest", out)
                assert out.getvalue() == data
            # The shared part is now indexed: a new backup of it stores nothing.
            again = await repo.backup(io.BytesIO(shared), name="again")
            assert again.bytes_new <= 65536  # at most the chunk straddling the end

    run(go())


def test_progress_events(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(3_000_000)
    events: list[tuple[str, int, int]] = []

    def record(p: Progress) -> None:
        events.append((p.stage, p.bytes_read, p.chunks))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(data), name="p", progress=record)
            restored: list[int] = []
            await repo.restore(
                "latest", io.BytesIO(), progress=lambda p: restored.append(p.bytes_written)
            )
            assert restored[-1] == len(data)
            assert restored == sorted(restored)

    run(go())
    assert events[-1][0] == "done"
    assert events[-1][1] == len(data)
    reads = [e[1] for e in events]
    assert reads == sorted(reads)


def test_run_stages_raises_the_cause_not_a_group(run) -> None:  # type: ignore[no-untyped-def]
    async def fails() -> None:
        await asyncio.sleep(0)
        raise SourceError("boom")

    async def waits() -> None:
        await asyncio.sleep(10)

    with pytest.raises(SourceError, match="boom"):
        run(run_stages(fails, waits))
