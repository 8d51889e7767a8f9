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

Every child (a command, or a look at what it left) is forked from a long-lived helper
interpreter, one per worker, with dedupe's command and the S3 client already imported, so
that a child costs a fork and not an interpreter start (about 0.4 s with botocore), and
WORKERS crash points run at once, each on its own bucket with its own client state.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import io
import itertools
import json
import os
import queue
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import PASSPHRASE, ForkHelper, changing_versions, helper_pool, make_repo, serve_forks

import dedupe
from dedupe import Repository

ROOT = Path(dedupe.__file__).resolve().parents[1]
CRASHED = 99
POINTS = 8  # crash points per command at most
MUTATIONS = ("put", "put_stream", "delete", "create_new", "swap", "delete_if")
WORKERS = 2  # crash points tried at once
CHILD_TIMEOUT = 120  # seconds; a child that runs longer is killed by SIGALRM
T = TypeVar("T")

# The helper interpreter: this module, imported by path, serves requests on stdin.
# --- in the children ---------------------------------------------------------------------


def _command(args: list[str], at: int, note: str, mode: str) -> int:
    """The `dedupe` command, with S3Backend's mutations counted: it dies (os._exit, nothing
    caught or cleaned up) before mutation number `at`. Writes the count to `note`."""
    from dedupe.backends import s3

    count, inside = [0], contextvars.ContextVar("inside", default=False)

    def record(crashed: str | None) -> None:
        with open(note, "w") as f:
            json.dump({"ops": count[0], "crashed": crashed}, f)

    def die(crashed: str) -> None:
        record(crashed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(CRASHED)

    def wrap(name: str) -> None:
        original = getattr(s3.S3Backend, name)

        async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if inside.get():  # a mutation made by another (put_stream's put): counted once
                return await original(self, *args, **kwargs)
            if count[0] == at:
                die(f"{name} {args[0]}")
            count[0] += 1
            token = inside.set(True)
            try:
                return await original(self, *args, **kwargs)
            finally:
                inside.reset(token)

        setattr(s3.S3Backend, name, counted)

    def cut_uploads_short() -> None:
        # Torn writes: count multipart uploads by their completion, and die before one.
        original = s3.S3Backend._call

        async def call(self: Any, what: str, name: str, operation: str, **kwargs: Any) -> Any:
            if operation == "complete_multipart_upload":
                if count[0] == at:
                    die(f"{operation} {name}")
                count[0] += 1
            return await original(self, what, name, operation, **kwargs)

        setattr(s3.S3Backend, "_call", call)  # noqa: B010

    if mode == "torn":
        # Objects over 32 KiB (the tests' packs) go up as multipart uploads of one part.
        s3.SINGLE_PUT_LIMIT, s3.PART_SIZE = 32 << 10, 1 << 20
        cut_uploads_short()
    else:
        for name in MUTATIONS:
            wrap(name)
    from dedupe.cli import cli

    try:
        cli(args, prog_name="dedupe")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    record(None)
    return code


async def _look(location: str) -> dict[str, Any]:
    """What a key holder sees: the generations, each restored (SHA-256 of the bytes), and
    `verify --read-data` (without writing a quarantine record: a look changes nothing).
    The restores and verify run side by side (shared locks), to keep a look short."""
    async with await Repository.open(location, PASSPHRASE, cache=False) as repo:
        gens = await repo.generations()

        async def restore(gen_id: str) -> str:
            out = io.BytesIO()
            await repo.restore(gen_id, out)
            return _sha(out.getvalue())

        async with asyncio.TaskGroup() as tasks:
            verify = tasks.create_task(repo.verify(read_data=True, quarantine=False))
            restored = {g.id: tasks.create_task(restore(g.id)) for g in gens}
        report = verify.result()
        return {
            "restored": {gen_id: task.result() for gen_id, task in restored.items()},
            "ok": report.ok,
            "damaged": repr(report.damaged),
        }


def _child(request: dict[str, Any]) -> int:
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ.clear()  # the environment the request gives, as a new process would have
    os.environ.update(request["env"])
    signal.alarm(CHILD_TIMEOUT)
    if request["kind"] == "command":
        return _command(request["args"], request["at"], request["note"], request["mode"])
    try:
        result = asyncio.run(_look(request["env"]["DEDUPE_REPO"]))
    except BaseException:
        result = {"traceback": traceback.format_exc()}
    with open(request["note"], "w") as f:
        json.dump(result, f)
    return 0


def serve() -> None:
    """The helper's loop (conftest.serve_forks); the S3 client imported once too (a quarter
    of a second a child)."""
    serve_forks(_child, "aiobotocore.session", "botocore.config", "dedupe.backends.s3")


# --- in the test ---------------------------------------------------------------------------


class Helper(ForkHelper):
    """One helper interpreter (see `serve`), used by one worker thread at a time."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(__file__, workdir)


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[queue.Queue[Helper]]:
    workdir = tmp_path_factory.mktemp("crash-s3-helpers")
    yield from helper_pool(lambda: Helper(workdir), WORKERS)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
        keys = [
            obj["Key"]
            async for page in paginator.paginate(Bucket=source)
            for obj in page.get("Contents", ())
        ]
        await asyncio.gather(
            *(
                s3.copy_object(Bucket=target, Key=key, CopySource={"Bucket": source, "Key": key})
                for key in keys
            )
        )


_buckets = itertools.count()


class Bench:
    def __init__(
        self, endpoint: str, tmp: Path, env: dict[str, str], helpers: queue.Queue[Helper]
    ) -> None:
        self.endpoint, self.tmp, self.env, self.helpers = endpoint, tmp, env, helpers
        self.n = itertools.count()  # children's file names (trials run on several threads)
        self.state: dict[str, str] = {}  # location -> its client state directory
        self.template_state = os.environ["DEDUPE_STATE_DIR"]

    def _child(self, location: str, **request: Any) -> tuple[int, Path, str]:
        """A child forked by a free helper, as a client with the copy's own state: its exit
        code, its note, what it printed."""
        n = next(self.n)
        note, out = self.tmp / f"note-{n}.json", self.tmp / f"out-{n}.txt"
        env = dict(self.env, DEDUPE_REPO=location, DEDUPE_STATE_DIR=self.state[location])
        helper = self.helpers.get()
        try:
            code = helper.request(env=env, note=str(note), out=str(out), **request)
        finally:
            self.helpers.put(helper)
        return code, note, out.read_text(errors="replace")

    def run(
        self, location: str, args: list[str], at: int, mode: str = "crash"
    ) -> tuple[int, dict[str, Any], str]:
        code, note, output = self._child(location, kind="command", args=args, at=at, mode=mode)
        return code, json.loads(note.read_text()), output

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

    def looks(
        self,
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
        code, note, output = self._child(location, kind="look")
        assert code == 0, f"a look exited {code}: {output}"
        seen = json.loads(note.read_text())
        assert "traceback" not in seen, f"a look failed:\n{seen['traceback']}"
        restored: dict[str, str] = seen["restored"]
        ids = set(restored)
        assert set(committed) - {may_be_gone} <= ids, "a committed generation is gone"
        extra = ids - set(committed)
        assert len(extra) <= (most_new if new is not None else 0), extra
        for gen_id, sha in restored.items():
            want = committed.get(gen_id, new)
            assert want is not None and sha == _sha(want), gen_id
        assert seen["ok"], seen["damaged"]
        return ids

    def each(self, trial: Callable[[int], T], ats: list[int]) -> list[T]:
        """`trial(at)` for each point, WORKERS at a time (each on its own bucket); every
        failing point is named, the first one's traceback follows."""
        with ThreadPoolExecutor(WORKERS) as pool:
            jobs = [(at, pool.submit(trial, at)) for at in ats]
        results, failures = [], []
        for at, job in jobs:
            try:
                results.append(job.result())
            except Exception as e:  # an assertion, or a child that broke the protocol
                failures.append((at, e))
        if failures:
            summary = "\n".join(
                f"  #{at}: {(str(e) or repr(e)).splitlines()[0]}" for at, e in failures
            )
            raise AssertionError(
                f"{len(failures)} of {len(ats)} points fail:\n{summary}"
            ) from failures[0][1]
        return results


@pytest.fixture
def bench(
    s3_location: str, s3_endpoint: str, tmp_path: Path, helpers: queue.Queue[Helper]
) -> Bench:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    env.update(
        DEDUPE_PASSWORD=PASSPHRASE,
        DEDUPE_STATE_DIR=os.environ["DEDUPE_STATE_DIR"],
        DEDUPE_CACHE_DIR=os.environ["DEDUPE_CACHE_DIR"],
        PYTHONPATH=str(ROOT),
    )
    return Bench(s3_endpoint, tmp_path, env, helpers)


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

    def trial(k: int) -> str:
        location = bench.fresh(bucket)
        code, note, err = bench.run(location, args, k)
        assert code == CRASHED, f"crash point {k}: exit {code}, {err}"
        before = bench.looks(location, committed, new_data, 1, oldest)
        code, _note, err = bench.run(location, args, -1)
        assert code == 0, f"the re-run after crash point {k} failed: {err}"
        after = bench.looks(location, committed, new_data, 2, oldest)
        if command == "backup":
            assert len(after) == len(before) + 1  # the re-run committed its generation
        if command == "forget":
            assert oldest not in after  # the re-run finished the forget
        return str(note["crashed"])

    crashed_at = bench.each(trial, chosen)
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

    def trial(k: int) -> None:
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

    bench.each(trial, list(range(uploads)))
    print(f"backup on S3: {uploads} multipart uploads, each cut short in turn")
