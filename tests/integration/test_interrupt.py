"""Ctrl-C and SIGTERM in the middle of a backup (issue 13, point 2): the real command in a
child process, stopped by a real signal once it has written packs and before it commits.

What must hold after each stop: the exit code says which signal (130, 143), stderr says
how much was kept, no lock is left, `verify --read-data` passes, and the same backup run
again stores only what the stopped one had not (the two together store at most 5% more
than one uninterrupted backup)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import default_sigint, make_repo

from dedupe.errors import Interrupted, Terminated

MiB = 1024 * 1024
SIZE = 160 * MiB
PACK_SIZE = 2 * MiB  # many packs, so that a stop lands between them


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "dedupe", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,  # even if pytest was started in the background
    )


def _stored(proc: subprocess.CompletedProcess[bytes]) -> int:
    assert proc.returncode == 0, proc.stderr.decode()
    return int(json.loads(proc.stdout)["bytes_stored"])


def _backup(env: dict[str, str], source: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dedupe", "backup", str(source), "--name", "db", "--json"],
        env=env,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("src") / "snapshot.bin"
    rng = random.Random(13)
    with path.open("wb") as f:
        for _ in range(SIZE // MiB):
            f.write(rng.randbytes(MiB))
    return path


@pytest.mark.parametrize(
    ("sig", "error", "seed"),
    [
        (signal.SIGINT, Interrupted, 1),
        (signal.SIGINT, Interrupted, 2),
        (signal.SIGTERM, Terminated, 3),
        (signal.SIGTERM, Terminated, 4),
    ],
    ids=["SIGINT-1", "SIGINT-2", "SIGTERM-1", "SIGTERM-2"],
)
def test_a_stopped_backup_keeps_what_it_stored(
    run_asyncio,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    cli_env: dict[str, str],
    source: Path,
    sig: signal.Signals,
    error: type[Interrupted],
    seed: int,
) -> None:
    fresh_repo, repo = tmp_path / "fresh", tmp_path / "repo"

    async def make() -> None:
        for path in (fresh_repo, repo):
            async with await make_repo(path, pack_size=PACK_SIZE):
                pass

    run_asyncio(make())
    fresh = _stored(_backup(dict(cli_env, DEDUPE_REPO=str(fresh_repo)), source))
    env = dict(cli_env, DEDUPE_REPO=str(repo))

    # Stop it at a random point after its first pack is on disk (so that the stop lands
    # mid-backup, never before anything was written), as long as it is still running.
    proc = _start(env, "backup", str(source), "--name", "db")
    packs = repo / "packs"
    deadline = time.monotonic() + 120
    while not any(packs.rglob("*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    proc.send_signal(sig)
    _, err_bytes = proc.communicate(timeout=120)
    err = err_bytes.decode()
    assert proc.returncode == error.exit_code, err  # not 0: the signal came before the commit
    assert "Traceback" not in err
    assert "no generation was committed" in err and "next backup of the source reuses them" in err
    assert list((repo / "locks").iterdir()) == []
    assert not (repo / "generations").exists() or not any((repo / "generations").rglob("*"))
    first = sum(p.stat().st_size for p in packs.rglob("*") if p.is_file())
    assert first > 0

    second = _stored(_backup(env, source))
    assert first + second <= 1.05 * fresh, (first, second, fresh)
    assert second < fresh  # what the stopped backup stored was reused
    verify = subprocess.run(
        [sys.executable, "-m", "dedupe", "verify", "--read-data"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
    restored = tmp_path / "restored"
    subprocess.run(
        [sys.executable, "-m", "dedupe", "restore", "db@latest", str(restored)],
        env=env,
        check=True,
        capture_output=True,
    )
    assert os.path.getsize(restored) == SIZE
    assert restored.read_bytes() == source.read_bytes()
