"""The benchmark's report: what was measured, as records, JSON and tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from dedupe.errors import DedupeError

__all__ = [
    "BenchProgress",
    "BenchReport",
    "Ratio",
    "StageReport",
    "StageResult",
    "StepFailed",
    "StepResult",
    "StepRun",
    "ToolReport",
    "format_report",
]

MiB = 1 << 20
STAGES = ("read", "chunk", "hash", "compress", "seal", "write")
CPU_STAGES = STAGES[:-1]  # "pipeline bound": write is disk-bound and overlaps the others
#: End-to-end steps in the order they run; DAY2_STEPS only when there is a second day.
STEPS = ("new", "check", "unchanged", "incr", "restore", "restore-incr")
DAY2_STEPS = ("incr", "restore-incr")  # measured on day 2's bytes
#: How the peak RSS column names each step.
STEP_LETTERS = {
    "new": "n",
    "check": "c",
    "unchanged": "u",
    "incr": "i",
    "restore": "r",
    "restore-incr": "ri",
}
REFERENCE = "dedupe"  # the tool the others are compared against

#: Progress messages ("run 2 dedupe new: 812.0 MB/s"), one line each, for a log or stderr.
BenchProgress = Callable[[str], None]


class StepFailed(DedupeError):
    """A measured dedupe command exited non-zero (the message carries its last error line)."""


@dataclass(frozen=True)
class StageResult:
    name: str
    bytes: int  # input bytes of one run
    seconds: tuple[float, ...]  # one per run
    mb_s: float  # median
    mb_s_min: float
    mb_s_max: float
    note: str = ""


@dataclass(frozen=True)
class StageReport:
    stages: tuple[StageResult, ...]
    pipeline_bound_mb_s: float  # median over runs of 1 / sum(1 / MB/s) of CPU_STAGES
    compression_ratio: float  # input bytes / framed bytes (zstd or raw, before sealing)
    chunks: int
    sample_bytes: int
    peak_rss_bytes: int  # of the bench process (it maps the sample)


@dataclass(frozen=True)
class StepRun:
    """One measured command."""

    run: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_bytes: int
    mb_s: float  # input bytes / wall
    tool_s: float | None = None  # the time the tool reports itself, when it does
    repo_bytes: int | None = None  # repository size after the step
    repo_growth: int | None = None  # what the step added to the repository
    flush_s: float | None = None  # restore: fsync of the output left to do afterwards
    verified: bool | None = None  # restore: size and BLAKE3 equal the source's
    # The tool skipped reading the file because its metadata was unchanged (restic's
    # parent snapshot, borg's files cache): not a read speed.
    metadata_skip: bool = False


@dataclass(frozen=True)
class StepResult:
    step: str
    input_bytes: int
    runs: tuple[StepRun, ...]
    mb_s: float  # medians from here on
    mb_s_min: float
    mb_s_max: float
    tool_mb_s: float | None
    durable_mb_s: float | None  # restore: with the fsync the tool left undone
    cpu_s: float
    wall_s: float
    peak_rss_bytes: int
    repo_bytes: int | None
    repo_growth: int | None
    metadata_skip: bool  # in any run


@dataclass(frozen=True)
class ToolReport:
    name: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    version: str = ""
    compression: str = ""
    chunking: str = ""
    steps: tuple[StepResult, ...] = ()

    def step(self, name: str) -> StepResult | None:
        return next((s for s in self.steps if s.step == name), None)


@dataclass(frozen=True)
class Ratio:
    """dedupe / `tool` for one measure, median of the per-run ratios (speed: > 1 is dedupe
    faster; peak RSS and bytes: < 1 is dedupe smaller)."""

    tool: str
    # a step; "restore+fsync"; "peak_rss" (largest of the steps); "repo_bytes" (after
    # new); "incr_bytes" (what the incremental added)
    step: str
    ratio: float


@dataclass(frozen=True)
class BenchReport:
    when: str
    host: dict[str, Any]
    # day 1: path, bytes, generated, blake3, description; "day2": the same or None
    data: dict[str, Any]
    runs: int
    stages: StageReport | None
    tools: tuple[ToolReport, ...]  # dedupe first, then the compared tools
    ratios: tuple[Ratio, ...]
    notes: tuple[str, ...] = field(default=())

    def tool(self, name: str) -> ToolReport | None:
        return next((t for t in self.tools if t.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- tables


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """The first `left` columns (names, words) left-aligned, the rest (numbers) right-aligned;
    a row of two cells (name, message) spans the table."""
    full = [r for r in rows if len(r) == len(header)]
    widths = [max(len(c) for c in col) for col in zip(header, *full, strict=True)]
    widths[0] = max([widths[0], *(len(r[0]) for r in rows)])

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append(f"{r[0].ljust(widths[0])}  {r[1]}" if len(r) != len(header) else line(r))
    return "\n".join(out)


def _mib(n: float) -> str:
    return f"{n / MiB:.0f}"


def _mb(n: float | None) -> str:
    return f"{n / 1e6:.1f}" if n is not None else "-"


def _stage_lines(st: StageReport) -> list[str]:
    rows = [
        [s.name, s.note, f"{s.mb_s:.1f}", f"{s.mb_s_min:.0f}..{s.mb_s_max:.0f}"] for s in st.stages
    ]
    rows.append(
        ["pipeline bound", "1 / sum(1 / MB/s), read..seal", f"{st.pipeline_bound_mb_s:.1f}", ""]
    )
    return [
        "",
        f"Stages (one thread each, {st.sample_bytes / 1e6:.1f} MB mapped, {st.chunks} chunks):",
        _table(["stage", "what", "MB/s", "min..max"], rows, left=2),
        f"bench process peak RSS {_mib(st.peak_rss_bytes)} MiB (maps the sample)",
    ]


def _tool_lines(report: BenchReport) -> list[str]:
    steps = [s for s in STEPS if any(t.step(s) for t in report.tools)]
    header = [
        "tool",
        "compression",
        *steps,
        "restore+fsync",
        "repo MB",
        "incr MB",
        "peak RSS MiB " + "/".join(STEP_LETTERS[s] for s in steps),
    ]
    rows: list[list[str]] = []
    for t in report.tools:
        if t.status != "ok":
            rows.append([t.name, f"{t.status}: {t.reason}".splitlines()[0]])
            continue

        def cell(step: str, t: ToolReport = t) -> str:
            s = t.step(step)
            return f"{s.mb_s:.1f}" + ("*" if s.metadata_skip else "") if s else "-"

        new, incr, rest = t.step("new"), t.step("incr"), t.step("restore")
        rows.append(
            [
                t.name,
                t.compression,
                *(cell(s) for s in steps),
                f"{rest.durable_mb_s:.1f}" if rest and rest.durable_mb_s else "-",
                _mb(new.repo_bytes if new else None),
                _mb(incr.repo_growth if incr else None),
                "/".join(_mib(s.peak_rss_bytes) if (s := t.step(k)) else "-" for k in steps),
            ]
        )
    out = [
        "",
        "End to end (MB/s of input, wall clock, each step its own process; repo MB after",
        "new; incr MB: what the incremental added):",
        _table(header, rows, left=2),
    ]
    ran = [t for t in report.tools if t.status == "ok"]
    if any(s.metadata_skip for t in ran for s in t.steps):
        out.append(
            "* the tool skipped reading the unchanged file (parent snapshot / files cache "
            "metadata): not a read speed"
        )
    noisy = [
        f"{t.name} {s.step} {s.mb_s_min:.0f}..{s.mb_s_max:.0f}"
        for t in ran
        for s in t.steps
        if len(s.runs) > 1 and s.mb_s_max - s.mb_s_min > 0.25 * s.mb_s
    ]
    if noisy:
        out.append("spread > 25% of the median (MB/s min..max): " + "; ".join(noisy))
    # Where the time goes: cores busy (CPU s / wall s), and the tool's own time.
    cpu_rows = []
    for t in ran:
        cells = [t.name]
        for step in steps:
            s = t.step(step)
            if s is None:
                cells.append("-")
                continue
            own = f" ({s.input_bytes / s.tool_mb_s / 1e6:.2f})" if s.tool_mb_s else ""
            cells.append(f"{s.cpu_s:.2f}/{s.wall_s:.2f}{own}")
        cpu_rows.append(cells)
    if cpu_rows:
        out += [
            "",
            "CPU s (user+sys) / wall s, medians; in parentheses the time the tool reports",
            "itself (the rest is start-up, repository open and lock, cache sync, commit):",
            _table(["tool", *steps], cpu_rows),
        ]
    return out


def _ratio_lines(report: BenchReport) -> list[str]:
    cols = list(dict.fromkeys(r.step for r in report.ratios))
    rows = []
    for tool in dict.fromkeys(r.tool for r in report.ratios):
        got = {r.step: r.ratio for r in report.ratios if r.tool == tool}
        rows.append([tool, *(f"{got[c]:.2f}x" if c in got else "-" for c in cols)])
    return [
        "",
        f"{REFERENCE} / other, per run then median (speed > 1: {REFERENCE} faster; RSS and "
        f"bytes < 1: {REFERENCE} smaller):",
        _table(["vs", *cols], rows),
    ]


def format_report(report: BenchReport) -> str:
    """The report as tables for a terminal."""
    d, h = report.data, report.host
    day2 = d.get("day2")
    out = [
        f"dedupe {h['dedupe']} bench: {d['bytes'] / 1e6:.1f} MB ({d['description']})"
        + (f", day 2 {day2['bytes'] / 1e6:.1f} MB" if day2 else ", no day 2 (no incr step)")
        + f"; {report.runs} run(s), {h['cpus']} CPUs, Python {h['python']}",
    ]
    for line in dict.fromkeys(
        f"  {t.version}; chunking: {t.chunking}" for t in report.tools if t.status == "ok"
    ):
        out.append(line)  # once per program, not per variant
    if report.stages is not None:
        out += _stage_lines(report.stages)
    if report.tools:
        out += _tool_lines(report)
    if report.ratios:
        out += _ratio_lines(report)
    out.append("")
    out.extend(f"note: {n}" for n in report.notes)
    return "\n".join(out)
