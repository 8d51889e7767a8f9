"""`dedupe bench` and dedupe.bench.run_bench: the report is complete and well formed.

No timings are asserted (the machine is shared): only that every figure is there and
positive, that the restore was checked, and that absent tools are reported as skipped.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dedupe
from dedupe.backends.s3 import S3Backend
from dedupe.bench import (
    DAY2_STEPS,
    PAGE_SIZE,
    STAGES,
    STEPS,
    e2e,
    expand_tools,
    format_report,
    generate_data,
    mutate_data,
    parse_size,
    run_bench,
)
from dedupe.errors import IntegrityError

MiB = 1 << 20


def test_parse_size() -> None:
    assert parse_size("256MiB") == 256 * MiB
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("64m") == 64 * MiB
    assert parse_size("1000") == 1000
    with pytest.raises(ValueError):
        parse_size("lots")


def test_generated_data_is_deterministic_and_exact(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    size = 5 * MiB + 123  # not a whole number of pages or blocks
    generate_data(a, size)
    generate_data(b, size)
    generate_data(c, size, seed=2)
    assert a.stat().st_size == size
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_run_bench_reports_every_stage_and_step(tmp_path: Path) -> None:
    messages: list[str] = []
    report = asyncio.run(
        run_bench(size=8 * MiB, runs=1, workdir=tmp_path, progress=messages.append)
    )
    assert report.data["bytes"] == 8 * MiB and report.data["generated"]
    st = report.stages
    assert st is not None
    assert [s.name for s in st.stages] == list(STAGES)
    assert all(s.mb_s > 0 and len(s.seconds) == 1 for s in st.stages)
    assert st.pipeline_bound_mb_s > 0
    assert st.compression_ratio > 1  # 70% of the pages are text
    assert st.chunks > 0 and st.peak_rss_bytes > 0

    [tool] = report.tools
    assert tool.name == "dedupe" and tool.status == "ok"
    assert [s.step for s in tool.steps] == list(STEPS)
    for s in tool.steps:
        assert s.mb_s > 0 and s.peak_rss_bytes > 0 and s.cpu_s > 0
        assert s.tool_mb_s is not None and s.tool_mb_s > 0
    restore, restore_incr = tool.step("restore"), tool.step("restore-incr")
    assert restore is not None and all(r.verified for r in restore.runs)
    # Day 2's generation is restored too (for dedupe, an incremental), checked against day 2.
    assert restore_incr is not None and all(r.verified for r in restore_incr.runs)
    assert restore_incr.input_bytes == report.data["day2"]["bytes"]
    assert report.ratios == ()
    assert messages  # progress arrived

    incr = tool.step("incr")
    assert incr is not None and incr.input_bytes == report.data["day2"]["bytes"]
    new = tool.step("new")
    assert new is not None and new.repo_bytes is not None
    # The incremental stores what changed, not the file again.
    assert incr.repo_growth is not None and 0 < incr.repo_growth < new.repo_bytes / 4
    d = json.loads(json.dumps(report.to_dict()))
    assert d["tools"][0]["steps"][0]["step"] == "new"
    text = format_report(report)
    assert "pipeline bound" in text and "check" in text and "incr" in text
    assert not (tmp_path / "runs").exists()  # repositories are removed, the data is kept


def test_compare_without_restic_and_borg_skips_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    report = asyncio.run(
        run_bench(size=1 * MiB, runs=1, workdir=tmp_path / "w", compare=True, stages=False)
    )
    assert report.stages is None
    by_name = {t.name: t for t in report.tools}
    assert by_name["dedupe"].status == "ok"
    for name in ("restic-stdin", "restic-file", "borg"):
        assert by_name[name].status == "skipped"
        assert by_name[name].reason == "not installed"
    assert report.ratios == ()
    assert "skipped: not installed" in format_report(report)


def test_wrong_restore_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = e2e.blake3_file
    source = tmp_path / "src.bin"
    generate_data(source, MiB)

    def lying(path: str | os.PathLike[str]) -> str:
        return real(path) if Path(path) == source else "0" * 64

    monkeypatch.setattr(e2e, "blake3_file", lying)
    with pytest.raises(IntegrityError, match="BLAKE3"):
        asyncio.run(run_bench(data=source, runs=1, workdir=tmp_path / "w", stages=False))


def test_cli_bench_json(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DEDUPE_") or k == "DEDUPE_STATE_DIR"
    }
    root = str(Path(dedupe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dedupe",
            "bench",
            "--size",
            "4MiB",
            "--runs",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["data"]["bytes"] == 4 * MiB
    assert [s["name"] for s in report["stages"]["stages"]] == list(STAGES)
    assert [s["step"] for s in report["tools"][0]["steps"]] == list(STEPS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "lots"], "not a size"),
        (["--tools", "restic,tar"], "unknown tool 'tar'"),
        (["--data2", "day2.db"], "needs --data"),
    ],
)
def test_cli_bench_rejects_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dedupe", "bench", *args, "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(dedupe.__file__).resolve().parent.parent)},
    )
    assert out.returncode == 2 and message in out.stderr
    assert not (tmp_path / "runs").exists()


def test_next_day_rewrites_and_appends_pages_deterministically(tmp_path: Path) -> None:
    day1, a, b = tmp_path / "day1", tmp_path / "a", tmp_path / "b"
    generate_data(day1, 4 * MiB)
    mutate_data(day1, a)
    mutate_data(day1, b)
    assert a.read_bytes() == b.read_bytes()
    old, new = day1.read_bytes(), a.read_bytes()
    pages = len(old) // PAGE_SIZE
    assert len(new) == len(old) + int(pages * 0.01) * PAGE_SIZE
    changed = sum(
        old[i : i + PAGE_SIZE] != new[i : i + PAGE_SIZE] for i in range(0, len(old), PAGE_SIZE)
    )
    assert changed == int(pages * 0.05)


def test_given_data_without_a_next_day_has_no_incremental_step(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    generate_data(source, MiB)
    report = asyncio.run(run_bench(data=source, runs=1, workdir=tmp_path / "w", stages=False))
    [tool] = report.tools
    assert [s.step for s in tool.steps] == [s for s in STEPS if s not in DAY2_STEPS]
    assert report.data["day2"] is None
    with pytest.raises(ValueError, match="needs data"):
        asyncio.run(run_bench(data2=source, runs=1, workdir=tmp_path / "w"))


def test_tool_lists() -> None:
    assert expand_tools([]) == ["dedupe"]
    assert expand_tools(["restic", "borg", "restic-file"]) == [
        "dedupe",
        "restic-stdin",
        "restic-file",
        "borg",
    ]
    with pytest.raises(ValueError, match="unknown tool 'tar'"):
        expand_tools(["tar"])


def test_a_newer_release_runs_from_the_program_its_variable_names(tmp_path: Path) -> None:
    """restic-stdin-new and borg-new run $RESTIC_NEW / $BORG_NEW beside the tools on PATH."""
    from dedupe.bench.tools import VARIANTS

    assert expand_tools(["restic-stdin-new", "borg-new"])[1:] == ["restic-stdin-new", "borg-new"]
    new = VARIANTS["restic-stdin-new"]
    assert new.missing({}) == "$RESTIC_NEW is not set"
    assert new.missing({"RESTIC_NEW": str(tmp_path / "nothing")}) == "$RESTIC_NEW is not a program"
    program = tmp_path / "restic-0.18"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    assert new.missing({"RESTIC_NEW": str(program)}) is None
    tool = new(tmp_path / "run", {"RESTIC_NEW": str(program)})
    assert tool.check_argv() == [str(program), "check", "--read-data"]
    assert VARIANTS["borg-new"].missing({}) == "$BORG_NEW is not set"
    # A bare name is looked up on PATH and run by its absolute path (tools run elsewhere).
    by_name = new(tmp_path / "run2", {"RESTIC_NEW": "restic-0.18", "PATH": str(tmp_path)})
    assert by_name.exe == str(program)


def test_a_failing_compared_tool_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tool's failure goes in its row, with its last error line; dedupe's steps
    and the report still come through."""
    fake = tmp_path / "bin" / "borg"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'borg: the repository is on fire' >&2\nexit 2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    report = asyncio.run(
        run_bench(size=MiB, runs=1, workdir=tmp_path / "w", tools=["borg"], stages=False)
    )
    borg = report.tool("borg")
    assert borg is not None and borg.status == "failed"
    assert "the repository is on fire" in borg.reason
    dd = report.tool("dedupe")
    assert dd is not None and dd.status == "ok" and dd.step("restore") is not None
    assert report.ratios == ()


def test_bench_e2e_script_runs_the_shared_harness(tmp_path: Path) -> None:
    """bench/bench_e2e.py is a thin client of dedupe.bench: on given files, dedupe alone,
    it prints the same report (as JSON), from the installed package when the checkout is
    not built in place."""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_e2e.py"
    day1, day2 = tmp_path / "day1", tmp_path / "day2"
    generate_data(day1, MiB)
    mutate_data(day1, day2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    root = str(Path(dedupe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, str(script), "--tools", "", "--runs", "1", "--json",
         "--workdir", str(tmp_path / "w"), "--input", str(day1), "--input2", str(day2)],
        capture_output=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    [tool] = report["tools"]
    assert tool["name"] == "dedupe" and tool["status"] == "ok"
    assert [s["step"] for s in tool["steps"]] == list(STEPS)
    assert report["data"]["bytes"] == MiB and report["stages"] is None
    assert b"End to end" in out.stderr  # the table goes to stderr with --json


def test_dedupe_on_an_object_store_beside_the_local_disk(tmp_path: Path, s3_location: str) -> None:
    """`s3`: the variant dedupe-s3 runs every step with its repository in the object
    store (the tests' S3 API server), reports what it stored there, and removes it."""
    report = asyncio.run(
        run_bench(size=MiB, runs=1, workdir=tmp_path / "w", s3=s3_location, stages=False)
    )
    on_s3 = report.tool("dedupe-s3")
    assert on_s3 is not None and on_s3.status == "ok", on_s3
    assert [s.step for s in on_s3.steps] == list(STEPS)
    restore, new = on_s3.step("restore"), on_s3.step("new")
    assert restore is not None and all(r.verified for r in restore.runs)
    assert new is not None and new.repo_bytes and new.repo_bytes > MiB / 2
    assert {r.tool for r in report.ratios} == {"dedupe-s3"}

    async def left() -> list[str]:
        backend = S3Backend(s3_location)
        try:
            return await backend.list("")
        finally:
            await backend.close()

    assert asyncio.run(left()) == []
