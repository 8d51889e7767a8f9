"""Prune killed with SIGKILL at random moments: the repository must stay valid, every
generation listed before must restore byte for byte, and a second prune must finish the
job (docs/FORMAT.md section 13, "Prune ordering").

The kill times are spread over the run: one drawn in each of n equal slices of the time
from a little before the command takes its lock to its end (an uninterrupted run, timed
first), so that no stretch of it goes untried. They are seeded; the seed is printed
(shown on failure). Re-run one with PRUNE_KILL_SEED=<seed>. Each trial runs on a
hard-linked copy of the template (checked to stay untouched).
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PASSPHRASE, files_of, kill_times, linked_copy, lock_and_end, make_repo

from dedupe import Repository

VERSIONS = 12
SIZE = 4_000_000


def versions(seed: int = 11) -> list[bytes]:
    rnd = random.Random(seed)
    data = bytearray(rnd.randbytes(SIZE))
    out = []
    for _ in range(VERSIONS):
        for _ in range(6):
            at = rnd.randrange(0, SIZE - 100_000)
            data[at : at + 100_000] = rnd.randbytes(100_000)
        out.append(bytes(data))
    return out


Template = tuple[Path, dict[str, bytes], float, float]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A repository after forget (most data released, nothing pruned yet), the bytes of
    each remaining generation, and when an uninterrupted prune command takes its lock and
    when it ends."""
    path = tmp_path_factory.mktemp("prune-kill") / "template"

    async def build() -> dict[str, bytes]:
        async with await make_repo(path) as repo:
            by_id = {}
            for v in versions():
                s = await repo.backup(io.BytesIO(v), name="db", kind="full")
                by_id[s.id] = v
            await repo.forget(keep_last=3)
            return {g.id: by_id[g.id] for g in await repo.generations()}

    kept = asyncio.run(build())
    locked, duration = lock_and_end(path, _start_prune)
    return path, kept, locked, duration


def _start_prune(path: Path) -> subprocess.Popen[bytes]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DEDUPE_") or k == "DEDUPE_STATE_DIR"
    }
    env.update(DEDUPE_REPO=str(path), DEDUPE_PASSWORD=PASSPHRASE)
    return subprocess.Popen(
        # Threshold 0: repack every pack with any waste, so that the kill can land in
        # each phase (repack, index, delete index objects, delete packs).
        [sys.executable, "-m", "dedupe", "prune", "--repack-threshold", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _check(path: Path, kept: dict[str, bytes]) -> None:
    async with await Repository.open(path, PASSPHRASE) as repo:
        gens = await repo.generations()
        assert sorted(g.id for g in gens) == sorted(kept)
        for g in gens:
            out = io.BytesIO()
            await repo.restore(g.id, out)
            assert out.getvalue() == kept[g.id], f"generation {g.id} restored wrong bytes"
        # The lock the killed process left behind is stale (its pid is dead): no unlock.
        report = await repo.prune(repack_threshold=0.0)
        assert report.generations == len(kept)
        for g in gens:
            out = io.BytesIO()
            await repo.restore(g.id, out)
            assert out.getvalue() == kept[g.id]
        again = await repo.prune(repack_threshold=0.0)
        assert (again.packs_deleted, again.packs_repacked, again.bytes_freed) == (0, 0, 0)
        assert len(await repo._store.backend.list("index/")) <= 1
        assert await repo._store.backend.list("locks/") == []


def _trials(template: Template, tmp_path: Path, n: int) -> None:
    path, kept, locked, duration = template
    seed = int(os.environ.get("PRUNE_KILL_SEED") or time.time_ns() % 2**32)
    print(
        f"prune kill test: seed {seed}, uninterrupted prune takes {duration:.2f} s, "
        f"its lock from {locked:.2f} s"
    )
    rnd = random.Random(seed)
    before = files_of(path)
    # From a little before the lock (the repository opened, read) to the end.
    for trial, delay in enumerate(kill_times(rnd, n, locked * 0.8, duration)):
        repo = tmp_path / f"trial{trial}"
        linked_copy(path, repo)
        proc = _start_prune(repo)
        time.sleep(delay)
        proc.kill()
        rc = proc.wait()
        state = {d: len(os.listdir(repo / d)) for d in ("index", "locks") if (repo / d).exists()}
        print(f"trial {trial}: killed after {delay:.3f} s (exit {rc}), left {state}")
        try:
            asyncio.run(_check(repo, kept))
        except BaseException:
            print(
                f"FAILED: seed {seed}, trial {trial}, delay {delay:.3f} s; "
                f"repository kept at {repo}"
            )
            raise
        shutil.rmtree(repo)
    assert files_of(path) == before, "the template changed (written through a hard link?)"


def test_prune_survives_kill(template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _trials(template, tmp_path, 5)


@pytest.mark.slow
def test_prune_survives_kill_many(template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 30 kill times, one in each 30th of the run from a little before its lock (~0.15 s
    # here: a kill every ~5 ms): as dense there as 50 uniform draws over the whole run,
    # start-up included, were (~40% of those fell before the lock and tested nothing).
    _trials(template, tmp_path, 30)
