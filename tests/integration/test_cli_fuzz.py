"""The real command driven with generated argument lists (issue 13, point 6): every command
and option of the CLI (read from the click tree itself, so a new option is fuzzed the day
it is added), with values a hurried operator or a broken script might pass.

Whatever the arguments: no Python traceback, an exit code the documentation lists
(docs/API.md: 0, click's usage error 2, or a DedupeError's), and a failure says what
happened on stderr (`dedupe: error: ...` with a hint, or click's `Error: ...` after its
usage line)."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import click
import pytest
from conftest import dedupe_cli, make_repo
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
) -> None:
    cwd = tmp_path_factory.mktemp("cwd")
    source = cwd / "orders.db"
    source.write_bytes(b"orders" * 5000)
    args = _arguments(*case, repo=repository, source=source)
    env = dict(cli_env, DEDUPE_REPO=str(repository))
    proc = dedupe_cli(*args, env=env, cwd=cwd, input=b"")
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, (args, err)
    assert proc.returncode in DOCUMENTED, (args, proc.returncode, err)
    if proc.returncode == USAGE_EXIT:
        assert "Error: " in err, (args, err)
    elif proc.returncode != 0:
        said = ("dedupe: error: ", '"error": ', "dedupe: interrupted")  # --json: a JSON error
        assert any(s in err for s in said), (args, err)
