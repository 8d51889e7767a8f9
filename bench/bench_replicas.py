#!/usr/bin/env python3
"""What replicas cost a backup, and how fast a damaged primary is repaired from one.

    .venv/bin/python bench/bench_replicas.py                   # 256 MiB, 3 runs, local
    .venv/bin/python bench/bench_replicas.py --size 1024 --runs 5 --json
    .venv/bin/python bench/bench_replicas.py --s3 moto         # the replica on S3 (moto)

Cases, each a fresh process per run (so peak memory is the case's own), medians in one
run of this script:
- "plain": a full backup of a real SQLite database (../shared/data/gen_snapshot.py when
  it is there, else random data) into a repository with no replica;
- "sync": the same into a repository with one sync replica (the source is read once and
  teed; the replica commits first);
- "async catch-up": `replica sync` of that generation into an empty async replica
  (a verified restore from the primary and a backup into the replica);
- "repair": 5 of the primary's packs deleted, then `replica repair` (verify --read-data,
  the lost chunks stored again from the replica, prune, verify again).
MB/s are of the logical bytes; the ratio column compares each backup with "plain".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

PRIMARY = "bench-replicas primary"
REPLICA = "bench-replicas replica"

CHILD = rf"""
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from dedupe import Repository

async def main(case, primary, replica, source):
    repo = await Repository.open(primary, {PRIMARY!r})
    repo.replicas.passphrase = lambda name: {REPLICA!r}.encode()
    started = time.perf_counter()
    async with repo:
        if case in ("plain", "sync"):
            await repo.backup(source, name="db", kind="full")
        elif case == "catch-up":
            (r,) = await repo.replicas.sync()
            assert r.error is None, r.error
        elif case == "repair":
            report = await repo.replicas.repair()
            assert report.ok, report.unhealed
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({{"seconds": seconds, "peak_bytes": peak}}))

asyncio.run(main(*sys.argv[2:6]))
"""


def make_source(path: Path, size_mib: int) -> None:
    """A real SQLite database of `size_mib` MiB from ../shared/data/gen_snapshot.py when it
    is there, else random bytes."""
    gen = REPO_ROOT.parent / "shared" / "data" / "gen_snapshot.py"
    if gen.exists():
        cmd = [sys.executable, str(gen), "sqlite", "--size", f"{size_mib}MiB", "--quiet"]
        subprocess.run([*cmd, str(path)], check=True)
        return
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))


def init(location: str, passphrase: str) -> None:
    code = (
        "import asyncio, sys; sys.path.insert(0, sys.argv[1])\n"
        "from dedupe import Repository\n"
        "async def m():\n"
        "    r = await Repository.init(sys.argv[2], sys.argv[3])\n"
        "    await r.close()\n"
        "asyncio.run(m())"
    )
    subprocess.run([sys.executable, "-c", code, str(REPO_ROOT), location, passphrase], check=True)


def add_replica(primary: str, replica: str, mode: str) -> None:
    code = (
        "import asyncio, sys; sys.path.insert(0, sys.argv[1])\n"
        "from dedupe import Repository\n"
        "async def m():\n"
        "    async with await Repository.open(sys.argv[2], sys.argv[4]) as r:\n"
        "        await r.replicas.add(sys.argv[3], name='dr', mode=sys.argv[5],"
        " passphrase=sys.argv[6])\n"
        "asyncio.run(m())"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT), primary, replica, PRIMARY, mode, REPLICA],
        check=True,
    )


def run_case(case: str, primary: str, replica: str, source: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO_ROOT), case, primary, replica, source],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def delete_packs(primary: Path, count: int) -> None:
    packs = sorted(p for p in (primary / "packs").rglob("*") if p.is_file())
    for p in packs[1 : 1 + count]:
        p.unlink()


def replica_location(where: str, tmp: Path, name: str) -> str:
    if where == "local":
        return str(tmp / name)
    import uuid

    return f"s3://{os.environ['DEDUPE_BENCH_BUCKET']}/{name}-{uuid.uuid4().hex[:8]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="MiB of source (default 256)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--s3", choices=["moto"], help="put the replica on S3 (moto on loopback)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("DEDUPE_STATE_DIR", str(tmp / "state"))
        os.environ.setdefault("DEDUPE_CACHE_DIR", str(tmp / "cache"))
        server = None
        if args.s3:
            server = start_moto(tmp)
        try:
            source = tmp / "snapshot.db"
            make_source(source, args.size)
            size = source.stat().st_size
            for run in range(args.runs):
                base = tmp / f"run{run}"
                base.mkdir()
                plain = str(base / "plain")
                init(plain, PRIMARY)
                results.setdefault("plain", []).append(run_case("plain", plain, "", str(source)))
                primary = base / "primary"
                replica = replica_location(args.s3 and "s3" or "local", base, "sync-replica")
                init(str(primary), PRIMARY)
                init(replica, REPLICA)
                add_replica(str(primary), replica, "sync")
                results.setdefault("sync", []).append(
                    run_case("sync", str(primary), replica, str(source))
                )
                late = replica_location(args.s3 and "s3" or "local", base, "late-replica")
                catchup = base / "catchup"
                init(str(catchup), PRIMARY)
                run_case("plain", str(catchup), "", str(source))
                init(late, REPLICA)
                add_replica(str(catchup), late, "async")
                results.setdefault("async catch-up", []).append(
                    run_case("catch-up", str(catchup), late, str(source))
                )
                delete_packs(catchup, 5)
                results.setdefault("repair (5 packs lost)", []).append(
                    run_case("repair", str(catchup), late, str(source))
                )
                shutil.rmtree(base, ignore_errors=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
    plain_s = statistics.median(r["seconds"] for r in results["plain"])
    rows = []
    for case, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rows.append(
            {
                "case": case,
                "seconds": round(seconds, 3),
                "mb_per_s": round(size / seconds / 1e6, 1),
                "vs_plain": round(seconds / plain_s, 2),
                "peak_mib": round(statistics.median(r["peak_bytes"] for r in runs) / 2**20, 1),
                "runs": len(runs),
            }
        )
    if args.json:
        print(json.dumps({"source_bytes": size, "replica": args.s3 or "local", "rows": rows}))
        return
    print(f"{size / 2**20:.1f} MiB source, replica: {args.s3 or 'local'}, medians of {args.runs}")
    print(f"{'case':<24}{'s':>9}{'MB/s':>9}{'x plain':>9}{'peak MiB':>10}")
    for r in rows:
        print(
            f"{r['case']:<24}{r['seconds']:>9.2f}{r['mb_per_s']:>9.1f}{r['vs_plain']:>9.2f}"
            f"{r['peak_mib']:>10.1f}"
        )


def start_moto(tmp: Path) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "s3server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert server.stdout is not None
    port = server.stdout.readline().split()[1]
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        DEDUPE_BENCH_BUCKET="bench-replicas",
    )
    import asyncio

    from aiobotocore.session import get_session

    async def create() -> None:
        async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
            await s3.create_bucket(Bucket="bench-replicas")

    asyncio.run(create())
    return server


if __name__ == "__main__":
    main()
