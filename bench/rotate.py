#!/usr/bin/env python3
"""Key rotation on a large repository: how long `dedupe key rotate` takes, that it leaves
every pack byte-identical, and that every generation restores byte for byte afterwards.

    python3 bench/rotate.py --size 10GiB --workdir /big/disk/rotate
    python3 bench/rotate.py --size 1GiB          # a quick look

1. Back up `--size` bytes of incompressible data (BLAKE3 keystream, so nothing dedupes and
   the packs hold the whole size) as two full generations of half the size each, with the
   default 16 MiB packs, through the API.
2. Hash every pack file (BLAKE3) and list every generation id.
3. Run `dedupe key rotate --json` as the operator would (its own process), timed with its
   peak RSS (dedupe.bench.measure_command).
4. Hash every pack file again and compare; compare the generation ids.
5. Back up a third, small generation under the new epoch; restore all three to a hash
   (no restored copy is written to disk) and compare with the source's hash.

Nothing is asserted: the script reports, as JSON with --json. `--reencrypt` times `key
rotate --reencrypt` in step 3 instead (which rewrites every pack: it reads and writes the
whole repository). The repository and the measurements stay in --workdir unless --clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import blake3

import dedupe
from dedupe import Repository
from dedupe.bench import measure_command, parse_size
from dedupe.crypto import KdfParams

MiB = 1 << 20
BLOCK = 4 * MiB
PASSPHRASE = "dedupe-rotate-throwaway"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def keystream(seed: bytes, size: int) -> AsyncIterator[bytes]:
    """`size` bytes of BLAKE3 output keyed by `seed`: incompressible and reproducible."""
    xof = blake3.blake3(seed)
    pos = 0
    while pos < size:
        n = min(BLOCK, size - pos)
        yield xof.digest(length=n, seek=pos)
        pos += n


def stream_hash(seed: bytes, size: int) -> str:
    h = blake3.blake3()
    xof = blake3.blake3(seed)
    for pos in range(0, size, BLOCK):
        h.update(xof.digest(length=min(BLOCK, size - pos), seek=pos))
    return str(h.hexdigest())


def hash_packs(repo: Path) -> dict[str, str]:
    out = {}
    for p in sorted((repo / "packs").rglob("*")):
        if p.is_file():
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with open(p, "rb") as f:
                while chunk := f.read(16 * MiB):
                    h.update(chunk)
            out[str(p.relative_to(repo))] = str(h.hexdigest())
    return out


async def restore_hash(repo: Repository, gen_id: str) -> str:
    h = blake3.blake3()
    async for part in repo.restore_stream(gen_id):
        h.update(part)
    return str(h.hexdigest())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dedupe-rotate-"))
    work.mkdir(parents=True, exist_ok=True)
    repo_path = work / "repo"
    if repo_path.exists():
        shutil.rmtree(repo_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(
        DEDUPE_REPO=str(repo_path),
        DEDUPE_PASSWORD=PASSPHRASE,
        DEDUPE_STATE_DIR=str(work / "state"),
        PYTHONPATH=str(Path(dedupe.__file__).resolve().parent.parent),
    )
    os.environ["DEDUPE_STATE_DIR"] = env["DEDUPE_STATE_DIR"]
    sources = {b"gen-a": size // 2, b"gen-b": size - size // 2}
    ids: dict[bytes, str] = {}
    t0 = time.monotonic()
    repo = await Repository.init(repo_path, PASSPHRASE, kdf=KdfParams.weakest())
    async with repo:
        for seed, n in sources.items():
            log(f"backing up {n / MiB:,.0f} MiB as {seed.decode()}")
            ids[seed] = (await repo.backup(keystream(seed, n), name=seed.decode())).id
    log(f"  {time.monotonic() - t0:.0f} s")
    log("hashing every pack")
    before = hash_packs(repo_path)
    pack_bytes = sum(p.stat().st_size for p in (repo_path / "packs").rglob("*") if p.is_file())
    gens_before = sorted(os.listdir(repo_path / "generations"))
    argv = [sys.executable, "-m", "dedupe", "key", "rotate", "--json"]
    if args.reencrypt:
        argv.insert(-1, "--reencrypt")
    log(f"running {' '.join(argv[2:])} on {len(before)} packs ({pack_bytes / MiB:,.0f} MiB)")
    measured = await measure_command(argv, env=env, cwd=work, scratch=work)
    if measured.rc != 0:
        raise SystemExit(measured.failure())
    report = json.loads(measured.stdout)
    log(f"  {measured.wall_s:.2f} s, peak RSS {measured.maxrss_bytes / MiB:.0f} MiB")
    after = hash_packs(repo_path)
    gens_after = sorted(os.listdir(repo_path / "generations"))
    small = b"gen-c"
    sources[small] = 64 * MiB
    restored: dict[str, bool] = {}
    async with await Repository.open(repo_path, PASSPHRASE) as repo:
        ids[small] = (await repo.backup(keystream(small, sources[small]), name="gen-c")).id
        for seed, n in sources.items():
            log(f"restoring {seed.decode()} to a hash")
            restored[seed.decode()] = await restore_hash(repo, ids[seed]) == stream_hash(seed, n)
        status = (await repo.keys.status()).to_dict()
    result = {
        "size": size,
        "packs": len(before),
        "pack_bytes": pack_bytes,
        "command": " ".join(argv[3:]),
        "rotate_seconds": round(measured.wall_s, 3),
        "rotate_cpu_seconds": round(measured.user_s + measured.sys_s, 3),
        "rotate_peak_rss_mib": round(measured.maxrss_bytes / MiB, 1),
        "rotate_report": report,
        "packs_identical": before == after if not args.reencrypt else None,
        "packs_unchanged_count": sum(1 for k, v in before.items() if after.get(k) == v),
        "generation_ids_unchanged": gens_before == gens_after,
        "restored_byte_for_byte": restored,
        "epochs": status["epochs"],
        "packs_hash_before": str(blake3.blake3(json.dumps(before).encode()).hexdigest()),
        "packs_hash_after": str(blake3.blake3(json.dumps(after).encode()).hexdigest()),
        "workdir": str(work),
    }
    if args.clean:
        shutil.rmtree(work)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="bytes of packs before the rotation")
    ap.add_argument("--workdir", help="where the repository goes [a tmp dir]")
    ap.add_argument("--reencrypt", action="store_true", help="time key rotate --reencrypt")
    ap.add_argument("--clean", action="store_true", help="remove the workdir at the end")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{result['command']} on {result['packs']} packs "
        f"({result['pack_bytes'] / MiB:,.0f} MiB): {result['rotate_seconds']} s, "
        f"peak RSS {result['rotate_peak_rss_mib']} MiB"
    )
    print(
        f"packs byte-identical: {result['packs_identical']} "
        f"({result['packs_unchanged_count']} of {result['packs']} unchanged; digest of all "
        f"pack hashes before {result['packs_hash_before'][:16]}, "
        f"after {result['packs_hash_after'][:16]})"
    )
    print(f"generation ids unchanged: {result['generation_ids_unchanged']}")
    print(f"restored byte for byte: {result['restored_byte_for_byte']}")


if __name__ == "__main__":
    main()
