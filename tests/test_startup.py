"""Start-up (issue 17, item 4): a command imports the code of its own operation only.

Interpreter start, imports and the repository open are a large share of a small backup, so
--help, --version and the parsing of a command load no engine at all, and a backup loads
none of the restore, verify, prune or key code, no replication, no S3 client, no database
driver. Each case runs the real command in a child process and reads the modules it had
loaded when it exited. No timings are asserted: the imports themselves are.

Also here: a command runs the passphrase KDF (Argon2id) once per key file it opens or
writes, never a second time for the same key file.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PASSPHRASE, make_repo

import dedupe
from dedupe.crypto import KdfParams, keyfile

PROJECT_ROOT = Path(dedupe.__file__).resolve().parents[1]
WEAK = KdfParams.weakest()

# Run `python -m dedupe ARGS` as the command is run, and write the names of the modules
# loaded by the time the process exits (after main's sys.exit) to the file named first.
LOADED_AT_EXIT = """
import atexit, json, runpy, sys

report, *args = sys.argv[1:]

def write_loaded():
    with open(report, "w") as f:
        json.dump(sorted(sys.modules), f)

atexit.register(write_loaded)
sys.argv = ["dedupe", *args]
runpy.run_module("dedupe", run_name="__main__", alter_sys=True)
"""

# What no command that only parses its arguments loads: the API and everything below it.
ENGINE = [
    "dedupe.api",
    "dedupe.engine",
    "dedupe.store",
    "dedupe.crypto",
    "dedupe.chunking",
    "dedupe.backends",
    "dedupe.replication",
    "dedupe.objectives",
    "dedupe.logjson",
    "dedupe.metrics",
    "dedupe.bench",
    "asyncio",
    "nacl",
]

# What a backup of a file does not run.
NOT_FOR_A_BACKUP = [
    "dedupe.engine.restore",
    "dedupe.engine.outfile",
    "dedupe.engine.verify",
    "dedupe.engine.prune",
    "dedupe.engine.forget",
    "dedupe.engine.repair",
    "dedupe.engine.keys",
    "dedupe.engine.listing",
    "dedupe.engine.tree",
    "dedupe.engine.databases",
    "dedupe.replication",
    "dedupe.objectives",
    "dedupe.backends.s3",
    "dedupe.bench",
    "dedupe.metrics",
    "dedupe.logjson",
    "aiobotocore",
    "botocore",
    "sqlite3",
    "prometheus_client",
    "rich",
]

# What a restore to a file does not run. (The API imports the backup of a stream with
# itself: the main path, and a few milliseconds.)
NOT_FOR_A_RESTORE = [
    "dedupe.engine.verify",
    "dedupe.engine.prune",
    "dedupe.engine.keys",
    "dedupe.engine.databases",
    "dedupe.replication",
    "dedupe.objectives",
    "dedupe.backends.s3",
    "aiobotocore",
    "botocore",
    "sqlite3",
]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for a child that imports the dedupe under test and
    nothing from its working directory."""
    env = {**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def loaded_by(*args: str, cwd: Path, env: dict[str, str] | None = None) -> set[str]:
    """The modules `python -m dedupe ARGS` had loaded when it exited; it must succeed."""
    report = cwd / "loaded.json"
    proc = subprocess.run(
        [sys.executable, "-c", LOADED_AT_EXIT, str(report), *args],
        env=child_env(env),
        cwd=cwd,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return set(json.loads(report.read_text()))


def among(modules: set[str], packages: list[str]) -> list[str]:
    """The loaded modules that are, or are inside, one of `packages`."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["backup", "--help"], ["restore", "--help"], ["init", "--help"]],
    ids=" ".join,
)
def test_help_and_version_load_no_engine(tmp_path: Path, args: list[str]) -> None:
    """Help (the init command's shows the chunker's and the KDF's defaults, looked up in
    the library only then) and the version come from the command's definitions alone."""
    loaded = loaded_by(*args, cwd=tmp_path)
    assert "dedupe.cli" in loaded
    allowed = {"init": ["dedupe.chunking", "dedupe.crypto", "nacl"]}.get(args[0], [])
    assert among(loaded, [p for p in ENGINE if p not in allowed]) == []


def test_importing_the_package_or_the_command_loads_no_engine(tmp_path: Path) -> None:
    code = "import sys, dedupe, dedupe.cli; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), cwd=tmp_path, capture_output=True, check=True
    )
    assert among(set(proc.stdout.decode().split()), ENGINE) == []


@pytest.fixture
def repository(tmp_path: Path) -> dict[str, str]:
    """A repository with one generation of data.bin, and the environment to reach it."""
    repo = tmp_path / "repo"
    (tmp_path / "data.bin").write_bytes(os.urandom(300_000))

    async def make() -> None:
        async with await make_repo(repo) as r:
            await r.backup(str(tmp_path / "data.bin"), name="data")

    asyncio.run(make())
    return {**os.environ, "DEDUPE_REPO": str(repo), "DEDUPE_PASSWORD": PASSPHRASE}


def test_a_backup_loads_no_restore_verify_prune_key_replica_or_s3_code(
    tmp_path: Path, repository: dict[str, str]
) -> None:
    loaded = loaded_by("-q", "backup", "data.bin", "--name", "data", cwd=tmp_path, env=repository)
    assert "dedupe.engine.backup" in loaded  # it did back up
    assert among(loaded, NOT_FOR_A_BACKUP) == []


def test_a_restore_loads_no_verify_prune_key_replica_or_s3_code(
    tmp_path: Path, repository: dict[str, str]
) -> None:
    loaded = loaded_by("-q", "restore", "data@latest", "out.bin", cwd=tmp_path, env=repository)
    assert "dedupe.engine.restore" in loaded
    assert (tmp_path / "out.bin").read_bytes() == (tmp_path / "data.bin").read_bytes()
    assert among(loaded, NOT_FOR_A_RESTORE) == []


def test_every_exported_name_is_still_importable() -> None:
    """The package and the API load their names on first use; each one resolves."""
    import dedupe.api
    import dedupe.engine

    for module in (dedupe, dedupe.api, dedupe.engine):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
    with pytest.raises(AttributeError):
        dedupe.NoSuchName  # noqa: B018


def test_submodules_are_reached_through_the_package_as_before(tmp_path: Path) -> None:
    """Embedding code written when `import dedupe` loaded everything: `dedupe.errors.X`,
    `dedupe.api.Repository`, `dedupe.engine.verify` at module level, in a fresh
    interpreter (here, earlier tests have imported them already)."""
    code = (
        "import dedupe\n"
        "RETRY = (dedupe.errors.BackendError, dedupe.errors.WrongPassphrase)\n"
        "assert dedupe.api.Repository is dedupe.Repository\n"
        "assert dedupe.engine.verify.VerifyReport is dedupe.VerifyReport\n"
        "assert dedupe.crypto.KdfParams\n"
        "for name in ('nosuchmodule', '__wrapped__'):\n"
        "    assert not hasattr(dedupe, name), name\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=child_env(), cwd=tmp_path, check=True, timeout=120
    )


# --- the passphrase KDF runs once per key file -----------------------------------------------


@pytest.fixture
def kdf_runs(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The salts of the key files the KDF runs for, in order, from now on."""
    salts: list[bytes] = []
    derive = keyfile._kek

    def counted(passphrase: bytes, salt: bytes, kdf: KdfParams) -> bytes:
        salts.append(salt)
        return derive(passphrase, salt, kdf)

    monkeypatch.setattr(keyfile, "_kek", counted)
    return salts


def test_open_add_and_passwd_derive_each_key_once(tmp_path: Path, kdf_runs: list[bytes]) -> None:
    """Opening runs the KDF once. `key add` and `key passwd` run it once more, for the
    new key file, which is read back and opened with the key it was sealed under; they
    used to derive that key a second time to open it."""
    repo_path = tmp_path / "repo"

    async def go() -> None:
        async with await make_repo(repo_path):
            pass
        assert len(kdf_runs) == 1  # the first key file, made by init
        kdf_runs.clear()
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert len(kdf_runs) == 1
            await repo.keys.add("another passphrase", role="reader", name="r", kdf=WEAK)
            assert len(kdf_runs) == 2
            await repo.keys.passwd("a new passphrase", kdf=WEAK)
            assert len(kdf_runs) == 3
        assert len(set(kdf_runs)) == 3  # three key files, each derived once
        async with await dedupe.Repository.open(repo_path, "a new passphrase") as repo:
            assert repo.role == "admin"

    asyncio.run(go())
