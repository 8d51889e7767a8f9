"""Backup killed with SIGKILL at random moments: the repository stays valid (verify with
--read-data passes), every generation listed before restores byte for byte, the killed
backup added no generation, and the next backup and prune work.

The kill times are spread over the run: one drawn in each of n equal slices of the time
from a little before the command takes its lock to its end (an uninterrupted run, timed
first), so that no stretch of it goes untried. They are seeded; the seed is printed
(shown on failure). Re-run one with BACKUP_KILL_SEED=<seed>. Each trial runs on a
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

# The new data: SIZE // 2 shared with the first generation, SIZE new (about 90 packs of
# 64 KiB): a few tenths of a second of pack writes between taking the lock and the commit.
SIZE = 6_000_000


Template = tuple[Path, dict[str, bytes], Path, float, float]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A repository with two generations, the new data a killed backup will write (half of
    it shared with them), and when an uninterrupted backup command takes its lock and
    when it ends."""
    base = tmp_path_factory.mktemp("backup-kill")
    path = base / "template"
    rnd = random.Random(5)
    old = [rnd.randbytes(SIZE // 2) for _ in range(2)]
    new_data = base / "new.bin"
    new_data.write_bytes(old[0] + rnd.randbytes(SIZE))

    async def build() -> dict[str, bytes]:
        async with await make_repo(path) as repo:
            kept = {}
            for i, data in enumerate(old):
                s = await repo.backup(io.BytesIO(data), name=f"db{i}", kind="full")
                kept[s.id] = data
            return kept

    kept = asyncio.run(build())
    locked, duration = lock_and_end(path, lambda probe: _start_backup(probe, new_data))
    return path, kept, new_data, locked, duration


def _start_backup(path: Path, source: Path) -> subprocess.Popen[bytes]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DEDUPE_") or k == "DEDUPE_STATE_DIR"
    }
    env.update(DEDUPE_REPO=str(path), DEDUPE_PASSWORD=PASSPHRASE)
    return subprocess.Popen(
        [sys.executable, "-m", "dedupe", "backup", str(source), "--name", "new"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def _check(path: Path, kept: dict[str, bytes], new_data: bytes) -> str:
    async with await Repository.open(path, PASSPHRASE) as repo:
        gens = await repo.generations()
        ids = {g.id for g in gens}
        # The killed backup either committed (its manifest is complete) or added nothing.
        extra = ids - set(kept)
        assert set(kept) <= ids and len(extra) <= 1
        report = await repo.verify(read_data=True)
        assert report.ok, report.to_dict()
        for g in gens:
            out = io.BytesIO()
            await repo.restore(g.id, out)
            assert out.getvalue() == kept.get(g.id, new_data), f"{g.id} restored wrong bytes"
        # The next backup and a prune work; the lock of the killed process is stale.
        again = await repo.backup(io.BytesIO(new_data), name="new", kind="full")
        await repo.prune()
        out = io.BytesIO()
        await repo.restore(again.id, out)
        assert out.getvalue() == new_data
        return "committed" if extra else "nothing"


def _trials(template: Template, tmp_path: Path, n: int) -> None:
    path, kept, source, locked, duration = template
    new_data = source.read_bytes()
    seed = int(os.environ.get("BACKUP_KILL_SEED") or time.time_ns() % 2**32)
    print(
        f"backup kill test: seed {seed}, uninterrupted backup takes {duration:.2f} s, "
        f"its lock from {locked:.2f} s"
    )
    rnd = random.Random(seed)
    before = files_of(path)
    # From a little before the lock (the repository opened, read) to the end.
    for trial, delay in enumerate(kill_times(rnd, n, locked * 0.8, duration)):
        repo = tmp_path / f"trial{trial}"
        linked_copy(path, repo)
        proc = _start_backup(repo, source)
        time.sleep(delay)
        proc.kill()
        rc = proc.wait()
        try:
            outcome = asyncio.run(_check(repo, kept, new_data))
        except BaseException:
            print(f"FAILED: seed {seed}, trial {trial}, delay {delay:.3f} s; repo kept at {repo}")
            raise
        print(f"trial {trial}: killed after {delay:.3f} s (exit {rc}): {outcome}")
        shutil.rmtree(repo)
    assert files_of(path) == before, "the template changed (written through a hard link?)"


def test_backup_survives_kill(template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _trials(template, tmp_path, 4)


@pytest.mark.slow
def test_backup_survives_kill_many(template, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 22 kill times, one in each 22nd of the run from a little before its lock (~0.3 s
    # here: a kill every ~14 ms): as dense there as 35 uniform draws over the whole run
    # of twice the data, start-up included, were (a third of those tested nothing).
    _trials(template, tmp_path, 22)
