"""Two machines on one repository (issue 14, point 4): `dedupe` processes whose host name
differs (each started in a UTS namespace of its own with `unshare --uts`, as root; the
network is shared, so both reach the same directory or S3 API server). Their backups
dedupe against each other and carry their host, a prune from either keeps everything
restorable, and a lock left by a killed process is judged by the host that holds it:
stale at once on its own host (no such process), held on the other, which cannot look.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PASSPHRASE, changing_versions, env_for

from dedupe import Repository
from dedupe.backends import open_backend

REPOSITORY_LOCKED = 13  # exit code of RepositoryLocked (docs/API.md)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a second host name (CI runs as root)",
)


def on_host(host: str, *args: str) -> list[str]:
    """argv of a `dedupe` command run under the host name `host`."""
    return [
        "unshare",
        "--uts",
        "sh",
        "-c",
        'hostname "$0" && exec "$@"',
        host,
        sys.executable,
        "-m",
        "dedupe",
        *args,
    ]


def run(host: str, env: dict[str, str], *args: str, data: bytes | None = None) -> dict:
    done = subprocess.run(on_host(host, *args), env=env, input=data, capture_output=True)
    assert done.returncode == 0, (host, args, done.stderr.decode())
    return json.loads(done.stdout) if "--json" in args else {}


def locks(location: str) -> list[str]:
    async def names() -> list[str]:
        backend = open_backend(location)
        try:
            return await backend.list("locks/")
        finally:
            await backend.close()

    return asyncio.run(names())


def test_backups_from_two_hosts_dedupe_and_prune_keeps_both(
    location: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = env_for(location, cli_env)
    assert subprocess.run(on_host("host-a", "init"), env=env).returncode == 0
    shared = os.urandom(2_000_000)
    a, b = shared + os.urandom(200_000), shared + os.urandom(200_000)
    first = run("host-a", env, "backup", "-", "--name", "a", "--json", data=a)
    second = run("host-b", env, "backup", "-", "--name", "b", "--json", data=b)
    assert first["bytes_new"] > 2_000_000
    assert second["bytes_new"] < 500_000  # host b reused what host a stored
    # Both at once, each on its own host, then a prune from the other side.
    days = changing_versions(2, 1_500_000, 200_000)
    procs = [
        subprocess.Popen(
            on_host(host, "backup", "-", "--name", name, "--json"),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for host, name in (("host-a", "a"), ("host-b", "b"))
    ]
    for proc, data in zip(procs, days, strict=True):
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    run("host-b", env, "prune")
    listed = run("host-a", env, "generations", "--json")
    assert {(g["name"], g["host"]) for g in listed} == {("a", "host-a"), ("b", "host-b")}
    expected = {"a": [a, days[0]], "b": [b, days[1]]}

    async def check() -> None:
        async with await Repository.open(location, PASSPHRASE) as repo:
            for name, datas in expected.items():
                gens = await repo.generations(name)
                assert len(gens) == 2
                for gen, data in zip(gens, datas, strict=True):
                    out = tmp_path / gen.id
                    await repo.restore(gen.id, out)
                    assert out.read_bytes() == data
            assert (await repo.verify(read_data=True)).ok

    asyncio.run(check())


def test_a_killed_processs_lock_is_stale_on_its_host_only(
    location: str, cli_env: dict[str, str]
) -> None:
    env = env_for(location, cli_env)
    assert subprocess.run(on_host("host-a", "init"), env=env).returncode == 0
    backup = subprocess.Popen(
        on_host("host-a", "backup", "-", "--name", "db"),
        env=env,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert backup.stdin is not None
    backup.stdin.write(os.urandom(1_000_000))
    backup.stdin.flush()
    deadline = time.monotonic() + 60
    while not locks(location):
        assert backup.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    backup.send_signal(signal.SIGKILL)
    backup.wait()
    held = locks(location)
    assert len(held) == 1
    # Host b cannot tell whether the process lives: the lock holds until the stale time.
    refused = subprocess.run(on_host("host-b", "prune"), env=env, capture_output=True)
    assert refused.returncode == REPOSITORY_LOCKED, refused.stderr
    assert b"host-a" in refused.stderr
    assert locks(location) == held
    # Host a can: no such process, so the lock is stale and prune takes its place.
    run("host-a", env, "prune")
    assert locks(location) == []
