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
from dedupe import bench
from dedupe.bench import STAGES, STEPS, format_report, generate_data, parse_size, run_bench
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
    restore = tool.step("restore")
    assert restore is not None and all(r.verified for r in restore.runs)
    assert report.ratios == ()
    assert messages  # progress arrived

    d = json.loads(json.dumps(report.to_dict()))
    assert d["tools"][0]["steps"][0]["step"] == "new"
    text = format_report(report)
    assert "pipeline bound" in text and "verify" in text
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
    for name in ("restic", "borg"):
        assert by_name[name].status == "skipped"
        assert by_name[name].reason == "not installed"
    assert report.ratios == ()
    assert "skipped: not installed" in format_report(report)


def test_wrong_restore_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = bench._blake3_file
    source = tmp_path / "src.bin"
    generate_data(source, MiB)

    def lying(path: str | os.PathLike[str]) -> str:
        return real(path) if Path(path) == source else "0" * 64

    monkeypatch.setattr(bench, "_blake3_file", lying)
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


def test_cli_bench_rejects_a_bad_size(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dedupe", "bench", "--size", "lots", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(dedupe.__file__).resolve().parent.parent)},
    )
    assert out.returncode == 2 and "not a size" in out.stderr
