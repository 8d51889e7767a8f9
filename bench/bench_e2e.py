#!/usr/bin/env python3
"""End-to-end throughput of dedupe against restic and BorgBackup, on the same data.

Run from the repository root (stdlib only; restic and borg are used when on PATH)::

    python3 bench/bench_e2e.py                          # 256 MiB SQLite pair, 3 runs
    python3 bench/bench_e2e.py --size 64MiB --runs 1    # quick look
    python3 bench/bench_e2e.py --size 1GiB --json > e2e.json
    python3 bench/bench_e2e.py --tools dedupe,borg --input my.db --input2 my-next-day.db

What it measures, for every tool and every run (fresh repository each run):

``new``        back up day 1 into an empty repository (encryption + compression on)
``unchanged``  back up the same day-1 bytes again. The file is re-staged (a fresh hard
               link, so its ctime changes) before every step: each tool reads and
               chunks the content, rather than trusting metadata (restic's parent
               snapshot, borg's files cache). Should a tool still skip the read, its
               figure is flagged with "*" (and ``metadata_skip`` in the JSON).
``incr``       back up day 2 after day 1; ``incr new bytes`` is the growth of the
               repository directory (apparent bytes of its files, as ``du -sb``)
``check``      right after ``new``: read and check every stored byte of the repository
               (``dedupe verify --read-data``, ``restic check --read-data``,
               ``borg check --verify-data``); MB/s is of day 1's size, the data it covers
``restore``    restore the day-1 generation to a file, then check its SHA-256 against
               the original: a wrong restore is reported as a failure, never as a number

Each command runs as its own child process, reaped with ``os.wait4`` so that its
``ru_maxrss`` (peak RSS) and CPU time belong to that child alone. Wall clock covers
the whole command including process start-up (the interpreter start of borg and of
``python -m dedupe`` counts: users pay for it too). MB/s is 10**6 bytes of *input*
per second (restore: of the restored file). Tables show medians over ``--runs``;
``--json`` prints every raw measurement and the medians as one JSON object.

Fairness rules: every tool reads the same file, warmed into the page cache just
before each timed step, after ``sync`` has flushed earlier writes; all repositories
and caches live on one filesystem under the work directory; tools run interleaved
within each run, with the order rotated from run to run; each tool keeps its
default compression (noted in the table; borg is asked for lz4 explicitly, which is
its default). Tool caches (restic's, borg's) are private to the work directory and
fresh for each run; nothing is written to ``$HOME``.

Data: by default a deterministic SQLite "chat" database made by
``../shared/data/gen_snapshot.py`` (seed 1) and one day of traffic on it
(``mutate --seed 2``), cached under the work directory (default
``$TMPDIR/dedupe-bench-e2e``), never inside the repository.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _procstats import (  # noqa: E402  (path set just above)
    CommandFailed,
    ProcResult,
    run_measured,
    tree_bytes,
    warm_page_cache,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GEN = REPO_ROOT.parent / "shared" / "data" / "gen_snapshot.py"
PASSWORD = "bench-e2e-password"  # throwaway repositories only
STAGE_NAME = "snapshot.db"  # every day is backed up under this one name (like a real DB file)

STEPS = ("new", "check", "unchanged", "incr", "restore")
# Families as given to --tools, and the variants each one expands to by default.
FAMILIES = {
    "dedupe": ["dedupe"],
    "restic": ["restic-stdin", "restic-file"],
    "borg": ["borg"],
}
ALL_VARIANTS = ["dedupe", "dedupe-stdin", "restic-stdin", "restic-file", "borg"]
REFERENCE = "dedupe"  # the variant other tools are compared against


# --------------------------------------------------------------------------- data


def parse_size(text: str) -> int:
    """'256MiB' / '1GiB' / '64M' / '1000000' -> bytes (binary units, as gen_snapshot)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256MiB)")
    return int(float(m.group(1)) * (1 << (10 * " kmgt".index(m.group(2) or " "))))


def size_arg(text: str) -> str:
    """argparse type: check a size now, keep its text for gen_snapshot.py."""
    parse_size(text)
    return text


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class InputFile:
    path: Path
    size: int
    sha256: str

    @classmethod
    def of(cls, path: Path) -> InputFile:
        return cls(path=path.resolve(), size=path.stat().st_size, sha256=sha256_file(path))


def make_dataset(workdir: Path, size_text: str, gen: Path) -> tuple[Path, Path]:
    """Generate (or reuse) day1.db / day2.db for this size under ``workdir/data``.

    Files are written under a temporary name and renamed when complete, so an
    interrupted generation is never mistaken for a cached one.
    """
    if not gen.is_file():
        sys.exit(f"error: gen_snapshot.py not found at {gen} (use --gen-snapshot PATH)")
    ddir = workdir / "data" / f"sqlite-{parse_size(size_text)}-seed1"
    ddir.mkdir(parents=True, exist_ok=True)
    day1, day2 = ddir / "day1.db", ddir / "day2.db"
    if not day1.exists():
        log(f"generating {day1} ({size_text}) ...")
        tmp = ddir / "day1.db.partial"
        tmp.unlink(missing_ok=True)  # left by an interrupted run: never build on it
        subprocess.run(
            [
                sys.executable,
                str(gen),
                "sqlite",
                "--size",
                size_text,
                "--seed",
                "1",
                "--quiet",
                str(tmp),
            ],
            check=True,
            stdout=sys.stderr,  # keep stdout for the table / the JSON object
        )
        os.replace(tmp, day1)
        day2.unlink(missing_ok=True)  # day 2 derives from day 1
    if not day2.exists():
        log(f"generating {day2} (mutate --seed 2) ...")
        tmp = ddir / "day2.db.partial"
        tmp.unlink(missing_ok=True)
        subprocess.run(
            [sys.executable, str(gen), "mutate", "--seed", "2", str(day1), str(tmp)],
            check=True,
            stdout=sys.stderr,
        )
        os.replace(tmp, day2)
    return day1, day2


def stage(src: Path, dst: Path) -> None:
    """Make ``dst`` the file ``src`` (hard link: same inode, same page cache).

    Every day is staged under the same name, the way a database file keeps its
    path from one day to the next. Falls back to a copy across filesystems.
    """
    tmp = dst.with_name(dst.name + ".new")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------- tools


@dataclass
class Backup:
    """A finished backup: the id to restore it by, and the tool's own statistics."""

    snapshot: str
    stats: dict[str, Any] = field(default_factory=dict)
    # True when the tool skipped reading the file because its metadata was
    # unchanged (restic's parent snapshot, borg's files cache): not a read speed.
    metadata_skip: bool = False
    # The tool's own timing of the backup, when it reports one (restic
    # total_duration, borg duration, dedupe seconds): wall minus this is start-up,
    # repository open/lock, cache sync and commit.
    tool_s: float | None = None


class Tool(ABC):
    """One way of backing up a file with one program (a *variant*)."""

    name: str
    compression: str  # default compression, for the table
    chunking: str  # default chunker, for the header (it decides "incr new bytes")

    def __init__(self, rundir: Path, base_env: dict[str, str]) -> None:
        self.rundir = rundir
        self.repo = rundir / "repo"
        self.src = rundir / "src"  # holds the staged snapshot.db
        self.env = dict(base_env)

    @staticmethod
    @abstractmethod
    def available() -> str | None:
        """None when the tool can run here, else why not (e.g. 'not installed')."""

    @abstractmethod
    def version(self) -> str: ...

    def describe(self) -> tuple[str, str]:
        """(compression, chunking) as the tool is run here, for the report."""
        return self.compression, self.chunking

    @abstractmethod
    def init(self) -> ProcResult: ...

    @abstractmethod
    def backup(self, label: str) -> tuple[ProcResult, Backup]:
        """Back up ``self.src / STAGE_NAME`` as generation ``label``."""

    @abstractmethod
    def restore(self, snapshot: str, target_dir: Path) -> ProcResult:
        """Restore ``snapshot`` somewhere under ``target_dir`` (empty before)."""

    @abstractmethod
    def check(self) -> ProcResult:
        """Read and verify every stored byte of the repository."""

    def run(self, argv: Sequence[str], **kw: Any) -> ProcResult:
        kw.setdefault("cwd", self.src)
        return run_measured(argv, env=self.env, **kw)


def _version_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    # Not from the checkout's directory: `python -m` would import its unbuilt package
    # ahead of the installed one.
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=60, cwd=tempfile.gettempdir()
        )
    except OSError as e:
        return f"unknown ({e})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if out.returncode == 0 and text else "unknown"


class Restic(Tool):
    compression = "auto (zstd, repo v2)"
    chunking = "Rabin CDC 512 KiB / ~1 MiB / 8 MiB"
    stdin_mode = True

    def __init__(self, rundir: Path, base_env: dict[str, str]) -> None:
        super().__init__(rundir, base_env)
        self.env.update(
            RESTIC_REPOSITORY=str(self.repo),
            RESTIC_PASSWORD=PASSWORD,
            RESTIC_CACHE_DIR=str(rundir / "cache"),
        )

    @staticmethod
    def available() -> str | None:
        return None if shutil.which("restic") else "not installed"

    def version(self) -> str:
        return _version_line(["restic", "version"], self.env)

    def init(self) -> ProcResult:
        argv = ["restic", "init"]
        # Repository format v2 is the one with compression; ask for it explicitly
        # where the flag exists (restic >= 0.14), so "stable" never means v1.
        help_text = subprocess.run(
            ["restic", "init", "--help"], capture_output=True, text=True, env=self.env
        ).stdout
        if "--repository-version" in help_text:
            argv += ["--repository-version", "2"]
        return self.run(argv)

    def backup(self, label: str) -> tuple[ProcResult, Backup]:
        if self.stdin_mode:
            res = self.run(
                [
                    "restic",
                    "backup",
                    "--json",
                    "--stdin",
                    "--stdin-filename",
                    STAGE_NAME,
                    "--tag",
                    label,
                ],
                stdin_path=self.src / STAGE_NAME,
            )
        else:
            res = self.run(["restic", "backup", "--json", "--tag", label, STAGE_NAME])
        summary: dict[str, Any] = {}
        for line in res.stdout.decode("utf-8", "replace").splitlines():
            if '"summary"' in line:
                summary = json.loads(line)
        if "snapshot_id" not in summary:
            raise RuntimeError(f"restic printed no summary:\n{res.stdout[-2000:]!r}")
        skip = not self.stdin_mode and summary.get("files_unmodified", 0) > 0
        return res, Backup(
            summary["snapshot_id"], summary, skip, tool_s=summary.get("total_duration")
        )

    def restore(self, snapshot: str, target_dir: Path) -> ProcResult:
        return self.run(["restic", "restore", snapshot, "--target", str(target_dir)])

    def check(self) -> ProcResult:
        return self.run(["restic", "check", "--read-data"])


class ResticStdin(Restic):
    name = "restic-stdin"
    stdin_mode = True


class ResticFile(Restic):
    name = "restic-file"
    stdin_mode = False


class Borg(Tool):
    name = "borg"
    compression = "lz4 (default)"
    chunking = "buzhash CDC 512 KiB / ~2 MiB / 8 MiB (1.2 default 19,23,21)"

    def __init__(self, rundir: Path, base_env: dict[str, str]) -> None:
        super().__init__(rundir, base_env)
        self.env.update(
            BORG_PASSPHRASE=PASSWORD,
            BORG_BASE_DIR=str(rundir / "borgbase"),  # config, keys, security dir, cache
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_DISPLAY_PASSPHRASE="no",
        )

    @staticmethod
    def available() -> str | None:
        return None if shutil.which("borg") else "not installed"

    def version(self) -> str:
        return _version_line(["borg", "--version"], self.env)

    def init(self) -> ProcResult:
        help_text = subprocess.run(
            ["borg", "init", "--help"], capture_output=True, text=True, env=self.env
        ).stdout
        mode = "repokey-blake2" if "repokey-blake2" in help_text else "repokey"
        return self.run(["borg", "init", "-e", mode, str(self.repo)])

    def backup(self, label: str) -> tuple[ProcResult, Backup]:
        # --list --filter shows the file's status letter on stderr: "U" means the
        # files cache said unchanged, so borg did not read the file at all.
        res = self.run(
            [
                "borg",
                "create",
                "--json",
                "--list",
                "--filter=AMUCE",
                "--compression",
                "lz4",
                f"{self.repo}::{label}",
                STAGE_NAME,
            ]
        )
        info = json.loads(res.stdout)
        stats = dict(info["archive"]["stats"], duration=info["archive"]["duration"])
        status = re.findall(
            rf"^([AMUCE]) {re.escape(STAGE_NAME)}$", res.stderr.decode("utf-8", "replace"), re.M
        )
        stats["file_status"] = status[0] if status else None
        return res, Backup(label, stats, metadata_skip=status == ["U"], tool_s=stats["duration"])

    def restore(self, snapshot: str, target_dir: Path) -> ProcResult:
        return self.run(["borg", "extract", f"{self.repo}::{snapshot}"], cwd=target_dir)

    def check(self) -> ProcResult:
        return self.run(["borg", "check", "--verify-data", str(self.repo)])


def _import_probe(pythonpath: Path | None) -> str | None:
    """None when `python -m dedupe` would work (with `pythonpath` first on the path, or
    as installed when None, from a directory outside the checkout); else why not."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            # Importing __main__ would run the CLI: only check that it exists, and that
            # the native modules load.
            "import dedupe.cli, dedupe.chunking, importlib.util, sys\n"
            "sys.exit(importlib.util.find_spec('dedupe.__main__') is None)",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/" if pythonpath is None else REPO_ROOT,
    )
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["?"])[-1]


@functools.cache
def _checkout_is_built() -> bool:
    return _import_probe(REPO_ROOT) is None


class Dedupe(Tool):
    name = "dedupe"
    compression = "zstd (default level)"
    chunking = "FastCDC (default sizes)"
    stdin_mode = False

    def __init__(self, rundir: Path, base_env: dict[str, str]) -> None:
        super().__init__(rundir, base_env)
        # This checkout when its native modules are built in place, else the package
        # installed for this interpreter (`pip install .`): see available().
        if _checkout_is_built():
            pp = self.env.get("PYTHONPATH")
            self.env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")
        self.env.update(DEDUPE_REPO=str(self.repo), DEDUPE_PASSWORD=PASSWORD)

    @staticmethod
    def available() -> str | None:
        if _checkout_is_built():
            # Byte-compile the checkout once, as `pip install` does for an installed
            # package: with PYTHONDONTWRITEBYTECODE set, every command would otherwise
            # compile its modules from source again (~0.1 s of each command, measured).
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "dedupe")],
                capture_output=True,
                check=False,
            )
            return None
        probe = _import_probe(None)
        if probe is None:
            return None
        return (
            f"neither this checkout (its native modules are not built in place: "
            f"python setup.py build_ext --inplace) nor an installed package ({probe}) "
            "can be imported: pip install ."
        )

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "dedupe", *args]

    def version(self) -> str:
        v = _version_line(self.cmd("--version"), self.env)
        if v == "unknown":
            v = "dedupe " + self._package_version()
        return v + self._build_warning()

    def _build_warning(self) -> str:
        """Flag native extensions built with sanitizers: their speed means nothing."""
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import pathlib, dedupe\n"
                "root = pathlib.Path(dedupe.__file__).parent\n"
                "print('\\n'.join(map(str, root.rglob('*.so'))))",
            ],
            capture_output=True,
            text=True,
            env=self.env,
        ).stdout.split()
        flagged = [
            Path(so).name
            for so in out
            if any(m in Path(so).read_bytes() for m in (b"__asan_init", b"__ubsan_handle"))
        ]
        return f" (WARNING: sanitizer build: {', '.join(flagged)})" if flagged else ""

    def _package_version(self) -> str:
        return _version_line(
            [
                sys.executable,
                "-c",
                "import importlib.metadata as m, dedupe\n"
                "try: print(m.version('dedupe'))\n"
                "except Exception: print(getattr(dedupe, '__version__', 'unknown'))",
            ],
            self.env,
        )

    def describe(self) -> tuple[str, str]:
        # The defaults are printed by `dedupe init --help` (click's show_default).
        out = subprocess.run(
            self.cmd("init", "--help"), capture_output=True, text=True, env=self.env
        ).stdout
        text = " ".join(out.split())

        def default(option: str) -> str | None:
            m = re.search(rf"{re.escape(option)} .*?\[default: (\d+)", text)
            return m.group(1) if m else None

        level = default("--compression-level")
        sizes = [default(f"--chunk-{k}") for k in ("min", "avg", "max")]
        compression = f"zstd-{level} (default)" if level else self.compression
        chunking = self.chunking
        if all(sizes):
            kib = [f"{int(str(v)) // 1024} KiB" for v in sizes]
            chunking = f"FastCDC {kib[0]} / ~{kib[1]} / {kib[2]}"
        return compression, chunking

    def init(self) -> ProcResult:
        return self.run(self.cmd("init", "--json"))

    def backup(self, label: str) -> tuple[ProcResult, Backup]:
        if self.stdin_mode:
            res = self.run(
                self.cmd("backup", "-", "--name", "bench", "--json"),
                stdin_path=self.src / STAGE_NAME,
            )
        else:
            res = self.run(self.cmd("backup", STAGE_NAME, "--name", "bench", "--json"))
        info = _last_json_object(res.stdout)
        seconds = info.get("seconds")
        return res, Backup(
            str(info["id"]), info, tool_s=float(seconds) if seconds is not None else None
        )

    def restore(self, snapshot: str, target_dir: Path) -> ProcResult:
        return self.run(self.cmd("restore", snapshot, str(target_dir / STAGE_NAME)))

    def check(self) -> ProcResult:
        return self.run(self.cmd("verify", "--read-data"))


class DedupeStdin(Dedupe):
    name = "dedupe-stdin"
    stdin_mode = True


def _last_json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object a CLI printed (whole stdout, or its last JSON line)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("{")]
        if not lines:
            raise RuntimeError(f"no JSON object in output: {text[-500:]!r}") from None
        obj = json.loads(lines[-1])
    if not isinstance(obj, dict):
        raise RuntimeError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


TOOL_CLASSES: dict[str, type[Tool]] = {
    "dedupe": Dedupe,
    "dedupe-stdin": DedupeStdin,
    "restic-stdin": ResticStdin,
    "restic-file": ResticFile,
    "borg": Borg,
}


# --------------------------------------------------------------------------- one run


class RestoreMismatch(RuntimeError):
    pass


def settle() -> None:
    """Flush dirty pages before a timed step.

    Otherwise the write-back of what the previous step (or the previous tool)
    wrote would run during, and be billed to, the next measurement.
    """
    os.sync()


def fsync_time(path: Path) -> float:
    """Seconds to fsync ``path`` (about 0 when the tool already did)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def step_record(
    step: str, res: ProcResult, nbytes: int, repo_before: int, repo_after: int
) -> dict[str, Any]:
    return {
        "step": step,
        "wall_s": res.wall_s,
        "user_s": res.user_s,
        "sys_s": res.sys_s,
        "maxrss_bytes": res.maxrss_bytes,
        "input_bytes": nbytes,
        "mb_s": nbytes / res.wall_s / 1e6,
        "repo_bytes": repo_after,
        "repo_growth": repo_after - repo_before,
    }


def run_tool_once(
    cls: type[Tool],
    run: int,
    workdir: Path,
    base_env: dict[str, str],
    day1: InputFile,
    day2: InputFile | None,
    keep: bool,
) -> dict[str, Any]:
    """All steps of one tool in one fresh repository; never raises for tool failures."""
    rundir = workdir / "runs" / cls.name
    shutil.rmtree(rundir, ignore_errors=True)
    tool = cls(rundir, base_env)
    tool.src.mkdir(parents=True)
    record: dict[str, Any] = {"tool": cls.name, "run": run, "ok": True, "steps": {}}
    steps: dict[str, Any] = record["steps"]
    staged = tool.src / STAGE_NAME
    try:
        res = tool.init()
        steps["init"] = step_record("init", res, 0, 0, tree_bytes(tool.repo))
        repo = steps["init"]["repo_bytes"]

        plan: list[tuple[str, InputFile, str]] = [
            ("new", day1, "day1"),
            ("unchanged", day1, "day1-again"),
        ]
        if day2 is not None:
            plan.append(("incr", day2, "day2"))
        day1_snapshot = ""
        for step, inp, label in plan:
            stage(inp.path, staged)
            settle()
            warm_page_cache(staged)
            log(f"  run {run + 1} {cls.name:13s} {step:9s} ...", end="")
            res, backup = tool.backup(label)
            after = tree_bytes(tool.repo)
            steps[step] = step_record(step, res, inp.size, repo, after)
            steps[step].update(
                snapshot=backup.snapshot,
                tool_stats=backup.stats,
                metadata_skip=backup.metadata_skip,
                tool_s=backup.tool_s,
            )
            repo = after
            if step == "new":
                day1_snapshot = backup.snapshot
            log(f" {steps[step]['mb_s']:8.1f} MB/s  +{steps[step]['repo_growth']:,} B")
            if step == "new":
                settle()
                log(f"  run {run + 1} {cls.name:13s} {'check':9s} ...", end="")
                res = tool.check()
                steps["check"] = step_record("check", res, day1.size, repo, tree_bytes(tool.repo))
                log(f" {steps['check']['mb_s']:8.1f} MB/s")

        target = rundir / "restore"
        target.mkdir()
        settle()
        log(f"  run {run + 1} {cls.name:13s} {'restore':9s} ...", end="")
        res = tool.restore(day1_snapshot, target)
        steps["restore"] = step_record("restore", res, day1.size, repo, tree_bytes(tool.repo))
        files = [Path(d) / f for d, _, fs in os.walk(target) for f in fs]
        if len(files) != 1:
            raise RestoreMismatch(f"expected 1 restored file, found {len(files)}: {files[:5]}")
        # Not every tool makes its output durable (dedupe fsyncs the restored file;
        # restic and borg leave it in the page cache): time the fsync they left to
        # do, and report restore speed with it as well.
        steps["restore"]["flush_s"] = fsync_time(files[0])
        steps["restore"]["durable_mb_s"] = (
            day1.size / (res.wall_s + steps["restore"]["flush_s"]) / 1e6
        )
        # Verify after the clock stopped: hash the restored file.
        got = InputFile.of(files[0])
        steps["restore"]["verified"] = got.sha256 == day1.sha256 and got.size == day1.size
        if not steps["restore"]["verified"]:
            raise RestoreMismatch(
                f"restored {got.size} bytes sha256 {got.sha256[:16]}, expected "
                f"{day1.size} bytes sha256 {day1.sha256[:16]}"
            )
        log(f" {steps['restore']['mb_s']:8.1f} MB/s  verified")
    except (CommandFailed, RestoreMismatch, RuntimeError, ValueError, KeyError) as e:
        record["ok"] = False
        record["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, CommandFailed):
            record["stderr_tail"] = e.result.stderr_tail(40)
        log(f"\n  run {run + 1} {cls.name}: FAILED: {record['error']}")
    finally:
        if not keep:
            shutil.rmtree(rundir, ignore_errors=True)
    return record


# --------------------------------------------------------------------------- report


def medians(records: list[dict[str, Any]], tool: str) -> dict[str, dict[str, float]]:
    """Median of every numeric step metric over the successful runs of ``tool``."""
    ok = [r for r in records if r["tool"] == tool and r["ok"]]
    out: dict[str, dict[str, float]] = {}
    for step in ("init", *STEPS):
        rows = [r["steps"][step] for r in ok if step in r["steps"]]
        if not rows:
            continue
        out[step] = {
            k: statistics.median(row[k] for row in rows)
            for k in (
                "wall_s",
                "user_s",
                "sys_s",
                "maxrss_bytes",
                "mb_s",
                "repo_bytes",
                "repo_growth",
            )
        }
        for key in ("tool_s", "flush_s", "durable_mb_s"):
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                out[step][key] = statistics.median(values)
        out[step]["mb_s_min"] = min(row["mb_s"] for row in rows)
        out[step]["mb_s_max"] = max(row["mb_s"] for row in rows)
        out[step]["metadata_skip"] = any(row.get("metadata_skip") for row in rows)
        out[step]["runs"] = len(rows)
    return out


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    # Rows of two cells (name, message) span the table and do not set widths.
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *full, strict=True)]
    widths[0] = max([widths[0], *(len(r[0]) for r in rows)])
    lines = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        if len(row) == 2 and len(header) > 2:  # a "skipped"/"failed" row spans the table
            lines.append(f"{row[0].ljust(widths[0])}  {row[1]}")
            continue
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    med: dict[str, dict[str, dict[str, float]]] = report["medians"]
    skipped: dict[str, str] = report["skipped"]
    failed = {r["tool"]: r["error"] for r in report["runs"] if not r["ok"]}
    inp = report["input"]
    out: list[str] = []
    d2 = inp.get("day2")
    out.append(
        f"input: day1 {inp['day1']['size'] / 1e6:.1f} MB"
        + (f", day2 {d2['size'] / 1e6:.1f} MB" if d2 else ", no day2 (incr skipped)")
        + f"; {report['config']['runs']} run(s), medians; MB/s = 1e6 B/s of input;"
        f" {report['host']['cpus']} CPUs"
    )
    for name, ver in report["versions"].items():
        out.append(f"  {name}: {ver}; chunking: {report['chunking'].get(name, '?')}")
    out.append("")

    def mbs(t: str, s: str) -> str:
        m = med[t].get(s)
        if not m:
            return "-"
        return f"{m['mb_s']:.1f}" + ("*" if m["metadata_skip"] else "")

    def rss(t: str, s: str) -> str:
        m = med[t].get(s)
        return f"{m['maxrss_bytes'] / (1 << 20):.0f}" if m else "-"

    def num(t: str, s: str, k: str) -> str:
        m = med[t].get(s)
        return f"{int(m[k]):,}" if m else "-"

    def durable(t: str) -> str:
        m = med[t].get("restore")
        return f"{m['durable_mb_s']:.1f}" if m and "durable_mb_s" in m else "-"

    header = [
        "tool",
        "compression",
        "new MB/s",
        "unchanged MB/s",
        "incr MB/s",
        "restore MB/s",
        "+fsync",
        "check MB/s",
        "repo B after day1",
        "incr new B",
        "peak RSS MiB " + "/".join(STEPS),
    ]
    rows: list[list[str]] = []
    for t in report["tools"]:
        if t in skipped:
            rows.append([t, f"skipped: {skipped[t]}"])
        elif t not in med or not med[t]:
            rows.append([t, f"FAILED: {failed.get(t, 'no successful run')}".splitlines()[0]])
        else:
            rows.append(
                [
                    t,
                    report["compression"][t],
                    mbs(t, "new"),
                    mbs(t, "unchanged"),
                    mbs(t, "incr"),
                    mbs(t, "restore"),
                    durable(t),
                    mbs(t, "check"),
                    num(t, "new", "repo_bytes"),
                    num(t, "incr", "repo_growth"),
                    "/".join(rss(t, s) for s in STEPS),
                ]
            )
    out.append(fmt_table(header, rows))
    if any(m.get("metadata_skip") for t in med for m in med[t].values()):
        out.append(
            "* the tool skipped reading the unchanged file (parent snapshot / files "
            "cache metadata): not a read speed"
        )
    # Spread between runs: other load on the machine shows up here first.
    noisy = [
        f"{t} {s} {m['mb_s_min']:.0f}..{m['mb_s_max']:.0f}"
        for t in med
        for s, m in med[t].items()
        if s in STEPS and m["runs"] > 1 and (m["mb_s_max"] - m["mb_s_min"]) > 0.25 * m["mb_s"]
    ]
    if noisy:
        out.append("spread > 25% of the median (MB/s min..max): " + "; ".join(noisy))
    for t, err in failed.items():
        if t in med and med[t]:
            out.append(f"note: {t} failed in some runs: {err.splitlines()[0]}")

    # Where the time goes: CPU seconds (user+sys) against wall seconds.
    cpu_rows = []
    for t in report["tools"]:
        if t in med and med[t]:
            cells = [t]
            for s in STEPS:
                m = med[t].get(s)
                if not m:
                    cells.append("-")
                    continue
                own = f" ({m['tool_s']:.2f})" if "tool_s" in m else ""
                cells.append(f"{m['user_s'] + m['sys_s']:.2f}/{m['wall_s']:.2f}{own}")
            cpu_rows.append(cells)
    if cpu_rows:
        out.append("")
        out.append(
            "CPU s (user+sys) / wall s, medians; in parentheses the backup time the "
            "tool reports itself\n(the rest is start-up, repository open/lock, cache "
            "sync, commit):"
        )
        out.append(fmt_table(["tool", *STEPS], cpu_rows))

    # dedupe against each other tool.
    if REFERENCE in med and med[REFERENCE]:
        ref = med[REFERENCE]
        ratio_rows = []
        for t in report["tools"]:
            if t == REFERENCE or t not in med or not med[t]:
                continue
            cells = [t]
            for s in STEPS:
                a, b = ref.get(s), med[t].get(s)
                cells.append(f"{a['mb_s'] / b['mb_s']:.2f}x" if a and b else "-")
            a, b = ref.get("restore", {}), med[t].get("restore", {})
            ok = "durable_mb_s" in a and "durable_mb_s" in b
            cells.append(f"{a['durable_mb_s'] / b['durable_mb_s']:.2f}x" if ok else "-")
            for s, k in (("new", "repo_bytes"), ("incr", "repo_growth")):
                a, b = ref.get(s), med[t].get(s)
                cells.append(f"{a[k] / b[k]:.2f}x" if a and b and b[k] else "-")
            peak_a = max(m["maxrss_bytes"] for m in ref.values())
            peak_b = max(m["maxrss_bytes"] for m in med[t].values())
            cells.append(f"{peak_a / peak_b:.2f}x")
            ratio_rows.append(cells)
        if ratio_rows:
            out.append("")
            out.append(
                f"{REFERENCE} / other tool (speed: >1 = {REFERENCE} faster; "
                f"bytes and RSS: <1 = {REFERENCE} smaller):"
            )
            out.append(
                fmt_table(
                    [
                        "vs",
                        *STEPS,
                        "restore+fsync",
                        "repo B day1",
                        "incr new B",
                        "peak RSS",
                    ],
                    ratio_rows,
                )
            )
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def log(msg: str, end: str = "\n") -> None:
    print(msg, end=end, file=sys.stderr, flush=True)


def parse_tools(text: str) -> list[str]:
    out: list[str] = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        if name in FAMILIES:
            out += FAMILIES[name]
        elif name in TOOL_CLASSES:
            out.append(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown tool {name!r}; choose from {', '.join([*FAMILIES, *ALL_VARIANTS])}"
            )
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="End-to-end backup/restore throughput: dedupe vs restic vs borg.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--size", type=size_arg, default="256MiB", help="size of the generated day-1 database"
    )
    p.add_argument("--runs", type=int, default=3, help="runs per tool (medians are reported)")
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dedupe-bench-e2e",
        help="data cache, repositories and tool caches (keep it off the repo)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (raw runs + medians) on stdout; table on stderr",
    )
    p.add_argument(
        "--tools",
        type=parse_tools,
        default=parse_tools("dedupe,restic,borg"),
        help=f"families (dedupe, restic, borg) or variants ({', '.join(ALL_VARIANTS)})",
    )
    p.add_argument("--input", type=Path, help="back up this file instead of generated day 1")
    p.add_argument(
        "--input2", type=Path, help="with --input: the next day's version of it (else no incr step)"
    )
    p.add_argument("--gen-snapshot", type=Path, default=DEFAULT_GEN, help="path of gen_snapshot.py")
    p.add_argument("--keep", action="store_true", help="keep the last run's repositories")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")

    workdir: Path = args.workdir.resolve()
    if workdir == REPO_ROOT or REPO_ROOT in workdir.parents:
        p.error(f"--workdir {workdir} is inside the repository; put it elsewhere")
    workdir.mkdir(parents=True, exist_ok=True)

    if args.input:
        for f in (args.input, args.input2):
            if f is not None and not f.is_file():
                p.error(f"{f}: not a file")
        day1_path, day2_path = args.input, args.input2
    else:
        if args.input2:
            p.error("--input2 needs --input")
        day1_path, day2_path = make_dataset(workdir, args.size, args.gen_snapshot)
    day1 = InputFile.of(day1_path)
    day2 = InputFile.of(day2_path) if day2_path else None

    # A private HOME and caches: nothing lands in the user's $HOME.
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    base_env = dict(
        os.environ,
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        LC_ALL="C.UTF-8",
        LANG="C.UTF-8",
    )

    skipped: dict[str, str] = {}
    versions: dict[str, str] = {}
    compression: dict[str, str] = {}
    chunking: dict[str, str] = {}
    active: list[type[Tool]] = []
    for name in args.tools:
        cls = TOOL_CLASSES[name]
        why = cls.available()
        if why and name.startswith("dedupe"):  # the subject of the benchmark: never skipped
            sys.exit(f"bench_e2e: {name} cannot run: {why}")
        if why:
            skipped[name] = why
            log(f"{name}: skipped: {why}")
            continue
        active.append(cls)
        probe = cls(workdir / "runs" / "probe", base_env)  # creates nothing
        family = name.split("-")[0]
        if family not in versions:
            versions[family] = probe.version()
        compression[name], chunking[family] = probe.describe()

    records: list[dict[str, Any]] = []
    for run in range(args.runs):
        # Rotate the order each run so that no tool always goes first (or last).
        k = run % len(active) if active else 0
        for cls in active[k:] + active[:k]:
            records.append(run_tool_once(cls, run, workdir, base_env, day1, day2, args.keep))

    report: dict[str, Any] = {
        "benchmark": "bench_e2e",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "size": args.size,
            "runs": args.runs,
            "workdir": str(workdir),
            "tools": args.tools,
        },
        "host": {
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        },
        "versions": versions,
        "input": {
            "day1": asdict(day1) | {"path": str(day1.path)},
            "day2": (asdict(day2) | {"path": str(day2.path)}) if day2 else None,
        },
        "compression": compression,
        "chunking": chunking,
        "tools": args.tools,
        "skipped": skipped,
        "runs": records,
        "medians": {cls.name: medians(records, cls.name) for cls in active},
    }
    table = render(report)
    if args.json:
        log(table)
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)
    if not records:
        log("error: no tool could run")
        return 2
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
