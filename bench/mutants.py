"""Run mutmut's mutants one by one, each in a fresh pytest process.

`mutmut run` forks its own process once per mutant; that process has run the whole test
selection for its coverage statistics and still holds worker threads (the engine's
executors), and a fork of a threaded process can deadlock in the child: on this code the
children hang at 0% CPU until mutmut's timeout, so a run makes almost no progress. This
driver takes the mutants and statistics `mutmut run` generated (in mutants/) and runs
`MUTANT_UNDER_TEST=<mutant> pytest -x <the tests that cover its function>` in a new
process for each, fastest tests first; mutmut's trampolines read that variable. Results
go to a JSON-lines file, one per mutant, and a re-run skips those already there.

    make mutants                    # generates mutants/ and the statistics, then runs this
    python bench/mutants.py dedupe/engine/prune.py --functions x__bad_copies,x__delete_all
    python bench/mutants.py dedupe/engine/prune.py --show x__bad_copies__mutmut_9

A survivor counts only once the broader tests had their chance: pass --tests to add test
files the statistics did not list for a function (e.g. new tests written since).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def mutant_names(source: str, function: str) -> list[str]:
    names = set(re.findall(rf"def ({re.escape(function)}__mutmut_\d+)\(", source))
    return sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))


def functions_in(source: str) -> list[str]:
    return sorted(set(re.findall(r"def (x\w+?)__mutmut_\d+\(", source)))


def body(source: str, name: str) -> list[str]:
    """The lines of function `name`: its signature and every line after it that is blank
    or indented deeper (mutmut keeps a method's mutants indented in their class)."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"(\s*)(async )?def {re.escape(name)}\(", line)
        if m:
            indent = len(m.group(1))
            end = i
            while end < len(lines) - 1 and not lines[end].rstrip().endswith(":"):
                end += 1  # a signature over several lines, up to its colon
            end += 1
            while end < len(lines) and (
                not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
            ):
                end += 1
            return lines[i:end]
    return []


def show(source: str, mutant: str) -> str:
    """The mutant as a diff against the original function."""
    original = mutant.rsplit("__mutmut_", 1)[0] + "__mutmut_orig"
    a = body(source, original)
    b = [line.replace(mutant, original) for line in body(source, mutant)]
    return "\n".join(difflib.unified_diff(a, b, original, mutant, lineterm="", n=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("module", help="a source path under source_paths, e.g. dedupe/engine/prune.py")
    ap.add_argument("--mutants", type=Path, default=Path("mutants"), help="mutmut's directory")
    ap.add_argument("--functions", default="", help="mangled names, comma-separated (default: all)")
    ap.add_argument("--tests", nargs="*", default=[], help="test files to run besides the listed")
    ap.add_argument("--out", type=Path, default=Path("mutants/results.jsonl"))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--show", metavar="MUTANT", help="print one mutant's diff and stop")
    args = ap.parse_args()

    source = (args.mutants / args.module).read_text()
    if args.show:
        print(show(source, args.show))
        return
    stats = json.loads((args.mutants / "mutmut-stats.json").read_text())
    tests_by, duration = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    module = args.module.removesuffix(".py").replace("/", ".")
    done = set()
    if args.out.exists():
        done = {json.loads(line)["mutant"] for line in args.out.read_text().splitlines()}
    functions = args.functions.split(",") if args.functions else functions_in(source)
    env = dict(os.environ, PYTHONPATH=str(args.mutants.resolve()), PYTHONSAFEPATH="1")
    for function in functions:
        listed = tests_by.get(f"{module}.{function}", [])
        tests = sorted(listed, key=lambda t: duration.get(t, 0)) + list(args.tests)
        for name in mutant_names(source, function):
            mutant = f"{module}.{name}"
            if mutant in done:
                continue
            started = time.monotonic()
            if not tests:
                status = "no tests"
            else:
                command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
                try:
                    proc = subprocess.run(
                        [*command, "-m", "not slow", *tests],
                        cwd=args.mutants,
                        env=dict(env, MUTANT_UNDER_TEST=mutant),
                        capture_output=True,
                        timeout=args.timeout,
                    )
                    status = {0: "survived", 1: "killed"}.get(
                        proc.returncode, f"exit {proc.returncode}"
                    )
                except subprocess.TimeoutExpired:
                    status = "timeout"
            record = {
                "mutant": mutant,
                "status": status,
                "seconds": round(time.monotonic() - started, 1),
            }
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
