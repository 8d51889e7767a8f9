"""End to end: every step of every tool through its real command, one process per step.

For each run, each tool in a fresh repository: ``new`` (back up day 1 into it), ``check``
(read and check every stored byte: ``dedupe verify --read-data``, ``restic check
--read-data``, ``borg check --verify-data``; MB/s of day 1's size), ``unchanged`` (day 1
again: every tool must read the file, restic with ``--force``, borg with
``--files-cache=disabled``; dedupe always reads a stream whole), ``incr`` (day 2, when there
is one; "incr bytes" is what it added to the repository), ``restore`` (day 1 to a file,
then its size and BLAKE3 compared with the source's: a wrong restore is an error, never a
number; "+fsync" adds the fsync a tool left undone) and ``restore-incr`` (day 2's
generation, checked the same way: for dedupe the restore of an incremental, whose chain
is composed first and whose chunks sit in two days' packs).

Fairness: ``sync`` before each step, so that earlier write-back is not billed to it; as
many bytes as the step will write written to a scratch file and removed first (a VM's page
faults on fresh memory are not billed to whichever tool runs first: ``prefault``); the
file warm in the page cache before each backup; each file staged under one name by a fresh
hard link (its ctime changes, as a database file's does); tools interleaved within each
run, in an order that rotates from run to run; each tool at its default compression and
key derivation (borg asked for lz4, its default, explicitly). Wall time includes process
start-up and repository open, as users pay it; the time each tool reports itself is kept
beside it.
"""

from __future__ import annotations

import os
import shutil
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dedupe.bench.data import blake3_file
from dedupe.bench.measure import Measured, fsync_time, prefault, warm
from dedupe.bench.report import (
    DAY2_STEPS,
    REFERENCE,
    STEPS,
    BenchProgress,
    Ratio,
    StepResult,
    StepRun,
    ToolReport,
)
from dedupe.bench.tools import VARIANTS, Tool, ToolFailed

__all__ = ["Input", "end_to_end"]


@dataclass(frozen=True)
class Input:
    path: Path
    size: int
    digest: str  # unkeyed BLAKE3, hex

    @classmethod
    def of(cls, path: Path) -> Input:
        return cls(path, path.stat().st_size, blake3_file(path))


@dataclass(frozen=True)
class Env:
    workdir: Path
    base: dict[str, str]  # every command's environment, before the tool's own variables
    say: BenchProgress
    keep: bool = False  # keep the last run's repositories


def _stage(src: Path, dst: Path) -> None:
    """Make `dst` the file `src`: a fresh hard link (same page cache, new ctime), else a
    copy across file systems."""
    tmp = dst.with_name(dst.name + ".new")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _record(run: int, m: Measured, nbytes: int, own: float | None, **kw: object) -> StepRun:
    return StepRun(
        run=run,
        wall_s=m.wall_s,
        user_s=m.user_s,
        sys_s=m.sys_s,
        maxrss_bytes=m.maxrss_bytes,
        mb_s=nbytes / m.wall_s / 1e6,
        tool_s=own,
        **kw,  # type: ignore[arg-type]
    )


async def _one_run(
    cls: type[Tool], run: int, day1: Input, day2: Input | None, env: Env
) -> dict[str, StepRun]:
    """Every step of one tool in a fresh repository. Raises the tool's error on failure."""
    rundir = env.workdir / "runs" / cls.name
    shutil.rmtree(rundir, ignore_errors=True)
    tool = cls(rundir, env.base)
    tool.prepare()
    out: dict[str, StepRun] = {}

    def said(step: str, extra: str = "") -> None:
        env.say(f"run {run + 1} {cls.name} {step}: {out[step].mb_s:.1f} MB/s{extra}")

    try:
        await tool.init()
        repo = await tool.repo_bytes()
        plan = [("new", day1, "day1"), ("unchanged", day1, "day1-again")]
        if day2 is not None:
            plan.append(("incr", day2, "day2"))
        day1_snapshot = day2_snapshot = ""
        for step, inp, label in plan:
            _stage(inp.path, tool.staged)
            prefault(rundir, inp.size)
            os.sync()
            warm(tool.staged)
            m, done = await tool.backup(label, again=step == "unchanged")
            after = await tool.repo_bytes()
            out[step] = _record(
                run,
                m,
                inp.size,
                done.tool_s,
                repo_bytes=after,
                repo_growth=after - repo,
                metadata_skip=done.metadata_skip,
            )
            repo = after
            said(step, f", +{out[step].repo_growth:,} B")
            if step == "incr":
                day2_snapshot = done.snapshot
            if step == "new":
                day1_snapshot = done.snapshot
                os.sync()
                m = await tool.run(tool.check_argv())
                out["check"] = _record(run, m, day1.size, tool.own_seconds(m))
                said("check")
        out["restore"] = await _restore(tool, day1_snapshot, day1, rundir / "restore", run)
        said("restore", ", verified")
        if day2 is not None:
            out["restore-incr"] = await _restore(
                tool, day2_snapshot, day2, rundir / "restore-incr", run
            )
            said("restore-incr", ", verified")
    finally:
        if not env.keep:
            await tool.remove_repository()
            shutil.rmtree(rundir, ignore_errors=True)
    return {s: out[s] for s in STEPS if s in out}


async def _restore(tool: Tool, snapshot: str, inp: Input, target: Path, run: int) -> StepRun:
    """Restore `snapshot` under the empty directory `target` and check it is `inp`."""
    target.mkdir()
    prefault(target.parent, inp.size)
    os.sync()
    argv, cwd = tool.restore_argv(snapshot, target)
    m = await tool.run(argv, cwd)
    files = [Path(d) / f for d, _, fs in os.walk(target) for f in fs]
    if len(files) != 1:
        raise tool.wrong_restore(f"expected 1 restored file, found {len(files)}")
    # Not every tool makes its output durable (dedupe fsyncs the restored file; restic
    # and borg leave it in the page cache): time the fsync they left to do.
    flush = fsync_time(files[0])
    size, digest = files[0].stat().st_size, blake3_file(files[0])
    if size != inp.size or digest != inp.digest:
        raise tool.wrong_restore(
            f"{tool.name} restored {size} bytes with BLAKE3 {digest[:16]}, the source "
            f"has {inp.size} bytes with BLAKE3 {inp.digest[:16]}"
        )
    # The restored file goes before the next step: only one day's output on disk at once.
    shutil.rmtree(target, ignore_errors=True)
    return _record(run, m, inp.size, tool.own_seconds(m), flush_s=flush, verified=True)


def _median_step(step: str, nbytes: int, runs: list[StepRun]) -> StepResult:
    med = statistics.median
    own = [nbytes / r.tool_s / 1e6 for r in runs if r.tool_s]
    durable = [nbytes / (r.wall_s + r.flush_s) / 1e6 for r in runs if r.flush_s is not None]
    repo = [r.repo_bytes for r in runs if r.repo_bytes is not None]
    growth = [r.repo_growth for r in runs if r.repo_growth is not None]
    return StepResult(
        step=step,
        input_bytes=nbytes,
        runs=tuple(runs),
        mb_s=med(r.mb_s for r in runs),
        mb_s_min=min(r.mb_s for r in runs),
        mb_s_max=max(r.mb_s for r in runs),
        tool_mb_s=med(own) if own else None,
        durable_mb_s=med(durable) if durable else None,
        cpu_s=med(r.user_s + r.sys_s for r in runs),
        wall_s=med(r.wall_s for r in runs),
        peak_rss_bytes=int(med(r.maxrss_bytes for r in runs)),
        repo_bytes=int(med(repo)) if repo else None,
        repo_growth=int(med(growth)) if growth else None,
        metadata_skip=any(r.metadata_skip for r in runs),
    )


def _durable_mb_s(r: StepRun) -> float:
    return r.mb_s * r.wall_s / (r.wall_s + (r.flush_s or 0.0))


def _measures(steps: dict[str, StepRun]) -> dict[str, float | None]:
    """What is compared between tools, for one run of one tool."""
    out: dict[str, float | None] = {s: steps[s].mb_s for s in STEPS if s in steps}
    out["restore+fsync"] = _durable_mb_s(steps["restore"]) if "restore" in steps else None
    out["peak_rss"] = max(s.maxrss_bytes for s in steps.values())
    out["repo_bytes"] = steps["new"].repo_bytes if "new" in steps else None
    out["incr_bytes"] = steps["incr"].repo_growth if "incr" in steps else None
    return out


def _ratios(per_run: dict[str, dict[int, dict[str, StepRun]]]) -> list[Ratio]:
    """dedupe / other, within each run, then the median over the runs both completed."""
    ref = {r: _measures(steps) for r, steps in per_run.get(REFERENCE, {}).items()}
    out = []
    for tool, runs in per_run.items():
        if tool == REFERENCE:
            continue
        other = {r: _measures(steps) for r, steps in runs.items()}
        shared = sorted(set(ref) & set(other))
        for measure in ref[shared[0]] if shared else ():
            vals = [
                a / b
                for r in shared
                if (a := ref[r].get(measure)) is not None and (b := other[r].get(measure))
            ]
            if vals:
                out.append(Ratio(tool, measure, statistics.median(vals)))
    return out


async def end_to_end(
    day1: Input, day2: Input | None, variants: Sequence[str], runs: int, env: Env
) -> tuple[list[ToolReport], list[Ratio]]:
    """Run every variant `runs` times; dedupe's own failures raise (StepFailed,
    IntegrityError), another tool's failure is reported in its row."""
    tools: list[type[Tool]] = []
    skipped: dict[str, str] = {}
    for name in variants:
        cls = VARIANTS[name]
        why = cls.missing(env.base)
        if why:
            skipped[name] = why
            env.say(f"{name}: skipped ({why})")
        else:
            tools.append(cls)
    per_run: dict[str, dict[int, dict[str, StepRun]]] = {t.name: {} for t in tools}
    failed: dict[str, str] = {}
    for run in range(runs):
        k = run % len(tools)
        for cls in tools[k:] + tools[:k]:  # rotate: no tool always goes first
            if cls.name in failed:
                continue
            try:
                per_run[cls.name][run] = await _one_run(cls, run, day1, day2, env)
            except ToolFailed as e:  # dedupe's own failures propagate as DedupeErrors
                failed[cls.name] = str(e)
                env.say(f"{cls.name}: FAILED: {e}")
    reports: list[ToolReport] = []
    for cls in tools:
        probe = cls(env.workdir / "runs" / "probe", env.base)
        version = await probe.version()
        if cls.name in failed:
            reports.append(ToolReport(cls.name, "failed", failed[cls.name], version))
            continue
        done = per_run[cls.name].values()
        results = tuple(
            _median_step(
                s, day2.size if s in DAY2_STEPS and day2 else day1.size, [r[s] for r in done]
            )
            for s in STEPS
            if all(s in r for r in done)
        )
        reports.append(
            ToolReport(cls.name, "ok", "", version, cls.compression, cls.chunking, results)
        )
    shutil.rmtree(env.workdir / "runs" / "probe", ignore_errors=True)
    for name, why in skipped.items():
        reports.append(ToolReport(name, "skipped", why))
    ok = {n: v for n, v in per_run.items() if n not in failed}
    return reports, _ratios(ok)
