"""Hermetic tests: no DEDUPE_* variable leaks in, every repository lives in a tmp dir, the
KDF is at its weakest and packs are tiny so kilobytes make many packs.

Async tests take the `run` fixture, which runs a coroutine on stock asyncio and on uvloop
(the library must not care which loop it is on).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dedupe import Repository
from dedupe.crypto import KdfParams

T = TypeVar("T")
PASSPHRASE = "correct horse battery staple"
SMALL_PACK = 64 * 1024


@pytest.fixture(autouse=True, scope="session")
def client_state_for_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Module- and session-scoped fixtures open repositories too: their client state (the
    keyring serials seen) goes to a directory of the test run, never to ~/.local/state."""
    old = os.environ.get("DEDUPE_STATE_DIR")
    os.environ["DEDUPE_STATE_DIR"] = str(tmp_path_factory.mktemp("session-client-state"))
    yield
    if old is None:
        del os.environ["DEDUPE_STATE_DIR"]
    else:
        os.environ["DEDUPE_STATE_DIR"] = old


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for key in list(os.environ):
        if key.startswith("DEDUPE_"):
            monkeypatch.delenv(key)
    # The keyring serials this "machine" has seen (rollback detection) stay in the test.
    monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path_factory.mktemp("client-state")))


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


async def make_repo(path: Path, **kwargs: Any) -> Repository:
    kwargs.setdefault("pack_size", SMALL_PACK)
    kwargs.setdefault("kdf", KdfParams.weakest())
    return await Repository.init(path, PASSPHRASE, **kwargs)


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
