"""Hermetic tests: no DEDUPE_* variable leaks in, every repository lives in a tmp dir, the
KDF is at its weakest and packs are tiny so kilobytes make many packs.

Async tests take the `run` fixture, which runs a coroutine on stock asyncio and on uvloop
(the library must not care which loop it is on).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dedupe import Repository
from dedupe.crypto import KdfParams

T = TypeVar("T")
PASSPHRASE = "correct horse battery staple"


def default_sigint() -> None:
    """Popen preexec_fn for a child that a test stops with SIGINT. A shell without job
    control starts a background command with SIGINT ignored, its children inherit that
    (Popen's restore_signals covers SIGPIPE and SIGXFSZ only), and Python then installs no
    handler: a test suite started that way (`(make test &)`) would never interrupt its
    child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SMALL_PACK = 64 * 1024


@pytest.fixture(autouse=True, scope="session")
def client_state_for_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures open repositories too: their client state (the
    keyring serials seen, the object cache) goes to directories of the test run, never to
    ~/.local/state or ~/.cache."""
    dirs = {
        "DEDUPE_STATE_DIR": tmp_path_factory.mktemp("session-client-state"),
        "DEDUPE_CACHE_DIR": tmp_path_factory.mktemp("session-cache"),
    }
    old = {key: os.environ.get(key) for key in dirs}
    os.environ.update({key: str(path) for key, path in dirs.items()})
    yield
    for key, value in old.items():
        if value is None:
            del os.environ[key]
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for key in list(os.environ):
        if key.startswith("DEDUPE_"):
            monkeypatch.delenv(key)
    # The keyring serials this "machine" has seen (rollback detection) stay in the test.
    monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path_factory.mktemp("client-state")))
    # So does the object cache of S3 repositories (store/cache.py).
    monkeypatch.setenv("DEDUPE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def _loop_factories() -> list[Any]:
    params = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop

        params.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:
        pass
    return params


@pytest.fixture(params=_loop_factories())
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, T]], T]]:
    factory = request.param

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    yield runner


@pytest.fixture
def run_asyncio() -> Callable[[Coroutine[Any, Any, T]], T]:
    """For tests whose subject is not the loop (keeps slow tests single-loop)."""
    return asyncio.run


async def make_repo(
    location: Path | str, passphrase: str = PASSPHRASE, **kwargs: Any
) -> Repository:
    """A new repository at `location` (a directory or s3://), with small packs and the
    weakest key derivation, so that tests make many packs quickly."""
    kwargs.setdefault("pack_size", SMALL_PACK)
    kwargs.setdefault("kdf", KdfParams.weakest())
    return await Repository.init(location, passphrase, **kwargs)


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def cli_env(tmp_path: Path, repo_path: Path) -> dict[str, str]:
    """Environment for running the `dedupe` command against repo_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(
        DEDUPE_REPO=str(repo_path),
        DEDUPE_PASSWORD=PASSPHRASE,
        DEDUPE_STATE_DIR=os.environ["DEDUPE_STATE_DIR"],
        DEDUPE_CACHE_DIR=os.environ["DEDUPE_CACHE_DIR"],
    )
    return env


def dedupe_cli(
    *args: str,
    env: dict[str, str],
    input: bytes | None = None,
    check: bool = False,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real command in a child process, as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "dedupe", *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        check=check,
        timeout=600,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    return dedupe_cli


# --- helper interpreters that fork a child per command ---------------------------------------

# What the commands import when they run (dedupe.cli imports them lazily).
COMMAND_MODULES = (
    "asyncio",
    "rich.console",
    "dedupe.api",
    "dedupe.engine.backup",
    "dedupe.engine.forget",
    "dedupe.engine.keys",
    "dedupe.engine.prune",
    "dedupe.engine.restore",
    "dedupe.engine.verify",
    "dedupe.replication",
    "dedupe.objectives",
    "dedupe.cli",
)


def warm_for_forks(*modules: str) -> None:
    """In a helper interpreter, before its first fork: import what the commands import
    when they run (COMMAND_MODULES, and `modules`), so that each child starts with them
    loaded instead of importing them (tens of milliseconds a child), then freeze what
    the helper holds, as the gc module's docs advise before forking (a child's
    collections skip it). Only a warm-up: a module that is not there is left to the
    child to import, and to fail on."""
    import contextlib
    import gc
    import importlib

    for name in (*COMMAND_MODULES, *modules):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    gc.freeze()


def serve_forks(child: Callable[[dict[str, Any]], int], *warm: str) -> None:
    """A helper interpreter's loop: one JSON request a line on stdin, each run by `child`
    in a forked child that leaves with os._exit (no interpreter shutdown); the answer is
    the child's exit code (negative: killed by that signal). `warm`: modules imported once,
    before the first fork, beside COMMAND_MODULES."""
    warm_for_forks(*warm)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
        sys.stdout.flush()


class ForkHelper:
    """In the test: one helper interpreter running `serve()` of the test module at
    `module_file` (which forks a child per request), used by one thread at a time."""

    def __init__(self, module_file: str, workdir: Path) -> None:
        here = Path(module_file).resolve().parent
        import dedupe

        root = Path(dedupe.__file__).resolve().parents[1]
        code = (
            f"import sys; sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}, {str(root)!r}]; "
            f"import {Path(module_file).stem} as t; t.serve()"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
        self.log = workdir / f"helper-{id(self)}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )

    def request(self, **request: Any) -> int:
        """Run one request in a forked child; its exit code."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise AssertionError(f"the helper died: {self.log.read_text()}")
        return int(json.loads(answer))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- kill loops: SIGKILL at chosen moments, each trial on a copy of a template --------------


ForkHelperT = TypeVar("ForkHelperT", bound=ForkHelper)


def helper_pool(make: Callable[[], ForkHelperT], count: int) -> Iterator[queue.Queue[ForkHelperT]]:
    """For a module-scoped fixture: `count` helpers started at once, lent out through a
    queue (one test thread each), closed when the module is done."""
    started = [make() for _ in range(count)]
    pool: queue.Queue[ForkHelperT] = queue.Queue()
    for h in started:
        pool.put(h)
    yield pool
    for h in started:
        h.close()


def kill_times(rnd: random.Random, n: int, low: float, high: float) -> list[float]:
    """`n` delays in [low, high), one drawn at random in each of `n` equal slices: every
    part of the window is hit, no gap between two kills is over 2/n of it (`n` uniform
    draws leave about ln(n)/n on average, and can bunch), so fewer trials cover a run."""
    width = (high - low) / n
    return [low + (i + rnd.random()) * width for i in range(n)]


def lock_and_end(
    path: Path, start: Callable[[Path], subprocess.Popen[bytes]]
) -> tuple[float, float]:
    """When a command `start`ed on a copy of the repository at `path` first holds a lock
    (before it, it has written nothing: a kill then tests nothing) and when it ends,
    uninterrupted, in seconds from its start: the earliest of two runs (the first may
    also compile modules to bytecode, or meet a busy machine; kill times past the end
    test nothing either)."""
    locked, ended = [], []
    for i in range(2):
        probe = path.parent / f"{path.name}-probe{i}"
        linked_copy(path, probe)
        started = time.monotonic()
        proc = start(probe)
        seen = None
        while proc.poll() is None:
            if seen is None and any(not n.startswith(".") for n in os.listdir(probe / "locks")):
                seen = time.monotonic() - started
            time.sleep(0.001)
        ended.append(time.monotonic() - started)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert seen is not None, "the command ran without a lock"
        locked.append(seen)
        shutil.rmtree(probe)
    return min(locked), min(ended)


def linked_copy(src: Path, dst: Path) -> None:
    """A copy of a repository, its files hard-linked: the local backend never changes a
    file in place (a temporary file renamed or linked into place, docs/FORMAT.md section
    9; deletes unlink), so what a trial writes or deletes never reaches `src`. Check with
    `files_of` that it did not."""
    shutil.copytree(src, dst, copy_function=os.link)


def files_of(root: Path) -> dict[str, tuple[int, int, int]]:
    """Each file under `root`: (inode, size, mtime in ns). A write in place through a hard
    link changes the size or the mtime of the file that `linked_copy` shares."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


# --- S3: a real S3 API server (moto's) on 127.0.0.1, started by the tests -----------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint of an S3 API server the session starts (tests/s3server.py) and stops.
    Not skipped when moto is missing: the object-store tests must run wherever the
    suite does (`pip install .[test]` brings it)."""
    server = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "s3server.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline().split()
        if first[:1] != ["port"]:
            raise RuntimeError(f"the S3 API server did not start (exit {server.wait(5)})")
        yield f"http://127.0.0.1:{first[1]}"
    finally:
        server.terminate()
        server.wait(10)


def s3_environment(endpoint: str, home: Path) -> dict[str, str]:
    """AWS variables that point every S3 client at the test server, and nowhere else (no
    ~/.aws files, no instance metadata lookups)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "dedupe-tests",
        "AWS_SECRET_ACCESS_KEY": "dedupe-tests-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
    }


def env_for(location: str, cli_env: dict[str, str]) -> dict[str, str]:
    """cli_env for a `dedupe` process whose repository is `location` (a directory or an
    s3:// location, with this process's AWS variables, which s3_location set)."""
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {**cli_env, **aws, "DEDUPE_REPO": location}


async def closed(backend: Any, job: Coroutine[Any, Any, None]) -> None:
    """Run `job`, then release the backend's connections (an S3 client's belong to the
    loop that `run` is about to close)."""
    try:
        await job
    finally:
        await backend.close()


_buckets = iter(range(1, 1 << 30))


@pytest.fixture
def s3_location(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty bucket on the test server, as `s3://bucket/repo`, with the AWS
    environment set for this process (children get it from os.environ too)."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_environment(s3_endpoint, tmp_path).items():
        monkeypatch.setenv(key, value)
    bucket = f"dedupe-test-{os.getpid()}-{next(_buckets)}"

    async def create() -> None:
        from aiobotocore.session import get_session

        async with get_session().create_client("s3", endpoint_url=s3_endpoint) as s3:
            await s3.create_bucket(Bucket=bucket)

    asyncio.run(create())
    yield f"s3://{bucket}/repo"


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, repo_path: Path) -> Iterator[str]:
    """Where a test's repository goes: repo_path, or a fresh bucket on the S3 server."""
    if request.param == "local":
        yield str(repo_path)
    else:
        yield request.getfixturevalue("s3_location")


def changing_versions(count: int, size: int = 300_000, changed: int = 40_000) -> list[bytes]:
    """`count` versions of random data of `size` bytes, each with one more region of
    `changed` bytes rewritten (a snapshot taken day after day)."""
    data = bytearray(os.urandom(size))
    out = []
    for i in range(count):
        at = (i * (changed + 30_000)) % (size - changed)
        data[at : at + changed] = os.urandom(changed)
        out.append(bytes(data))
    return out


async def part_live_packs(repo: Repository, kept: bytes) -> tuple[str, str]:
    """Generations "b" then "a" (a full of `kept`) such that a's chunks sit in b's packs
    between b's own, then b forgotten: b's packs are part live, part garbage, and prune
    repacks them. Returns (forgotten id, kept id)."""
    shared = [kept[i : i + 60_000] for i in range(0, len(kept), 60_000)]
    mixed = b"".join(part + os.urandom(60_000) for part in shared)
    gone = await repo.backup(io.BytesIO(mixed), name="b")
    keep = await repo.backup(io.BytesIO(kept), name="a", kind="full")
    await repo.forget(ids=[gone.id])
    return gone.id, keep.id


# --- PostgreSQL: a throwaway server on 127.0.0.1, started by the tests -------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[dict[str, str]]:
    """The libpq environment of a PostgreSQL server the session starts (tests/pgserver.py)
    and stops. Not skipped when PostgreSQL is missing (.ci/run installs it)."""
    from pgserver import server

    with server() as env:
        yield env


_databases = iter(range(1, 1 << 30))


@pytest.fixture
def pg(postgres_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The server's environment set for this process (children get it too), and a fresh
    database name in `pg["db"]` (created empty)."""
    for key, value in postgres_server.items():
        monkeypatch.setenv(key, value)
    db = f"t{os.getpid()}_{next(_databases)}"
    subprocess.run(["createdb", db], check=True, capture_output=True, timeout=60)
    return {**postgres_server, "db": db}


def manifest_header(name: str, **fields: Any) -> dict[str, Any]:
    """A manifest header as a writer (or a malicious one) fills it in for
    RepositoryStore.write_manifest (the store adds version and body): an empty stream's
    full, `fields` overriding."""
    return {
        "name": name,
        "kind": "full",
        "parent": None,
        "created": "2026-01-01T00:00:00.000000Z",
        "source": {"type": "stream", "label": "x"},
        "chunker": {"algorithm": "fastcdc-2020"},
        "size": 0,
        "chunks": 0,
        "new_chunks": 0,
        "new_bytes": 0,
        "stored_bytes": 0,
        "seconds": 0.0,
        **fields,
    }


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settled_descriptors(before: int) -> int:
    """The open descriptors once those of reads cut short have gone (up to 2 s): a read
    ahead that a failing or cancelled chain walk cancels may still be reading a manifest
    in a worker thread, which no cancellation stops, when the walk returns."""
    for _ in range(200):
        if open_descriptors() == before:
            break
        await asyncio.sleep(0.01)
    return open_descriptors()
