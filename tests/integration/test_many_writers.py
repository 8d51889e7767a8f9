"""Several clients at once: four `dedupe backup` processes and one `dedupe prune`, started
together, round after round, on a local directory and on an S3 API server. Every process
waits for the locks it meets (`--retry-lock`), so all of them succeed; prune, between the
backups, never removes a chunk they reference; afterwards every generation of every
round restores exactly and `verify --read-data` passes.

ROUNDS rounds in CI; DEDUPE_STRESS_ROUNDS=20 for the full acceptance run of issue 14.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PASSPHRASE, env_for, make_repo

from dedupe import Repository

ROUNDS = int(os.environ.get("DEDUPE_STRESS_ROUNDS", "2"))
WRITERS = 4
MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def where(
    request: pytest.FixtureRequest, repo_path: Path, cli_env: dict[str, str]
) -> tuple[str, dict[str, str]]:
    if request.param == "local":
        return str(repo_path), cli_env
    location = request.getfixturevalue("s3_location")
    return location, env_for(location, cli_env)


def test_four_backups_and_a_prune_at_once_round_after_round(
    where: tuple[str, dict[str, str]],
) -> None:
    location, env = where
    rng = random.Random(11)
    shared = rng.randbytes(2 * MiB)  # every writer's data starts alike: cross-writer dedupe

    async def init() -> None:
        async with await make_repo(location, pack_size=256 * 1024):  # type: ignore[arg-type]
            pass

    asyncio.run(init())
    expected: dict[str, bytes] = {}  # generation id -> bytes
    current = [bytearray(shared + rng.randbytes(MiB)) for _ in range(WRITERS)]
    for round_no in range(ROUNDS):
        procs = []
        for w, data in enumerate(current):
            for _ in range(3):  # a day of changes
                at = rng.randrange(len(data) - 8192)
                data[at : at + 8192] = rng.randbytes(8192)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dedupe", "--retry-lock", "5m", "backup", "-",
                     "--name", f"w{w}", "--json"],
                    env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )  # fmt: skip
        pruner = subprocess.Popen(
            [sys.executable, "-m", "dedupe", "prune", "--retry-lock", "5m"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for proc, data in zip(procs, current, strict=True):
            out, err = proc.communicate(bytes(data), timeout=600)
            assert proc.returncode == 0, (round_no, err.decode())
            expected[json.loads(out)["id"]] = bytes(data)
        out, err = pruner.communicate(timeout=600)
        assert pruner.returncode == 0, (round_no, err.decode())

    async def check() -> None:
        async with await Repository.open(location, PASSPHRASE) as repo:
            report = await repo.verify(read_data=True)
            assert report.ok, report.to_dict()
            gens = await repo.generations()
            assert {g.id for g in gens} == set(expected)
            for gen_id, data in expected.items():
                buf = io.BytesIO()
                await repo.restore(gen_id, buf)
                assert buf.getvalue() == data

    asyncio.run(check())
