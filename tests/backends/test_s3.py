"""The S3 backend beyond the shared contract (test_conformance runs that on S3 too):
multipart uploads, what interrupted uploads leave, locations, a missing bucket, and a
repository used end to end through the API and the command, against the S3 API server
the tests start on 127.0.0.1 (tests/s3server.py)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import PASSPHRASE, make_repo

import dedupe.backends.s3 as s3_module
from dedupe import Repository
from dedupe.backends import open_backend
from dedupe.backends.s3 import S3Backend, parse_s3_location
from dedupe.errors import BackendError, ScratchError, UnsupportedLocation

MiB = 1 << 20
MOTO_MIN_PART = 5 * MiB  # S3's (and moto's) smallest part but the last


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multipart uploads from 6 MiB on, in parts of 5 MiB: several parts without
    gigabytes of test data."""
    monkeypatch.setattr(s3_module, "PART_SIZE", MOTO_MIN_PART)
    monkeypatch.setattr(s3_module, "SINGLE_PUT_LIMIT", 6 * MiB)


def test_large_objects_go_up_in_parts_and_read_back_in_ranges(
    run: Callable,
    s3_location: str,
    small_parts: None,  # type: ignore[type-arg]
) -> None:
    data = random.Random(1).randbytes(12 * MiB + 12345)  # three parts, the last short
    pieces = [data[i : i + 700_000] for i in range(0, len(data), 700_000)]

    async def go() -> None:
        backend = S3Backend(s3_location)
        try:
            await backend.put("packs/aa/big", data)
            await backend.put_stream("generations/big", iter(pieces))
            for name in ("packs/aa/big", "generations/big"):
                assert await backend.stat(name) == len(data)
                assert await backend.get(name) == data
                across = 2 * MOTO_MIN_PART - 10  # a range across a part boundary
                assert await backend.get(name, across, 20) == data[across : across + 20]
            assert await backend.remove_leftovers() == 0
        finally:
            await backend.close()

    run(go())


def test_a_failed_multipart_upload_is_aborted_and_a_killed_one_removed(
    run: Callable,
    s3_location: str,
    small_parts: None,  # type: ignore[type-arg]
) -> None:
    """A stream that fails after a whole part was uploaded leaves no object and no
    upload; an upload whose process died (never completed, never aborted) is invisible
    to listings and removed by remove_leftovers, as a local temporary file is."""

    def failing() -> Iterator[bytes]:
        yield os.urandom(MOTO_MIN_PART + 1)  # one part goes up, then the source fails
        yield os.urandom(MOTO_MIN_PART)
        raise ScratchError("the spill could not be read")

    async def go() -> None:
        backend = S3Backend(s3_location)
        try:
            with pytest.raises(ScratchError):
                await backend.put_stream("generations/g", failing())
            assert not await backend.exists("generations/g")
            assert await backend.remove_leftovers() == 0  # aborted already
            s3 = await backend._s3()
            await s3.create_multipart_upload(Bucket=backend.bucket, Key=backend._key("packs/x"))
            assert await backend.list("packs/") == []
            assert await backend.is_empty()
            assert await backend.remove_leftovers() == 1
            assert await backend.remove_leftovers() == 0
        finally:
            await backend.close()

    run(go())


def test_locations() -> None:
    assert parse_s3_location("s3://bucket") == ("bucket", "")
    assert parse_s3_location("s3://bucket/") == ("bucket", "")
    assert parse_s3_location("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert isinstance(open_backend("s3://bucket/repo"), S3Backend)
    for bad in ("s3://", "s3:///prefix", "s3://bucket/a//b", "s3://bucket/../x"):
        with pytest.raises(UnsupportedLocation):
            open_backend(bad)
    # restic's spelling still reads as a mistake, not as a directory.
    with pytest.raises(UnsupportedLocation, match="s3://bucket/prefix"):
        open_backend("s3:https://host/bucket")


def test_a_missing_bucket_is_a_clear_error(run: Callable, s3_location: str) -> None:  # type: ignore[type-arg]
    async def go() -> None:
        with pytest.raises(BackendError, match="bucket 'no-such-bucket' does not exist"):
            await make_repo("s3://no-such-bucket/repo")  # type: ignore[arg-type]

    run(go())


def test_a_repository_on_s3_backs_up_restores_verifies_and_prunes(
    run: Callable,
    s3_location: str,  # type: ignore[type-arg]
) -> None:
    rng = random.Random(5)
    day1 = bytearray(rng.randbytes(3 * MiB))
    day2 = bytearray(day1)
    day2[MiB : MiB + 4096] = rng.randbytes(4096)

    async def go() -> None:
        async with await make_repo(s3_location) as repo:  # type: ignore[arg-type]
            full = await repo.backup(io.BytesIO(bytes(day1)), name="db", kind="full")
            incr = await repo.backup(io.BytesIO(bytes(day2)), name="db", kind="incremental")
            assert incr.bytes_new < full.bytes_new / 4  # deduplicated against the full
        async with await Repository.open(s3_location, PASSPHRASE) as repo:
            for gen, data in ((full, day1), (incr, day2)):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == data
            report = await repo.verify(read_data=True)
            assert report.ok and report.chunks_read > 0
            await repo.forget(keep_full=1, dry_run=False)
            await repo.prune()
            out = io.BytesIO()
            await repo.restore(incr.id, out)
            assert out.getvalue() == day2

    run(go())


def test_the_command_uses_an_s3_repository(s3_location: str, tmp_path: Path) -> None:
    """`-r s3://bucket/prefix` with the endpoint from AWS_ENDPOINT_URL: init refuses a
    prefix that holds objects, backup and restore go through the object store."""
    source = tmp_path / "orders.db"
    source.write_bytes(random.Random(2).randbytes(2 * MiB))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(DEDUPE_PASSWORD=PASSPHRASE, DEDUPE_STATE_DIR=os.environ["DEDUPE_STATE_DIR"])

    def dedupe(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "dedupe", "-r", s3_location, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Unclosed" not in done.stderr  # every command releases its connections
        return done

    async def plant(location: str) -> None:
        backend = S3Backend(location)
        await backend.put("notes.txt", b"someone else's object")
        await backend.close()

    elsewhere = s3_location.rsplit("/", 1)[0] + "/other"
    asyncio.run(plant(elsewhere))
    weak_kdf = ("--kdf-memlimit", "8", "--kdf-opslimit", "1")
    refused = dedupe("init", *weak_kdf, "-r", elsewhere)
    assert refused.returncode == 14 and "not empty" in refused.stderr, refused.stderr
    init = dedupe("init", *weak_kdf)
    assert init.returncode == 0, init.stderr
    backup = dedupe("backup", str(source), "--name", "orders")
    assert backup.returncode == 0, backup.stderr
    restored = tmp_path / "restored.db"
    restore = dedupe("restore", "orders@latest", str(restored))
    assert restore.returncode == 0, restore.stderr
    assert restored.read_bytes() == source.read_bytes()
    verify = dedupe("verify", "--read-data")
    assert verify.returncode == 0, verify.stderr
