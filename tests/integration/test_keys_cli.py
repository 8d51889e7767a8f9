"""The `dedupe key` commands end to end, and what the role of a key lets the command do:
real repositories in tmp dirs, the real command in child processes (`python -m dedupe`).

Each command costs an interpreter start-up (~0.4 s): one scenario runs them in order.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from conftest import make_repo

import dedupe

PROJECT_ROOT = Path(dedupe.__file__).resolve().parents[1]
USAGE_EXIT = 2  # click's exit code for usage errors
ROLE_NOT_PERMITTED = 23
WRONG_PASSPHRASE = 20
WRITER_PW = "writer passphrase"
NEW_PW = "the admin's new passphrase"
WEAK_KDF = ("--kdf-memlimit", "1", "--kdf-opslimit", "1")

Run = Callable[[Coroutine[Any, Any, str]], str]
Cli = Callable[..., subprocess.CompletedProcess[bytes]]


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def refused(proc: subprocess.CompletedProcess[bytes], code: int) -> list[str]:
    """The lines on stderr of a command that failed with `code`, as an operator sees them:
    an error line (and its hint), no traceback."""
    err = proc.stderr.decode()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    return err.splitlines()


def test_key_commands_and_roles(
    run_asyncio: Run, cli: Cli, cli_env: dict[str, str], repo_path: Path, tmp_path: Path
) -> None:
    data = random.Random(7).randbytes(200_000)
    source = tmp_path / "data.bin"
    source.write_bytes(data)

    async def setup() -> str:
        async with await make_repo(repo_path) as repo:
            return (await repo.backup(io.BytesIO(data), name="db", kind="full")).id

    gen_id = run_asyncio(setup())
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), cli_env.get("PYTHONPATH", "")) if p)
    admin = {**cli_env, "PYTHONPATH": path}
    writer = {**admin, "DEDUPE_PASSWORD": WRITER_PW}

    keys = json.loads(ok(cli("key", "list", "--json", env=admin)).stdout)
    assert [(k["role"], k["name"], k["current"], k["key_files"]) for k in keys] == [
        ("admin", "default", True, 1)
    ]

    added = json.loads(
        ok(
            cli(
                "key", "add", "--role", "writer", "--name", "w", *WEAK_KDF, "--json",
                env={**admin, "DEDUPE_NEW_PASSWORD": WRITER_PW},
            )
        ).stdout
    )  # fmt: skip
    assert (added["role"], added["name"], added["current"]) == ("writer", "w", False)
    # A name that exists: a usage error, and nothing is added.
    dup = cli(
        "key", "add", "--role", "reader", "--name", "w", *WEAK_KDF,
        env={**admin, "DEDUPE_NEW_PASSWORD": "another"},
    )  # fmt: skip
    assert "exists already" in refused(dup, USAGE_EXIT)[-1]
    assert len(list((repo_path / "keys").iterdir())) == 2

    # The writer backs up (deduplicating against what the admin stored) ...
    backup = json.loads(ok(cli("backup", str(source), "--name", "w", "--json", env=writer)).stdout)
    assert (backup["kind"], backup["chunks_new"]) == ("full", 0)
    # ... and may do nothing else: exit 23, one error line naming the role, its hint.
    out = tmp_path / "out.bin"
    for args, what in (
        (("restore", gen_id, str(out)), "restore"),
        (("verify",), "verify"),
        (("forget", "--keep-last", "1"), "forget"),
        (("prune",), "prune"),
        (("key", "add", "--role", "writer", "--name", "x", *WEAK_KDF), "add keys"),
        (("key", "rotate"), "rotate keys"),
    ):
        lines = refused(cli(*args, env=writer), ROLE_NOT_PERMITTED)
        assert lines[0] == f"dedupe: error: a writer key may not {what}", args
        assert len(lines) == 2 and lines[1].startswith("  hint: "), lines
    assert not out.exists()
    assert len(list((repo_path / "generations").iterdir())) == 2

    status = json.loads(ok(cli("key", "status", "--json", env=admin)).stdout)
    assert (status["current_epoch"], status["rotation_unfinished"]) == (1, False)
    assert [(e["number"], e["state"], e["generations"]) for e in status["epochs"]] == [
        (1, "active", 2)
    ]
    assert sorted((k["role"], k["name"]) for k in status["keys"]) == [
        ("admin", "default"),
        ("writer", "w"),
    ]

    rotated = json.loads(ok(cli("key", "rotate", "--json", env=admin)).stdout)
    assert (rotated["epoch"], rotated["retired"], rotated["resumed"]) == (2, [1], False)
    assert rotated["entries_dropped"] == 0

    removed = ok(cli("key", "remove", "w", env=admin)).stdout.decode()
    assert f"removed writer key {added['id']} (w)" in removed
    assert "key rotate" in removed  # it tells the operator what to do next
    # Its key file went with it: its passphrase opens no key file of the repository.
    lines = refused(cli("key", "list", env=writer), WRONG_PASSPHRASE)
    assert lines[0].startswith("dedupe: error: wrong passphrase")

    ok(cli("key", "passwd", env={**admin, "DEDUPE_NEW_PASSWORD": NEW_PW}))
    refused(cli("key", "list", env=admin), WRONG_PASSPHRASE)
    keys = json.loads(
        ok(cli("key", "list", "--json", env={**admin, "DEDUPE_PASSWORD": NEW_PW})).stdout
    )
    assert [(k["role"], k["name"], k["key_files"]) for k in keys] == [("admin", "default", 1)]
