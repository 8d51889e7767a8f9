"""An object store that fails: 10% of requests to the S3 API server go through a proxy
(tests/faultproxy.py) that answers 503 SlowDown or 500, or drops the connection part way
through an upload or a response. Backups, restores, verify, prune and the lock operations
complete through retries, with exactly the bytes they should; when the store fails every
request, a backup fails cleanly and commits nothing."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends.s3 import S3Backend
from dedupe.errors import BackendError, ObjectChanged

MiB = 1 << 20


def _start_proxy(
    upstream: str, rate: float, seed: int, kinds: str
) -> tuple[subprocess.Popen[str], str]:
    proxy = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent.parent / "faultproxy.py"),
            "--upstream",
            upstream,
            "--rate",
            str(rate),
            "--seed",
            str(seed),
            "--kinds",
            kinds,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proxy.stdout is not None
    first = proxy.stdout.readline().split()
    assert first[:1] == ["port"], "the fault proxy did not start"
    return proxy, f"http://127.0.0.1:{first[1]}"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore waits rand(0, 1) * 2**(attempt - 1) seconds before retrying a failed request
    (up to half a second on average for the first retry): against a local server failing
    10% of requests, that was most of these tests' time (45 s of waits). How long a retry
    waits changes nothing they assert (each request is still retried, by the same code,
    with the same jitter), so in this process each wait is a twentieth as long. The
    `dedupe backup` child of the last test waits as long as ever."""
    from botocore.retries.standard import ExponentialBackoff

    original = ExponentialBackoff.delay_amount

    def delay_amount(self: ExponentialBackoff, context: Any) -> float:
        return float(original(self, context)) / 20

    monkeypatch.setattr(ExponentialBackoff, "delay_amount", delay_amount)


@pytest.fixture
def faulty(
    s3_location: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[float], str]]:
    """Point the AWS endpoint at a fault proxy in front of the test server, failing the
    given share of requests; returns the proxy's endpoint (for its counts)."""
    started: list[subprocess.Popen[str]] = []

    def start(rate: float, kinds: str = "slowdown,internal,reset-upload,reset-download") -> str:
        proxy, endpoint = _start_proxy(s3_endpoint, rate, seed=7, kinds=kinds)
        started.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        return endpoint

    yield start
    for proxy in started:
        proxy.terminate()
        proxy.wait(10)


def _faults(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{endpoint}/__faults__", timeout=10) as answer:
        counts: dict[str, int] = json.loads(answer.read())
    return counts


def test_every_operation_completes_through_a_failing_store(
    run_asyncio: Callable,
    s3_location: str,
    faulty: Callable[..., str],  # type: ignore[type-arg]
) -> None:
    endpoint = faulty(0.1)
    rng = random.Random(3)
    objects = {f"packs/{i:02x}/{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(60)}

    async def go() -> None:
        backend = S3Backend(s3_location)
        try:
            await asyncio.gather(*(backend.put(n, d) for n, d in objects.items()))
            assert sorted(await backend.list("packs/")) == sorted(objects)
            for name, data in objects.items():
                assert await backend.get(name) == data
                assert await backend.get(name, 1, len(data) - 1) == data[1:]
            for i in range(20):  # the lock operations: conditional, and retried
                lock = f"locks/{i}"
                await backend.create_new(lock, b"mine %d" % i)
                with pytest.raises(ObjectChanged):
                    await backend.create_new(lock, b"theirs")
                await backend.swap(lock, b"refreshed %d" % i, expected=b"mine %d" % i)
                await backend.delete_if(lock, expected=b"refreshed %d" % i)
                assert not await backend.exists(lock)
            for name in list(objects)[:30]:
                await backend.delete(name)
            assert len(await backend.list("packs/")) == 30
        finally:
            await backend.close()

    run_asyncio(go())
    counts = _faults(endpoint)
    assert all(counts.get(kind, 0) > 0 for kind in ("slowdown", "internal", "reset-upload"))
    assert counts.get("reset-download", 0) > 0


def test_requests_whose_answer_was_lost_are_retried_to_the_right_result(
    run_asyncio: Callable,  # type: ignore[type-arg]
    s3_location: str,
    faulty: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quarter of the answers are lost after the store carried the request out, so
    botocore sends it again: a conditional PUT then finds its own object there, a DELETE
    finds nothing. Each operation still reports what happened the first time (created,
    swapped, deleted), never "changed by someone else" or "missing"."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "12")  # 0.25**12: no operation runs out
    endpoint = faulty(0.25, "reset-download")

    async def go() -> None:
        backend = S3Backend(s3_location)
        try:
            for i in range(15):
                lock = f"locks/{i}"
                await backend.create_new(lock, b"mine %d" % i)
                await backend.swap(lock, b"refreshed %d" % i, expected=b"mine %d" % i)
                await backend.delete_if(lock, expected=b"refreshed %d" % i)
                await backend.put(f"index/{i}", b"x")
                await backend.delete(f"index/{i}")
            assert await backend.list("") == []
        finally:
            await backend.close()

    run_asyncio(go())
    assert _faults(endpoint)["reset-download"] >= 10


def test_backups_restore_exactly_through_a_failing_store(
    run_asyncio: Callable,
    s3_location: str,
    faulty: Callable[..., str],  # type: ignore[type-arg]
) -> None:
    rng = random.Random(4)
    days = [bytearray(rng.randbytes(4 * MiB))]
    for _ in range(3):
        day = bytearray(days[-1])
        for _ in range(5):
            at = rng.randrange(len(day) - 4096)
            day[at : at + 4096] = rng.randbytes(4096)
        days.append(day)
    endpoint = faulty(0.1)

    async def go() -> None:
        async with await make_repo(s3_location) as repo:  # type: ignore[arg-type]
            gens = []
            for i, day in enumerate(days):
                kind = "full" if i == 0 else "incremental"
                gens.append(await repo.backup(io.BytesIO(bytes(day)), name="db", kind=kind))
            await repo.forget(keep_full=1, dry_run=False)
            await repo.prune(repack_threshold=0.0)
            report = await repo.verify(read_data=True)
            assert report.ok, report
            for gen, day in zip(gens, days, strict=True):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == day

    run_asyncio(go())
    assert sum(v for k, v in _faults(endpoint).items() if k != "forwarded") >= 20


def _set_rate(endpoint: str, rate: float) -> None:
    urllib.request.urlopen(f"{endpoint}/__rate__/{rate}", timeout=10).close()


def test_a_store_that_fails_every_request_fails_the_backup_cleanly(
    run_asyncio: Callable,  # type: ignore[type-arg]
    s3_location: str,
    faulty: Callable[..., str],
    tmp_path: Path,
) -> None:
    """Retries run out: a `dedupe backup` process exits with BackendError's code and a
    message naming the request, commits no generation, and leaves only what the next
    prune removes (its packs; its lock, which it could not delete either, is stale once
    its process is gone). The earlier generation still restores."""
    endpoint = faulty(0.0)
    first = os.urandom(MiB)
    source = tmp_path / "day2.db"
    source.write_bytes(os.urandom(2 * MiB))

    async def back_up_first() -> str:
        async with await make_repo(s3_location) as repo:  # type: ignore[arg-type]
            return (await repo.backup(io.BytesIO(first), name="db", kind="full")).id

    kept = run_asyncio(back_up_first())
    _set_rate(endpoint, 1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(
        DEDUPE_REPO=s3_location,
        DEDUPE_PASSWORD=PASSPHRASE,
        DEDUPE_STATE_DIR=os.environ["DEDUPE_STATE_DIR"],
        AWS_MAX_ATTEMPTS="2",
    )
    failed = subprocess.run(
        [sys.executable, "-m", "dedupe", "backup", str(source), "--name", "db"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == BackendError.exit_code, failed.stderr
    assert "failed" in failed.stderr and "Traceback" not in failed.stderr
    _set_rate(endpoint, 0.0)

    async def after() -> None:
        async with await Repository.open(s3_location, PASSPHRASE) as repo:
            assert [g.id for g in await repo.generations()] == [kept]
            await repo.prune()
            assert (await repo.verify(read_data=True)).ok
            out = io.BytesIO()
            await repo.restore(kept, out)
            assert out.getvalue() == first

    run_asyncio(after())
