"""The `dedupe` command with a directory: back it up, list it, restore it, as an operator
would (real child processes)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import make_repo

import dedupe

PROJECT_ROOT = Path(dedupe.__file__).resolve().parents[1]
Cli = Callable[..., subprocess.CompletedProcess[bytes]]


def _env(cli_env: dict[str, str]) -> dict[str, str]:
    env = dict(cli_env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def _ok(proc: subprocess.CompletedProcess[bytes]) -> Any:
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def _tree(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else None
            link = os.readlink(p) if p.is_symlink() else None
            out[rel] = (st.st_mode, st.st_mtime_ns, data, link)
    return out


def test_backup_list_restore_a_directory(
    tmp_path: Path, repo_path: Path, cli_env: dict[str, str], cli: Cli
) -> None:
    async def init() -> None:
        repo = await make_repo(repo_path)
        await repo.close()

    asyncio.run(init())
    env = _env(cli_env)
    src = tmp_path / "src"
    (src / "sub/empty").mkdir(parents=True)
    (src / "sub/file").write_bytes(b"content" * 1000)
    (src / "top").write_bytes(b"")
    os.symlink("sub/file", src / "link")
    os.chmod(src / "top", 0o640)

    full = _ok(cli("backup", str(src), "--name", "n", "--type", "full", "--json", env=env))
    assert full["kind"] == "full" and full["bytes_read"] == 7000
    (src / "sub/new").write_bytes(b"more")
    inc = _ok(cli("backup", str(src), "--name", "n", "--json", env=env))
    assert inc["kind"] == "incremental" and inc["bytes_read"] <= 7004

    gens = _ok(cli("generations", "--json", env=env))
    assert [g["source"]["type"] for g in gens] == ["tree", "tree"]
    assert gens[0]["source"]["label"] == str(src)

    out = tmp_path / "out"
    r = _ok(cli("restore", "n@latest", str(out), "--json", env=env))
    assert r["id"] == inc["id"] and r["bytes_written"] == 7004
    assert _tree(out) == _tree(src)

    # A non-empty target is refused with the TargetError exit code, and left alone.
    again = cli("restore", "n@latest", str(out), env=env)
    assert again.returncode == 51, again.stderr.decode()
    assert b"not empty" in again.stderr
    assert _tree(out) == _tree(src)
    # Restoring a tree to standard output makes no sense.
    to_stdout = cli("restore", "n@latest", "-", env=env)
    assert to_stdout.returncode == 51 and to_stdout.stdout == b""
