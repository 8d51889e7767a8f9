"""The programs the end-to-end benchmark runs: dedupe, restic and BorgBackup.

A *variant* is one way of backing up a file with one program: from its path, or piped on
standard input. Each runs in one fresh repository per run, with private caches under the
run's directory (nothing touches $HOME), and the file to back up staged as
``src/snapshot.db`` (every day under one name, as a database file keeps its path).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dedupe
from dedupe.backends.s3 import S3Backend, parse_s3_location
from dedupe.bench.measure import Measured, last_json, measure_command, tree_bytes
from dedupe.bench.report import StepFailed
from dedupe.chunking import DEFAULT_PARAMS
from dedupe.errors import IntegrityError
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL

__all__ = ["FAMILIES", "VARIANTS", "ToolFailed", "Tool", "expand_tools"]

PASSPHRASE = "dedupe-bench-throwaway"  # repositories made and deleted by the benchmark
S3_VARIABLE = "DEDUPE_BENCH_S3"  # s3://bucket/prefix for the dedupe-s3 variant
STAGE_NAME = "snapshot.db"


class ToolFailed(Exception):
    """A compared tool failed (reported in its row; it does not stop the benchmark)."""


@dataclass(frozen=True)
class BackupDone:
    snapshot: str  # what to restore it by
    tool_s: float | None  # the tool's own timing of the backup, when it reports one
    metadata_skip: bool = False  # it did not read the file (metadata said unchanged)


class Tool:
    """One variant, in one run directory."""

    name = ""
    compression = ""
    chunking = ""
    stdin_mode = False

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        self.rundir = rundir
        self.repo = rundir / "repo"
        self.src = rundir / "src"  # holds the staged file
        self.scratch = rundir / "scratch"  # the measured commands' stdout and stderr
        self.env = dict(env)

    @property
    def staged(self) -> Path:
        return self.src / STAGE_NAME

    @staticmethod
    def missing(env: Mapping[str, str]) -> str | None:
        """None when the program can run with the environment `env`, else why not."""
        return None

    def prepare(self) -> None:
        for d in (self.src, self.scratch):
            d.mkdir(parents=True, exist_ok=True)

    async def version(self) -> str:
        return ""

    async def repo_bytes(self) -> int:
        """What the repository holds now (apparent bytes of its objects)."""
        return tree_bytes(self.repo)

    async def remove_repository(self) -> None:
        """Delete what the repository holds outside the run directory (nothing, here)."""

    async def init(self) -> None:
        raise NotImplementedError

    def backup_argv(self, label: str, again: bool) -> list[str]:
        """Back up the staged file as `label`; `again`: the same bytes a second time (the
        tool must read them, not trust its metadata cache)."""
        raise NotImplementedError

    async def backup(self, label: str, again: bool) -> tuple[Measured, BackupDone]:
        stdin = self.staged if self.stdin_mode else None
        m = await self.run(self.backup_argv(label, again), stdin=stdin)
        return m, self.parse_backup(m, label)

    def parse_backup(self, m: Measured, label: str) -> BackupDone:
        raise NotImplementedError

    def check_argv(self) -> list[str]:
        """Read and check every stored byte."""
        raise NotImplementedError

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        """(argv, cwd) to restore `snapshot` somewhere under the empty `target`."""
        raise NotImplementedError

    def own_seconds(self, m: Measured) -> float | None:
        """The time a check or restore reports itself, when it does."""
        return None

    async def probe(self, argv: Sequence[str]) -> Measured:
        self.prepare()
        return await measure_command(argv, env=self.env, cwd=self.src, scratch=self.scratch)

    async def run(
        self, argv: Sequence[str], cwd: Path | None = None, stdin: Path | None = None
    ) -> Measured:
        m = await measure_command(
            argv, env=self.env, cwd=cwd or self.src, scratch=self.scratch, stdin=stdin
        )
        if m.rc != 0:
            raise self.error(m.failure())
        return m

    def error(self, message: str) -> Exception:
        return ToolFailed(message)

    def wrong_restore(self, message: str) -> Exception:
        return ToolFailed(message)


class Dedupe(Tool):
    name = "dedupe"
    compression = f"zstd-{DEFAULT_COMPRESSION_LEVEL}"
    # The default, `auto`: a SQLite file (what bench_e2e generates) is cut in its pages.
    chunking = (
        "auto: a SQLite or tar file's pages, else FastCDC "
        f"{DEFAULT_PARAMS.min_size // 1024} / ~{DEFAULT_PARAMS.avg_size // 1024} / "
        f"{DEFAULT_PARAMS.max_size // 1024} KiB"
    )

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        super().__init__(rundir, env)
        for other in ("DEDUPE_PASSWORD_FILE", "DEDUPE_PASSWORD_COMMAND"):
            self.env.pop(other, None)  # one passphrase source, or dedupe refuses to guess
        self.env.update(DEDUPE_REPO=str(self.repo), DEDUPE_PASSWORD=PASSPHRASE)

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dedupe", *args]

    async def version(self) -> str:
        root = Path(dedupe.__file__).parent
        # Native modules built with sanitizers run several times slower: say so.
        flagged = [
            so.name
            for so in root.rglob("*.so")
            if any(m in so.read_bytes() for m in (b"__asan_init", b"__ubsan_handle"))
        ]
        warning = f" (WARNING: sanitizer build: {', '.join(flagged)})" if flagged else ""
        return f"dedupe {dedupe.__version__} from {root}{warning}"

    async def init(self) -> None:
        await self.run(self.cmd("init", "--json"))

    def backup_argv(self, label: str, again: bool) -> list[str]:
        # dedupe reads a file whole every time: nothing to force.
        what = "-" if self.stdin_mode else STAGE_NAME
        return self.cmd("backup", what, "--name", "bench", "--json")

    def parse_backup(self, m: Measured, label: str) -> BackupDone:
        info = last_json(m.stdout)
        return BackupDone(str(info["id"]), float(info["seconds"]))

    def check_argv(self) -> list[str]:
        return self.cmd("verify", "--read-data", "--json")

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return self.cmd("restore", snapshot, str(target / STAGE_NAME), "--json"), target

    def own_seconds(self, m: Measured) -> float | None:
        return float(last_json(m.stdout)["seconds"])

    def error(self, message: str) -> Exception:
        return StepFailed(message, hint="run the same command by hand to see the whole error")

    def wrong_restore(self, message: str) -> Exception:
        return IntegrityError(f"benchmark restore: {message}")


class DedupeStdin(Dedupe):
    name = "dedupe-stdin"
    stdin_mode = True


class DedupeS3(Dedupe):
    """dedupe with its repository in an S3-compatible object store: a fresh prefix per
    run under the location in DEDUPE_BENCH_S3 (`s3://bucket/prefix`; the bucket must
    exist), with the endpoint and credentials of the AWS environment."""

    name = "dedupe-s3"

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        super().__init__(rundir, env)
        base = env.get(S3_VARIABLE, "").rstrip("/")
        self.location = f"{base}/bench-{secrets.token_hex(6)}"  # a fresh prefix per run
        self.env["DEDUPE_REPO"] = self.location

    @staticmethod
    def missing(env: Mapping[str, str]) -> str | None:
        if not env.get(S3_VARIABLE):
            return f"no object store given ({S3_VARIABLE}, or bench_e2e.py --s3)"
        try:
            import aiobotocore  # noqa: F401
        except ImportError:
            return "S3 support not installed (pip install 'dedupe[s3]')"
        return None

    async def _objects(self) -> list[tuple[str, int]]:
        from aiobotocore.session import get_session

        bucket, prefix = parse_s3_location(self.location)
        found: list[tuple[str, int]] = []
        async with get_session().create_client("s3") as s3:
            async for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix
            ):
                found += [(o["Key"], int(o["Size"])) for o in page.get("Contents", ())]
        return found

    async def repo_bytes(self) -> int:
        return sum(size for _key, size in await self._objects())

    async def remove_repository(self) -> None:
        backend = S3Backend(self.location)
        try:
            for name in await backend.list(""):
                await backend.delete(name)
        finally:
            await backend.close()


class Restic(Tool):
    compression = "auto (zstd, repo v2)"
    chunking = "Rabin CDC 512 KiB / ~1 MiB / 8 MiB"

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        super().__init__(rundir, env)
        self.exe = _program_path(self.program, env)
        self.env.update(
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSPHRASE,
            RESTIC_CACHE_DIR=str(rundir / "cache"),
        )

    program = "restic"

    @classmethod
    def missing(cls, env: Mapping[str, str]) -> str | None:
        return _missing_program(cls.program, env)

    async def version(self) -> str:
        m = await self.probe([self.exe, "version"])
        text = m.stdout.decode(errors="replace").strip()
        return text.splitlines()[0] if m.rc == 0 and text else "restic (version unknown)"

    async def init(self) -> None:
        argv = [self.exe, "init"]
        # Repository format v2 is the one with compression: ask for it where the flag
        # exists (restic >= 0.14), so that "stable" never means v1.
        if b"--repository-version" in (await self.probe([self.exe, "init", "--help"])).stdout:
            argv += ["--repository-version", "2"]
        await self.run(argv)

    def backup_argv(self, label: str, again: bool) -> list[str]:
        if self.stdin_mode:
            return [self.exe, "backup", "--json", "--stdin", "--stdin-filename", STAGE_NAME,
                    "--tag", label]  # fmt: skip
        # --force: read the file even though the parent snapshot says it is unchanged.
        force = ["--force"] if again else []
        return [self.exe, "backup", "--json", "--tag", label, *force, STAGE_NAME]

    def parse_backup(self, m: Measured, label: str) -> BackupDone:
        summary: dict[str, Any] = {}
        for line in m.stdout.decode("utf-8", "replace").splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        if "snapshot_id" not in summary:
            raise ToolFailed("restic printed no summary")
        own = summary.get("total_duration")
        skip = not self.stdin_mode and summary.get("files_unmodified", 0) > 0
        return BackupDone(str(summary["snapshot_id"]), float(own) if own else None, skip)

    def check_argv(self) -> list[str]:
        return [self.exe, "check", "--read-data"]

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return [self.exe, "restore", snapshot, "--target", str(target)], target


class ResticStdin(Restic):
    name = "restic-stdin"
    stdin_mode = True


class ResticFile(Restic):
    name = "restic-file"


class ResticStdinNew(ResticStdin):
    """restic-stdin with the binary $RESTIC_NEW names (a newer release beside the one on
    PATH, e.g. trixie's restic 0.18 unpacked with dpkg-deb -x): both in one run."""

    name = "restic-stdin-new"
    program = "$RESTIC_NEW"


class Borg(Tool):
    name = "borg"
    compression = "lz4"
    chunking = "buzhash CDC 512 KiB / ~2 MiB / 8 MiB"

    def __init__(self, rundir: Path, env: dict[str, str]) -> None:
        super().__init__(rundir, env)
        self.exe = _program_path(self.program, env)
        self.env.update(
            BORG_PASSPHRASE=PASSPHRASE,
            BORG_BASE_DIR=str(rundir / "borgbase"),  # config, keys, security dir, cache
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
        )

    program = "borg"

    @classmethod
    def missing(cls, env: Mapping[str, str]) -> str | None:
        return _missing_program(cls.program, env)

    async def version(self) -> str:
        m = await self.probe([self.exe, "--version"])
        text = m.stdout.decode(errors="replace").strip()
        # Run as `python -m borg`, borg names itself "__main__.py".
        text = re.sub(r"^__main__\.py ", "borg ", text)
        return text if m.rc == 0 and text else "borg (version unknown)"

    async def init(self) -> None:
        help_text = (await self.probe([self.exe, "init", "--help"])).stdout
        mode = "repokey-blake2" if b"repokey-blake2" in help_text else "repokey"
        await self.run([self.exe, "init", "-e", mode, str(self.repo)])

    def backup_argv(self, label: str, again: bool) -> list[str]:
        # --list --filter shows the file's status letter on stderr: "U" means the files
        # cache said unchanged and borg did not read the file.
        cache = ["--files-cache=disabled"] if again else []
        return [self.exe, "create", "--json", "--list", "--filter=AMUCE", "--compression", "lz4",
                *cache, f"{self.repo}::{label}", STAGE_NAME]  # fmt: skip

    def parse_backup(self, m: Measured, label: str) -> BackupDone:
        info = last_json(m.stdout)
        status = re.findall(
            rf"^([AMUCE]) {re.escape(STAGE_NAME)}$", m.stderr.decode("utf-8", "replace"), re.M
        )
        return BackupDone(label, float(info["archive"]["duration"]), status == ["U"])

    def check_argv(self) -> list[str]:
        return [self.exe, "check", "--verify-data", str(self.repo)]

    def restore_argv(self, snapshot: str, target: Path) -> tuple[list[str], Path]:
        return [self.exe, "extract", f"{self.repo}::{snapshot}"], target


class BorgNew(Borg):
    """borg with the program $BORG_NEW names (e.g. a wrapper that runs bookworm-backports'
    borg 1.4 from an unpacked package), beside the borg on PATH in the same run."""

    name = "borg-new"
    program = "$BORG_NEW"


def _program_path(program: str, env: Mapping[str, str]) -> str:
    """A program on PATH, or (for "$VAR") the executable the environment variable names."""
    if program.startswith("$"):
        named = env.get(program[1:], "")
        # A name is looked up on PATH; a path is made absolute (tools run elsewhere).
        found = shutil.which(named, path=env.get("PATH")) if named else None
        return os.path.abspath(found or named) if named else ""
    return shutil.which(program, path=env.get("PATH")) or program


def _missing_program(program: str, env: Mapping[str, str]) -> str | None:
    path = _program_path(program, env)
    if program.startswith("$") and not path:
        return f"{program} is not set"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return "not installed" if not program.startswith("$") else f"{program} is not a program"
    return None


VARIANTS: dict[str, type[Tool]] = {
    t.name: t
    for t in (Dedupe, DedupeStdin, DedupeS3, ResticStdin, ResticFile, ResticStdinNew, Borg, BorgNew)
}
#: What a family name stands for in a tool list.
FAMILIES = {
    "dedupe": ["dedupe"],
    "restic": ["restic-stdin", "restic-file"],
    "borg": ["borg"],
}


def expand_tools(names: Sequence[str]) -> list[str]:
    """Families and variants -> variants, de-duplicated, in order, dedupe first."""
    out: list[str] = ["dedupe"]
    for name in names:
        if name in FAMILIES:
            out += FAMILIES[name]
        elif name in VARIANTS:
            out.append(name)
        else:
            choices = ", ".join(dict.fromkeys([*FAMILIES, *VARIANTS]))
            raise ValueError(f"unknown tool {name!r}; choose from {choices}")
    return list(dict.fromkeys(out))
