"""The real command driven with generated argument lists (issue 13, point 6): every command
and option of the CLI (read from the click tree itself, so a new option is fuzzed the day
it is added), with values a hurried operator or a broken script might pass.

Whatever the arguments: no Python traceback, an exit code the documentation lists
(docs/API.md: 0, click's usage error 2, or a DedupeError's), and a failure says what
happened on stderr (`dedupe: error: ...` with a hint, or click's `Error: ...` after its
usage line).

Each command runs in a process of its own, forked from a helper interpreter that has
imported the command line and the library (nothing runs before the fork): the child runs
`main()` as `python -m dedupe` does, with the example's arguments, environment, working
directory and stdin (an exception that escapes it is printed and exits 1, as in the
interpreter), then exits as the interpreter does. A fork costs milliseconds where an
interpreter start and its imports cost a tenth of a second, and the examples are many."""

from __future__ import annotations

import inspect
import io
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import ForkHelper, make_repo, warm_for_forks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dedupe.errors
from dedupe.cli import cli

USAGE_EXIT = 2
DOCUMENTED = {0, USAGE_EXIT, 3} | {  # 3: a partial backup
    cls.exit_code
    for _, cls in inspect.getmembers(dedupe.errors, inspect.isclass)
    if issubclass(cls, dedupe.errors.DedupeError) and cls is not dedupe.errors.DedupeError
}
# Long-running or interactive by design: bench measures for minutes.
SKIP = {"bench"}

# Never "/" or a device as a value: as SOURCE it backs up the whole machine, as TARGET
# (with --overwrite) a restore would replace it; the commands run as root in CI.
NASTY = st.sampled_from(
    [
        "",
        "-",
        "--",
        "a/b@c",
        "@",
        "latest",
        "x@latest",
        "db@latest",
        "0",
        "-1",
        "99999999999999999999",
        "1e3",
        "fixed:3",
        "fixed:4096",
        "auto",
        "foo",
        "10%",
        "101%",
        "1/0",
        "0/3",
        "14d",
        "-5d",
        "abc",
        "deadbeef",
        "../escape",
        "/proc/self/status",
        "é ünïcode",
        "x" * 300,
        "s3:https://host/bucket",
    ]
)


def _leaf_commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in sorted(group.commands.items()):
        if name in SKIP:
            continue
        if isinstance(command, click.Group):
            found += _leaf_commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


# Every (command, parameter) pair: each example makes one of them bad and gives the others
# sensible values, so that the bad value is what the command meets, not an earlier error.
PAIRS = [
    (path, command, param)
    for path, command in _leaf_commands(cli)
    for param in command.params
    if isinstance(param, click.Argument)
    or (isinstance(param, click.Option) and not param.is_flag and param.name != "help")
]

# Sensible values by parameter name ("{repo}" and "{source}" are filled in per run).
GOOD = {
    "repo": "{repo}",
    "source": "{source}",
    "name": "db",
    "generation": "db@latest",
    "target": "-",
    "kind": "incremental",
    "chunker": "fastcdc",
    "key_ref": "default",
    "role": "writer",
}


def _value(param: click.Parameter, repo: Path, source: Path) -> str:
    return GOOD.get(param.name or "", "1").format(repo=repo, source=source)


@st.composite
def invocations(draw: st.DrawFn) -> tuple[tuple[str, ...], click.Command, click.Parameter, str]:
    path, command, bad = draw(st.sampled_from(PAIRS))
    return path, command, bad, draw(NASTY)


def _arguments(
    path: tuple[str, ...],
    command: click.Command,
    bad: click.Parameter,
    value: str,
    repo: Path,
    source: Path,
) -> list[str]:
    args = list(path)
    for param in command.params:
        if param is bad:
            given = value
        elif param.required or (isinstance(param, click.Argument)):
            given = _value(param, repo, source)
        else:
            continue
        if isinstance(param, click.Option):
            args.append(param.opts[-1])
        args.append(given)
    return args


# --- the commands, forked ------------------------------------------------------------------

CHILD_TIMEOUT = 600  # seconds, as conftest's dedupe_cli


def _main(request: dict[str, Any]) -> int:
    """In a forked child: `dedupe.cli.main()` with the request's arguments, environment,
    working directory, stdin, stdout and stderr; its exit code, as the interpreter would
    give it."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    read, write = os.pipe()  # stdin: a pipe holding the input, then its end
    os.write(write, request["input"].encode("latin-1"))
    os.close(write)
    os.dup2(read, 0)
    os.close(read)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, fd)
        os.close(out)
    sys.stdin = open(0, closefd=False)  # not the helper's stdin, nor what it buffered
    sys.argv = ["dedupe", *request["args"]]
    signal.alarm(CHILD_TIMEOUT)
    from dedupe.cli import main

    try:
        main()
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1


def serve() -> None:
    """The helper's loop: one JSON request a line on stdin, each run in a forked child;
    the answer is the child's exit code (negative: killed by that signal)."""
    # Imported once, before any fork: the command line and what its commands import when
    # they run (a tenth of a second a child); what the helper holds is frozen (a child's
    # collections, and its exit, skip it).
    warm_for_forks()

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                code = _main(request)
            except BaseException:
                traceback.print_exc()
                code = 1
            # The interpreter's own exit, as after `python -m dedupe`: threads joined,
            # atexit handlers run, objects finalized (what goes wrong there is printed too).
            raise SystemExit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
        sys.stdout.flush()


class Helper(ForkHelper):
    """The helper interpreter (see `serve`), a child per command."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(__file__, workdir)
        self.workdir = workdir
        self.n = 0

    def run(
        self, *args: str, env: dict[str, str], cwd: Path, input: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        """What conftest's dedupe_cli gives, from a forked child."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        request = {
            "args": list(args),
            "env": env,
            "cwd": str(cwd),
            "input": input.decode("latin-1"),
            "stdout": str(out),
            "stderr": str(err),
        }
        rc = self.request(**request)
        done = subprocess.CompletedProcess(list(args), rc, out.read_bytes(), err.read_bytes())
        out.unlink()
        err.unlink()
        return done


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helper]:
    helper = Helper(tmp_path_factory.mktemp("fuzz-helper"))
    yield helper
    helper.close()


# --- the test ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import asyncio

    path = tmp_path_factory.mktemp("fuzz") / "repo"

    async def make() -> None:
        async with await make_repo(path) as repo:
            await repo.backup(io.BytesIO(b"a small database" * 1000), name="db")

    asyncio.run(make())
    return path


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,  # the same lists in every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=invocations())
def test_no_argument_list_gives_a_traceback(
    case: tuple[tuple[str, ...], click.Command, click.Parameter, str],
    repository: Path,
    cli_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    forked: Helper,
) -> None:
    cwd = tmp_path_factory.mktemp("cwd")
    source = cwd / "orders.db"
    source.write_bytes(b"orders" * 5000)
    args = _arguments(*case, repo=repository, source=source)
    env = dict(cli_env, DEDUPE_REPO=str(repository))
    proc = forked.run(*args, env=env, cwd=cwd, input=b"")
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, (args, err)
    assert proc.returncode in DOCUMENTED, (args, proc.returncode, err)
    if proc.returncode == USAGE_EXIT:
        assert "Error: " in err, (args, err)
    elif proc.returncode != 0:
        said = ("dedupe: error: ", '"error": ', "dedupe: interrupted")  # --json: a JSON error
        assert any(s in err for s in said), (args, err)
