#!/usr/bin/env python3
"""End-to-end throughput of dedupe against restic and BorgBackup, on a SQLite database and
one day of traffic on it. The harness is `dedupe bench`'s (dedupe/bench/: what each step
measures and the fairness rules are in its docstrings); this script adds the data.

    .venv/bin/python bench/bench_e2e.py                          # 256 MiB SQLite pair, 3 runs
    .venv/bin/python bench/bench_e2e.py --size 64MiB --runs 1    # quick look
    .venv/bin/python bench/bench_e2e.py --size 1GiB --json > e2e.json
    .venv/bin/python bench/bench_e2e.py --tools borg --input my.db --input2 my-next-day.db

Which dedupe: this checkout when its native modules are built in place (`python setup.py
build_ext --inplace`), else the package installed for the interpreter that runs this
script (`pip install .`); the report names the one it ran. Data: by default a deterministic
SQLite "chat" database made by ``../shared/data/gen_snapshot.py`` (seed 1) and one day of
traffic on it (``mutate --seed 2``), cached under the work directory (default
``$TMPDIR/dedupe-bench-e2e``), never inside the repository.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GEN = REPO_ROOT.parent / "shared" / "data" / "gen_snapshot.py"


def _checkout_is_built() -> bool:
    native = REPO_ROOT / "dedupe" / "chunking"
    return any(
        (native / f"_fastcdc{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


if _checkout_is_built():
    sys.path.insert(0, str(REPO_ROOT))
try:
    from dedupe.bench import FAMILIES, VARIANTS, format_report, parse_size, run_bench
    from dedupe.errors import DedupeError
except ImportError as e:
    sys.exit(
        f"bench_e2e: dedupe cannot be imported ({e}): run this script with the interpreter "
        "dedupe is installed for (.venv/bin/python after `make venv`, or `pip install .`), "
        "or build this checkout in place (python setup.py build_ext --inplace)"
    )


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def size_arg(text: str) -> str:
    """argparse type: check a size now, keep its text for gen_snapshot.py."""
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def tools_arg(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in FAMILIES and n not in VARIANTS]
    if unknown:
        choices = ", ".join(dict.fromkeys([*FAMILIES, *VARIANTS]))
        raise argparse.ArgumentTypeError(f"unknown tool {unknown[0]!r}; choose from {choices}")
    return names


def make_dataset(workdir: Path, size_text: str, gen: Path) -> tuple[Path, Path]:
    """Generate (or reuse) day1.db / day2.db of this size under ``workdir/data``: written
    under a temporary name and renamed when complete, so an interrupted generation is never
    mistaken for a cached one."""
    if not gen.is_file():
        sys.exit(f"bench_e2e: gen_snapshot.py not found at {gen} (use --gen-snapshot PATH)")
    ddir = workdir / "data" / f"sqlite-{parse_size(size_text)}-seed1"
    ddir.mkdir(parents=True, exist_ok=True)
    day1, day2 = ddir / "day1.db", ddir / "day2.db"
    steps = [
        (day1, ["sqlite", "--size", size_text, "--seed", "1", "--quiet"]),
        (day2, ["mutate", "--seed", "2", str(day1)]),
    ]
    for path, args in steps:
        if path.exists():
            continue
        log(f"generating {path} ...")
        tmp = path.with_name(path.name + ".partial")
        tmp.unlink(missing_ok=True)  # left by an interrupted run: never build on it
        # stdout to stderr: stdout is for the table or the JSON object.
        subprocess.run([sys.executable, str(gen), *args, str(tmp)], check=True, stdout=sys.stderr)
        os.replace(tmp, path)
        if path == day1:
            day2.unlink(missing_ok=True)  # day 2 derives from day 1
    return day1, day2


def start_moto() -> tuple[str, subprocess.Popen[str]]:
    """moto's S3 API server on 127.0.0.1 (the one the tests use), this process's AWS
    environment pointed at it, and a bucket: returns the location and the server."""
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "s3server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # a log line per request
        text=True,
    )
    assert server.stdout is not None
    first = server.stdout.readline().split()
    if first[:1] != ["port"]:
        sys.exit("bench_e2e: moto's S3 API server did not start (pip install 'moto[server]')")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{first[1]}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )

    async def bucket() -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client("s3") as s3:
            await s3.create_bucket(Bucket="dedupe-bench")

    asyncio.run(bucket())
    return "s3://dedupe-bench/e2e", server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="End-to-end backup and restore throughput: dedupe vs restic vs borg.",
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
        help="data cache, repositories and tool caches (keep it off the repository)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the report as JSON on stdout; table on stderr"
    )
    p.add_argument(
        "--tools",
        type=tools_arg,
        default=tools_arg("restic,borg"),
        help="beside dedupe: families (restic, borg) or variants "
        f"({', '.join(v for v in VARIANTS if v != 'dedupe')}); '' for dedupe alone",
    )
    p.add_argument("--input", type=Path, help="back up this file instead of generated day 1")
    p.add_argument(
        "--input2", type=Path, help="with --input: the next day's version of it (else no incr)"
    )
    p.add_argument("--gen-snapshot", type=Path, default=DEFAULT_GEN, help="path of gen_snapshot.py")
    p.add_argument("--keep", action="store_true", help="keep the last run's repositories")
    p.add_argument(
        "--s3",
        metavar="s3://BUCKET/PREFIX|moto",
        help="also run dedupe with its repository in an object store: an existing bucket "
        "(endpoint and credentials from the AWS environment), or 'moto' to start moto's "
        "S3 API server on 127.0.0.1 (in-memory and single-process: it bounds the figures)",
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    workdir: Path = args.workdir.resolve()
    if workdir == REPO_ROOT or REPO_ROOT in workdir.parents:
        p.error(f"--workdir {workdir} is inside the repository; put it elsewhere")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.input:
        day1, day2 = args.input, args.input2
    elif args.input2:
        p.error("--input2 needs --input")
    else:
        day1, day2 = make_dataset(workdir, args.size, args.gen_snapshot)
    s3, server = args.s3, None
    if s3 == "moto":
        s3, server = start_moto()
    try:
        report = asyncio.run(
            run_bench(
                data=day1,
                data2=day2,
                runs=args.runs,
                workdir=workdir,
                tools=args.tools,
                s3=s3,
                stages=False,
                keep=args.keep,
                progress=log,
            )
        )
    except ValueError as e:
        p.error(str(e))
    except DedupeError as e:  # a dedupe command failed, or restored wrong bytes
        log(f"bench_e2e: {e}")
        return 1
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
    table = format_report(report)
    if args.json:
        log(table)
        json.dump(report.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)
    return 0 if all(t.status != "failed" for t in report.tools) else 1


if __name__ == "__main__":
    sys.exit(main())
