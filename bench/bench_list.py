#!/usr/bin/env python3
"""How long listing a repository of many generations takes, with and without the local
object cache (docs/FORMAT.md 3.1), on a local directory and on S3.

    .venv/bin/python bench/bench_list.py                        # 10,000 generations, local
    .venv/bin/python bench/bench_list.py --s3 moto              # ... and S3 (moto on loopback)
    .venv/bin/python bench/bench_list.py --generations 2000 --runs 5 --json

The repository: one real backup (1 MiB of random data), then N-1 more generations of the
same data under ten names, each committed through the store as a backup commits (a key
map, then the manifest), so that the repository holds N manifests and N key maps and
every generation restores. Each measurement is a fresh process that opens the repository
(default key derivation) and lists every generation through the API; it reports the open
and the listing apart, and `dedupe generations --json` is timed whole as a user sees it.
Cases: "no cache", "cold" (an empty cache directory: the listing fills it) and "warm"
(the same directory again). Medians of --runs, in one run of this script.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PASSPHRASE = "bench-list"


async def build(location: str, generations: int) -> None:
    from dedupe import Repository

    async with await Repository.init(location, PASSPHRASE, cache=False) as repo:
        first = await repo.backup(io.BytesIO(os.urandom(1 << 20)), name="db0", kind="full")
        store = repo._store
        header, meta, table = await store.read_manifest(first.id)
        header = {k: v for k, v in header.items() if k not in ("id", "version", "body")}
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            copy = dict(header, name=f"db{i % 10}", created=f"{header['created']}.{i:06d}")
            async with sem:
                await store.write_manifest(copy, meta, table)

        await asyncio.gather(*(one(i) for i in range(1, generations)))


def counting(backend: Any) -> Any:
    """`backend` with its requests counted (in `backend.requests`): every call of a
    reading or listing method."""
    backend.requests = 0
    for method in ("get", "get_small", "stat", "list", "list_sized", "exists"):
        original = getattr(backend, method)

        async def call(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            backend.requests += 1
            return await _original(*args, **kwargs)

        setattr(backend, method, call)
    return backend


async def measure(location: str, cache: str | None) -> dict[str, float | int]:
    from dedupe import Repository
    from dedupe.backends import open_backend

    started = time.perf_counter()
    backend = counting(open_backend(location))
    repo = await Repository.open(backend, PASSPHRASE, cache=cache or False)
    opened = time.perf_counter()
    async with repo:
        gens = await repo.generations()
    listed = time.perf_counter()
    return {
        "generations": len(gens),
        "open_s": opened - started,
        "list_s": listed - opened,
        "requests": backend.requests,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(location: str, cache: str | None, env: dict[str, str]) -> dict[str, float | int]:
    argv = [sys.executable, __file__, "--measure", location] + (["--cache", cache] if cache else [])
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out))


def cli_seconds(location: str, cache: str | None, env: dict[str, str]) -> float:
    args = ["--cache-dir", cache] if cache else ["--no-cache"]
    argv = [sys.executable, "-m", "dedupe", "-r", location, *args, "generations", "--json"]
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def run_cases(location: str, runs: int, work: Path, env: dict[str, str]) -> dict[str, dict]:
    samples: dict[str, list[dict[str, float | int]]] = {"no cache": [], "cold": [], "warm": []}
    for r in range(runs):
        cache = work / f"cache-{r}"
        samples["no cache"].append(
            {**child(location, None, env), "cli_s": cli_seconds(location, None, env)}
        )
        samples["cold"].append(child(location, str(cache), env))
        samples["warm"].append(
            {**child(location, str(cache), env), "cli_s": cli_seconds(location, str(cache), env)}
        )
        shutil.rmtree(cache)
    result = {}
    for case, rows in samples.items():
        keys = rows[0].keys()
        result[case] = {k: statistics.median(float(row[k]) for row in rows) for k in keys}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--s3", metavar="s3://BUCKET/PREFIX|moto", help="also on S3")
    parser.add_argument("--workdir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure", metavar="LOCATION", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(asyncio.run(measure(args.measure, args.cache))))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dedupe-bench-list-"))
    work.mkdir(parents=True, exist_ok=True)
    locations = {"local": str(work / "repo")}
    server = None
    if args.s3 == "moto":
        from bench_e2e import start_moto

        locations["s3"], server = start_moto()  # sets this process's AWS environment
        locations["s3"] = locations["s3"].replace("/e2e", "/list")
    elif args.s3:
        locations["s3"] = args.s3
    env = {**os.environ, "DEDUPE_PASSWORD": PASSPHRASE, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("DEDUPE_CACHE_DIR", None)
    try:
        report: dict[str, object] = {"generations": args.generations, "runs": args.runs}
        for where, location in locations.items():
            started = time.perf_counter()
            asyncio.run(build(location, args.generations))
            print(f"{where}: built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            report[where] = run_cases(location, args.runs, work, env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.generations} generations, medians of {args.runs} runs (seconds)")
    print(
        f"{'where':6} {'case':9} {'open':>7} {'list':>7} {'CLI':>7} {'RSS MiB':>8} {'requests':>9}"
    )
    for where in locations:
        for case, row in report[where].items():  # type: ignore[attr-defined]
            cli = f"{row['cli_s']:7.3f}" if "cli_s" in row else f"{'':>7}"
            print(
                f"{where:6} {case:9} {row['open_s']:7.3f} {row['list_s']:7.3f} {cli} "
                f"{row['peak_rss_mib']:8.1f} {row['requests']:9.0f}"
            )


if __name__ == "__main__":
    main()
