"""Crash points on an object store (docs/FORMAT.md 9, 10.1, 14.2, 14.3): a backup, a
prune, a forget and a key rotation against the tests' S3 API server die before any one
of their writes to the store, and the
repository they leave passes what tests/integration/test_crash_points.py asserts for a
local directory: `verify --read-data` is clean as it is, every generation committed
before restores byte for byte, the interrupted backup committed wholly or not at all,
and the same command run again succeeds and leaves everything restorable.

The crash points are the command's mutations of the store, counted in its own process:
every put, streamed put, delete, conditional create, swap and conditional delete of
`S3Backend` (each one counted once, however it is carried out: a multipart upload is one
put). A probe run counts them; then the command runs once per chosen point k on a fresh
copy of the same bucket and exits (`os._exit`, nothing caught or cleaned up) instead of
starting mutation k: the requests before it were answered, the rest never sent. A command
with more than POINTS mutations is sampled: the first and last few, and an even stride.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, changing_versions, make_repo

import dedupe
from dedupe import Repository

ROOT = Path(dedupe.__file__).resolve().parents[1]
CRASHED = 99
POINTS = 8  # crash points per command at most
MUTATIONS = ("put", "put_stream", "delete", "create_new", "swap", "delete_if")

# Run in the command's process: count S3Backend's mutations, die before number CRASH_AT.
DRIVER = """
import contextvars, json, os, sys
CRASHED, MUTATIONS = int(os.environ["CRASH_EXIT"]), os.environ["CRASH_OPS"].split(",")
from dedupe.backends import s3
at, note = int(os.environ["CRASH_AT"]), os.environ["CRASH_NOTE"]
count, inside = [0], contextvars.ContextVar("inside", default=False)
def wrap(name):
    original = getattr(s3.S3Backend, name)
    async def counted(self, *args, **kwargs):
        if inside.get():  # a mutation made by another (put_stream's put): counted once
            return await original(self, *args, **kwargs)
        if count[0] == at:
            with open(note, "w") as f:
                json.dump({"ops": count[0], "crashed": f"{name} {args[0]}"}, f)
            os._exit(CRASHED)
        count[0] += 1
        token = inside.set(True)
        try:
            return await original(self, *args, **kwargs)
        finally:
            inside.reset(token)
    setattr(s3.S3Backend, name, counted)
def cut_uploads_short():
    # Torn writes: count multipart uploads by their completion, and die before one.
    original = s3.S3Backend._call
    async def call(self, what, name, operation, **kwargs):
        if operation == "complete_multipart_upload":
            if count[0] == at:
                with open(note, "w") as f:
                    json.dump({"ops": count[0], "crashed": f"{operation} {name}"}, f)
                os._exit(CRASHED)
            count[0] += 1
        return await original(self, what, name, operation, **kwargs)
    s3.S3Backend._call = call
if os.environ.get("CRASH_MODE") == "torn":
    # Objects over 32 KiB (the tests' packs) go up as multipart uploads of one part.
    s3.SINGLE_PUT_LIMIT, s3.PART_SIZE = 32 << 10, 1 << 20
    cut_uploads_short()
else:
    for name in MUTATIONS:
        wrap(name)
def done():
    with open(note, "w") as f:
        json.dump({"ops": count[0], "crashed": None}, f)
import atexit
atexit.register(done)
from dedupe.cli import cli
cli(sys.argv[1:], prog_name="dedupe")
"""


def points(total: int) -> list[int]:
    if total <= POINTS:
        return list(range(total))
    ends = POINTS // 4
    middle = POINTS - 2 * ends
    stride = [ends + (total - 2 * ends) * i // (middle + 1) for i in range(1, middle + 1)]
    return sorted({*range(ends), *stride, *range(total - ends, total)})


async def _copy_bucket(endpoint: str, source: str, target: str) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
        await s3.create_bucket(Bucket=target)
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=source):
            for obj in page.get("Contents", ()):
                await s3.copy_object(
                    Bucket=target, Key=obj["Key"], CopySource={"Bucket": source, "Key": obj["Key"]}
                )


async def _looks(
    location: str,
    committed: dict[str, bytes],
    new: bytes | None,
    most_new: int,
    may_be_gone: str | None = None,
) -> set[str]:
    """Asserts the state after a crash or a re-run: every committed generation is there
    (but `may_be_gone`, which a forget may have removed) and restores exactly; at most
    `most_new` others, each of the new data; `verify --read-data` is clean. Returns the
    generations it holds."""
    async with await Repository.open(location, PASSPHRASE, cache=False) as repo:
        ids = {g.id for g in await repo.generations()}
        assert set(committed) - {may_be_gone} <= ids, "a committed generation is gone"
        extra = ids - set(committed)
        assert len(extra) <= (most_new if new is not None else 0), extra
        for gen_id in ids:
            out = io.BytesIO()
            await repo.restore(gen_id, out)
            assert out.getvalue() == committed.get(gen_id, new), gen_id
        report = await repo.verify(read_data=True, quarantine=False)
        assert report.ok, report.damaged
    return ids


_buckets = itertools.count()


class Bench:
    def __init__(self, endpoint: str, tmp: Path, env: dict[str, str]) -> None:
        self.endpoint, self.tmp, self.env = endpoint, tmp, env
        self.n = 0
        self.state: dict[str, str] = {}  # location -> its client state directory
        self.template_state = os.environ["DEDUPE_STATE_DIR"]

    def run(
        self, location: str, args: list[str], at: int, mode: str = "crash"
    ) -> tuple[int, dict[str, Any], str]:
        note = self.tmp / f"note-{self.n}.json"
        self.n += 1
        env = dict(
            self.env,
            DEDUPE_REPO=location,
            DEDUPE_STATE_DIR=self.state[location],
            CRASH_AT=str(at),
            CRASH_NOTE=str(note),
            CRASH_EXIT=str(CRASHED),
            CRASH_OPS=",".join(MUTATIONS),
            CRASH_MODE=mode,
        )
        done = subprocess.run(
            [sys.executable, "-c", DRIVER, *args], env=env, capture_output=True, timeout=120
        )
        return done.returncode, json.loads(note.read_text()), done.stderr.decode()

    def fresh(self, template: str) -> str:
        """A copy of the template bucket, with a copy of the client state (the keyring
        serials seen) as it was after the template was made: a client that saw a trial's
        rotation would take the next copy's keyring for a rollback."""
        bucket = f"crash-{os.getpid()}-{next(_buckets)}"
        asyncio.run(_copy_bucket(self.endpoint, template, bucket))
        location = f"s3://{bucket}/repo"
        self.state[location] = str(self.tmp / f"state-{bucket}")
        shutil.copytree(self.template_state, self.state[location])
        return location

    def looks(self, location: str, *args: Any) -> set[str]:
        """_looks, as a client with the copy's own state."""
        saved = os.environ["DEDUPE_STATE_DIR"]
        os.environ["DEDUPE_STATE_DIR"] = self.state[location]
        try:
            return asyncio.run(_looks(location, *args))
        finally:
            os.environ["DEDUPE_STATE_DIR"] = saved


@pytest.fixture
def bench(s3_location: str, s3_endpoint: str, tmp_path: Path) -> Bench:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(
        DEDUPE_PASSWORD=PASSPHRASE,
        DEDUPE_STATE_DIR=os.environ["DEDUPE_STATE_DIR"],
        DEDUPE_CACHE_DIR=os.environ["DEDUPE_CACHE_DIR"],
        PYTHONPATH=str(ROOT),
    )
    return Bench(s3_endpoint, tmp_path, env)


COMMANDS = {
    "backup": ["backup", "{day4}", "--name", "db"],
    "prune": ["prune", "--repack-threshold", "0"],
    "forget": ["forget", "--name", "db", "--keep-last", "2"],
    "key-rotate": ["key", "rotate"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_crash_point_on_s3_leaves_a_sound_repository(
    command: str, bench: Bench, s3_location: str, tmp_path: Path
) -> None:
    days = changing_versions(4, 300_000, 40_000)

    async def template() -> dict[str, bytes]:
        async with await make_repo(s3_location, cache=False) as repo:
            gens = {}
            for data in days[:3]:
                gens[(await repo.backup(io.BytesIO(data), name="db", kind="full")).id] = data
            if command == "prune":  # prune then has packs to delete and to repack
                first = next(iter(gens))
                await repo.forget(ids=[first])
                del gens[first]
            return gens

    committed = asyncio.run(template())
    bench.template_state = str(
        shutil.copytree(os.environ["DEDUPE_STATE_DIR"], tmp_path / "template")
    )
    bucket = s3_location.split("/")[2]
    new_data = days[3] if command == "backup" else None
    oldest = next(iter(committed)) if command == "forget" else None  # what forget removes
    source = tmp_path / "day4.bin"
    source.write_bytes(days[3])
    args = [str(source) if a == "{day4}" else a for a in COMMANDS[command]]

    probe = bench.fresh(bucket)
    code, note, err = bench.run(probe, args, -1)
    assert code == 0, err
    total = note["ops"]
    assert total >= 3, note
    chosen = points(total)
    crashed_at = []
    for k in chosen:
        location = bench.fresh(bucket)
        code, note, err = bench.run(location, args, k)
        assert code == CRASHED, f"crash point {k}: exit {code}, {err}"
        crashed_at.append(note["crashed"])
        before = bench.looks(location, committed, new_data, 1, oldest)
        code, note, err = bench.run(location, args, -1)
        assert code == 0, f"the re-run after crash point {k} failed: {err}"
        after = bench.looks(location, committed, new_data, 2, oldest)
        if command == "backup":
            assert len(after) == len(before) + 1  # the re-run committed its generation
        if command == "forget":
            assert oldest not in after  # the re-run finished the forget
    print(f"{command} on S3: {total} mutations, crashed before {len(chosen)}: {crashed_at}")


async def _incomplete_uploads(endpoint: str, location: str) -> int:
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", endpoint_url=endpoint) as s3:
        got = await s3.list_multipart_uploads(Bucket=location.split("/")[2])
        return len(got.get("Uploads", ()))


def test_an_upload_cut_short_is_never_an_object_and_prune_aborts_it(
    bench: Bench, s3_location: str, tmp_path: Path
) -> None:
    """Torn writes on S3: a put cannot leave part of an object under its name, but a
    multipart upload (objects over 64 MiB, streamed manifests; here, with the limit
    lowered in the child, every pack) can be left incomplete. A backup dies before it
    completes each of its uploads in turn: the object is no object (nothing lists it, the
    generation is not committed), the re-run commits, and the next prune aborts what was
    left."""
    days = changing_versions(2, 300_000, 40_000)

    async def template() -> dict[str, bytes]:
        async with await make_repo(s3_location, cache=False) as repo:
            return {(await repo.backup(io.BytesIO(days[0]), name="db")).id: days[0]}

    committed = asyncio.run(template())
    bench.template_state = str(shutil.copytree(os.environ["DEDUPE_STATE_DIR"], tmp_path / "t"))
    bucket = s3_location.split("/")[2]
    source = tmp_path / "day2.bin"
    source.write_bytes(days[1])
    args = ["backup", str(source), "--name", "db"]
    code, note, err = bench.run(bench.fresh(bucket), args, -1, "torn")
    assert code == 0, err
    uploads = note["ops"]
    assert uploads >= 1  # the manifest
    for k in range(uploads):
        location = bench.fresh(bucket)
        code, note, err = bench.run(location, args, k, "torn")
        assert code == CRASHED, f"upload {k}: exit {code}, {err}"
        assert asyncio.run(_incomplete_uploads(bench.endpoint, location)) == 1
        before = bench.looks(location, committed, days[1], 1)
        assert len(before) == len(committed)  # the manifest's upload was never completed
        code, _note, err = bench.run(location, args, -1)
        assert code == 0, err
        code, _note, err = bench.run(location, ["prune"], -1)
        assert code == 0, err
        assert asyncio.run(_incomplete_uploads(bench.endpoint, location)) == 0
        after = bench.looks(location, committed, days[1], 1)
        assert len(after) == len(committed) + 1
    print(f"backup on S3: {uploads} multipart uploads, each cut short in turn")
