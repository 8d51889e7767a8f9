"""Interrupt trials: stop a backup with SIGINT or SIGTERM at a random point, run it again,
and measure what the stop cost.

For each trial: a fresh repository, `dedupe backup SOURCE` stopped by the signal after a
random delay (drawn between the first pack on disk and the expected end of the backup),
then the same backup again. Reported per trial: the exit code of the stopped run, what it
had stored, what the second run stored, and their sum against one uninterrupted backup
("waste": the sum over the fresh backup, minus one); then whether `verify --read-data`
passed and whether a lock was left. Uses the `dedupe` next to this interpreter, or
`python -m dedupe` from the checkout.

    python bench/interrupt_trials.py --size 1GiB --trials 6 --workdir /tmp/trials
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def size_arg(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def dedupe(*args: str, env: dict[str, str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "dedupe", *args], env=env, capture_output=True, **kw
    )  # type: ignore[call-overload,no-any-return]


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=size_arg, default=size_arg("1GiB"))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dedupe-interrupt-trials"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = work / "source.bin"
    with source.open("wb") as f:
        left = args.size
        while left:
            n = min(left, 1 << 24)
            f.write(rng.randbytes(n))
            left -= n
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    base["DEDUPE_PASSWORD"] = "trials"
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def fresh_repo(name: str) -> dict[str, str]:
        env = dict(base, DEDUPE_REPO=str(work / name))
        dedupe("init", "--kdf-memlimit", "8", "--kdf-opslimit", "1", env=env, check=True)
        return env

    env = fresh_repo("fresh")
    t0 = time.monotonic()
    whole = json.loads(
        dedupe("backup", str(source), "--name", "db", "--json", env=env, check=True).stdout
    )
    seconds = time.monotonic() - t0
    fresh = whole["bytes_stored"]
    shutil.rmtree(work / "fresh")

    rows = []
    for trial in range(args.trials):
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        env = fresh_repo(f"trial-{trial}")
        repo = Path(env["DEDUPE_REPO"])
        proc = subprocess.Popen(
            [sys.executable, "-m", "dedupe", "backup", str(source), "--name", "db"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            restore_signals=True,
        )
        while not any((repo / "packs").rglob("*")) and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.9 * seconds))
        proc.send_signal(sig)
        _, err = proc.communicate()
        first = disk_bytes(repo / "packs") if (repo / "packs").exists() else 0
        again = json.loads(
            dedupe("backup", str(source), "--name", "db", "--json", env=env, check=True).stdout
        )
        verify = dedupe("verify", "--read-data", env=env)
        rows.append(
            {
                "signal": sig.name,
                "exit": proc.returncode,
                "stored_before_stop": first,
                "stored_again": again["bytes_stored"],
                "waste": round((first + again["bytes_stored"]) / fresh - 1, 4),
                "verify_ok": verify.returncode == 0,
                "locks_left": len(list((repo / "locks").iterdir())),
                "said": err.decode().strip().splitlines()[:1],
            }
        )
        shutil.rmtree(repo)
    if args.json:
        print(json.dumps({"size": args.size, "fresh_stored": fresh, "trials": rows}, indent=2))
        return
    print(
        f"{args.size / 2**30:.2f} GiB source; "
        f"one uninterrupted backup stores {fresh / 2**20:.1f} MiB"
    )
    print(
        f"{'signal':8} {'exit':>4} {'stored, stopped':>16} {'stored, again':>14} "
        f"{'waste':>7}  verify  locks"
    )
    for r in rows:
        print(
            f"{r['signal']:8} {r['exit']:>4} {r['stored_before_stop'] / 2**20:>12.1f} MiB "
            f"{r['stored_again'] / 2**20:>10.1f} MiB {r['waste']:>7.2%}  "
            f"{'ok' if r['verify_ok'] else 'FAILED':6}  {r['locks_left']}"
        )


if __name__ == "__main__":
    main()
