#!/usr/bin/env python3
"""A PostgreSQL database of a few hundred MB, dumped on two days about 1% apart, backed up
by dedupe, restic and BorgBackup (bench_e2e.py on the same two dumps, in one run), once
as `pg_dump -Fc -Z0` (what `dedupe backup pg:DB` runs) and once as `pg_dump -Fc` with its
default compression, to show what compression does to deduplication; with --physical also
as `pg_basebackup -Ft -X fetch` tars of the cluster (what `dedupe backup pgbase:` runs).

    .venv/bin/python bench/bench_postgres.py                 # ~300 MB, 3 runs
    .venv/bin/python bench/bench_postgres.py --rows 400000 --runs 1
    .venv/bin/python bench/bench_postgres.py --physical --rows 1500000

Day 1 is VACUUM (FREEZE)'d and checkpointed before it is copied, as a database that has
been running a while is: the first scan after a bulk load sets hint bits on every page,
which would make day 2 of a physical copy a new copy of everything.

The server is a throwaway one on 127.0.0.1 (tests/pgserver.py: initdb in a temporary
directory; as the postgres user under root). Day 2: the newest ~0.5% of the orders
amended, a block of old ones deleted, 0.5% new ones, a few customers moved.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

SCHEMA = """
create table customers (id serial primary key, name text not null, city text);
create table orders (
    id bigserial primary key, customer int not null, amount numeric(12, 2) not null,
    created timestamptz not null, note text
);
insert into customers (name, city)
    select 'customer ' || g, (array['Oslo','Lyon','Porto','Graz'])[1 + g % 4]
    from generate_series(1, 20000) g;
insert into orders (customer, amount, created, note)
    select 1 + g % 20000, (g % 997) * 1.25, timestamp '2026-01-01' + g * interval '7 seconds',
           md5(g::text) || ' ' || repeat('item ' || (g % 113), 8)
    from generate_series(1, {rows}) g;
"""

DAY2 = """
update orders set amount = amount + 1, note = note || ' (amended)'
    where id > {rows} - {rows} / 200;
delete from orders where id between {rows} / 3 and {rows} / 3 + {rows} / 1000;
insert into orders (customer, amount, created, note)
    select 1 + g % 20000, g * 0.5, timestamp '2026-12-01' + g * interval '3 seconds',
           md5((g + {rows})::text) || ' new'
    from generate_series(1, {rows} / 200) g;
update customers set city = 'Bergen' where id % 1000 = 7;
"""


def psql(sql: str) -> None:
    subprocess.run(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True)


def dump(path: Path, compressed: bool) -> float:
    started = time.perf_counter()
    with open(path, "wb") as out:
        args = ["pg_dump", "-Fc"] + ([] if compressed else ["-Z0"])
        subprocess.run(args, stdout=out, check=True)
    return time.perf_counter() - started


def basebackup(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "wb") as out:
        args = ["pg_basebackup", "-D", "-", "-Ft", "-X", "fetch", "-c", "fast"]
        subprocess.run(args, stdout=out, check=True)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="orders on day 1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tools", default="restic,borg")
    ap.add_argument("--physical", action="store_true", help="also pg_basebackup tars")
    args = ap.parse_args()
    import bench_e2e
    from pgserver import server

    with tempfile.TemporaryDirectory(prefix="bench-postgres-") as tmp_name, server() as env:
        tmp = Path(tmp_name)
        os.environ.update(env)
        psql("create database shop")
        os.environ["PGDATABASE"] = "shop"
        psql(SCHEMA.format(rows=args.rows))
        psql("vacuum (freeze, analyze)")
        psql("checkpoint")
        files: dict[tuple[int, bool | str], Path] = {}
        for day in (1, 2):
            if day == 2:
                psql(DAY2.format(rows=args.rows))
                psql("vacuum")
            if args.physical:
                path = tmp / f"day{day}-base.tar"
                seconds = basebackup(path)
                files[(day, "physical")] = path
                print(
                    f"day {day} pg_basebackup -Ft: {path.stat().st_size / 1e6:.1f} MB "
                    f"in {seconds:.1f} s",
                    file=sys.stderr,
                )
            for compressed in (False, True):
                path = tmp / f"day{day}{'-compressed' if compressed else ''}.dump"
                seconds = dump(path, compressed)
                files[(day, compressed)] = path
                print(
                    f"day {day} pg_dump -Fc{'' if compressed else ' -Z0'}: "
                    f"{path.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s",
                    file=sys.stderr,
                )
        kinds: list[tuple[bool | str, str]] = [
            (False, "pg_dump -Fc -Z0"),
            (True, "pg_dump -Fc (compressed)"),
        ]
        if args.physical:
            kinds.append(("physical", "pg_basebackup -Ft -X fetch"))
        for kind, title in kinds:
            print(f"\n== {title}: day 1 full, day 2 incremental", file=sys.stderr)
            bench_e2e.main(
                [
                    "--input",
                    str(files[(1, kind)]),
                    "--input2",
                    str(files[(2, kind)]),
                    "--runs",
                    str(args.runs),
                    "--tools",
                    args.tools,
                    "--workdir",
                    str(tmp / f"work-{kind}"),
                ]
            )


if __name__ == "__main__":
    main()
