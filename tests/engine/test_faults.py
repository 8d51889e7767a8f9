"""Faults during a backup: a source that fails, a backend that fails, a cancelled task.

After each one the repository must be as if the failed backup had never started: no new
generation, the repository opens, earlier generations restore byte-exact, and the next
backup works (docs/FORMAT.md section 9: a crash or failure at any point leaves a valid
repository, at worst with unreferenced packs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import random
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import PASSPHRASE, SMALL_PACK, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.backends.base import Buffer
from dedupe.crypto import KdfParams
from dedupe.engine.outfile import OutputFile
from dedupe.errors import BackendError, DedupeError

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
KiB = 1024
MiB = 1024 * KiB


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def restored(repo: Repository, gen: str) -> bytes:
    out = io.BytesIO()
    await repo.restore(gen, out)
    return out.getvalue()


def leftovers(repo_path: Path) -> list[str]:
    """Temporary files the local backend left in the repository."""
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(repo_path)
        for f in files
        if f.startswith(".tmp-")
    ]


async def check_intact(repo_path: Path, expected: dict[str, bytes]) -> None:
    """Reopen the repository from its path: exactly the expected generations, each exact."""
    async with await Repository.open(repo_path, PASSPHRASE) as repo:
        gens = await repo.generations()
        assert sorted(g.id for g in gens) == sorted(expected)
        for gen, data in expected.items():
            assert await restored(repo, gen) == data


# --- a failing source ---------------------------------------------------------------------------


class FailingReader(io.RawIOBase):
    """A binary file object that returns `block`-sized reads and raises EIO on read
    number `fail_on`."""

    def __init__(self, data: bytes, fail_on: int, block: int = 64 * KiB) -> None:
        self.data = data
        self.pos = 0
        self.calls = 0
        self.fail_on = fail_on
        self.block = block

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError(errno.EIO, "Input/output error")
        n = self.block if size < 0 else min(size, self.block)
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


async def failing_stream(data: bytes, fail_on: int, block: int = 64 * KiB) -> AsyncIterator[bytes]:
    for i, pos in enumerate(range(0, len(data), block), start=1):
        if i == fail_on:
            raise OSError(errno.EIO, "Input/output error")
        yield data[pos : pos + block]


@pytest.mark.parametrize("kind", ["fileobj", "async"])
@pytest.mark.parametrize("fail_on", [1, 5])
def test_source_failing_on_the_nth_read(
    run: Run[None], repo_path: Path, kind: str, fail_on: int
) -> None:
    old = random_bytes(400 * KiB, seed=1)
    new = random_bytes(800 * KiB, seed=2)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = (await repo.backup(io.BytesIO(old), name="db")).id
            source: Any = (
                FailingReader(new, fail_on) if kind == "fileobj" else failing_stream(new, fail_on)
            )
            with pytest.raises((DedupeError, OSError)) as info:
                await repo.backup(source, name="db")
            # the cause is named, not lost behind a consequence
            assert "Input/output error" in str(info.value)
            assert [g.id for g in await repo.generations()] == [first]
            assert await restored(repo, first) == old

            # the same open repository takes the next backup
            again = (await repo.backup(io.BytesIO(new), name="db")).id
            assert await restored(repo, again) == new
        await check_intact(repo_path, {first: old, again: new})

    run(go())
    assert leftovers(repo_path) == []


def test_source_failing_reports_source_error_for_file_objects(
    run: Run[None], repo_path: Path
) -> None:
    from dedupe.errors import SourceError

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises(SourceError):
                await repo.backup(FailingReader(random_bytes(300 * KiB, 3), 3), name="db")
            assert await repo.generations() == []

    run(go())


def test_source_failing_after_a_failed_backup_then_reopen_and_backup(
    run: Run[None], repo_path: Path
) -> None:
    """A fresh process (a reopened repository) continues after a failed backup; the chunks
    the failed backup stored without an index object are stored again, correctly."""
    data = random_bytes(600 * KiB, seed=4)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises((DedupeError, OSError)):
                await repo.backup(failing_stream(data, 9), name="db")
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert await repo.generations() == []
            gen = (await repo.backup(io.BytesIO(data), name="db")).id
            assert await restored(repo, gen) == data
        await check_intact(repo_path, {gen: data})

    run(go())


def test_source_file_truncated_while_mapped_fails_without_a_commit(
    run: Run[None], repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is read as mapped windows (MapReader). Another process truncates it after
    the reader handed out a window but before the pipeline read that window's bytes: they
    read as zeros, so the backup must fail with SourceError and commit nothing."""
    from dedupe.chunking import MapReader
    from dedupe.engine import sources
    from dedupe.errors import SourceError

    window = 256 * KiB
    data = random_bytes(6 * window, seed=6)
    path = tmp_path / "db"
    path.write_bytes(data)

    class TruncatedAfterSecondWindow(MapReader):
        reads = 0

        def __init__(self, size: int) -> None:
            super().__init__(window)

        def read(self, fd: int) -> Any:
            block = super().read(fd)
            self.reads += 1
            if self.reads == 2:  # the second window is mapped and not yet read by anyone
                os.truncate(path, window)
            return block

    monkeypatch.setattr(sources, "MapReader", TruncatedAfterSecondWindow)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises(SourceError, match="shrank while it was being read"):
                await repo.backup(str(path), name="db")
            assert await repo.generations() == []
            assert (await repo.verify(read_data=True)).ok
            # the file, stable again (and shorter), backs up and restores exactly
            again = (await repo.backup(str(path), name="db")).id
            assert await restored(repo, again) == data[:window]

    run(go())
    assert leftovers(repo_path) == []


# --- a failing backend --------------------------------------------------------------------------


class FlakyBackend(LocalBackend):
    """A local backend whose `fail_on`-th put of an object under `prefix` raises
    BackendError (counted from `arm`), as a full disk or a lost connection would."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.prefix = ""
        self.fail_on: int | None = None
        self.puts = 0
        self.failed: list[str] = []

    def arm(self, fail_on: int | None, prefix: str = "") -> None:
        self.fail_on, self.prefix, self.puts = fail_on, prefix, 0

    def count_put(self, name: str) -> None:
        if self.fail_on is not None and name.startswith(self.prefix):
            self.puts += 1
            if self.puts == self.fail_on:
                self.failed.append(name)
                raise BackendError(f"injected failure writing {name}")

    async def put(self, name: str, data: bytes | memoryview) -> None:
        self.count_put(name)
        await super().put(name, data)

    async def put_stream(self, name: str, parts: Iterable[Buffer]) -> None:
        self.count_put(name)  # manifests are stored from their spilled frames
        await super().put_stream(name, parts)


@pytest.mark.parametrize(
    ("prefix", "fail_on"),
    [
        ("packs/", 1),  # the first pack
        ("packs/", 4),  # a later pack, with earlier ones already written
        ("index/", 1),  # every pack written, the index object fails
        ("generations/", 1),  # everything but the commit point
        ("", 2),  # the second put of any kind
    ],
)
def test_backend_failing_the_nth_put(
    run: Run[None], repo_path: Path, prefix: str, fail_on: int
) -> None:
    old = random_bytes(300 * KiB, seed=5)
    new = old[: 100 * KiB] + random_bytes(600 * KiB, seed=6)  # shares chunks with `old`

    async def go() -> None:
        backend = FlakyBackend(repo_path)
        repo = await Repository.init(
            backend, PASSPHRASE, pack_size=SMALL_PACK, kdf=KdfParams.weakest()
        )
        async with repo:
            first = (await repo.backup(io.BytesIO(old), name="db")).id
            backend.arm(fail_on, prefix)
            with pytest.raises(BackendError, match="injected failure"):
                await repo.backup(io.BytesIO(new), name="db")
            assert backend.failed, "the injected failure never happened"
            assert [g.id for g in await repo.generations()] == [first]
            assert await restored(repo, first) == old

            backend.arm(None)
            again = (await repo.backup(io.BytesIO(new), name="db")).id
            assert await restored(repo, again) == new

        # the same objects, opened through a Backend instance and through the path
        async with await Repository.open(FlakyBackend(repo_path), PASSPHRASE) as reopened:
            assert await restored(reopened, first) == old
        await check_intact(repo_path, {first: old, again: new})

    run(go())
    assert leftovers(repo_path) == []


def test_backend_failing_every_put_after_a_point_leaves_earlier_generations(
    run: Run[None], repo_path: Path
) -> None:
    old = random_bytes(200 * KiB, seed=7)

    class Full(FlakyBackend):
        def count_put(self, name: str) -> None:
            if self.fail_on is not None:
                raise BackendError(f"injected: no space left writing {name}")

    async def go() -> None:
        backend = Full(repo_path)
        async with await Repository.init(
            backend, PASSPHRASE, pack_size=SMALL_PACK, kdf=KdfParams.weakest()
        ) as repo:
            first = (await repo.backup(io.BytesIO(old), name="db")).id
            backend.arm(1)
            for seed in (8, 9):  # fails twice in a row without damage
                with pytest.raises(BackendError):
                    await repo.backup(io.BytesIO(random_bytes(500 * KiB, seed)), name="db")
            assert [g.id for g in await repo.generations()] == [first]
        await check_intact(repo_path, {first: old})

    run(go())


# --- cancellation -------------------------------------------------------------------------------

BIG = 64 * MiB
BLOCK = 1 * MiB


class LazySource:
    """BIG bytes of pseudo-random data made block by block as the backup asks for them;
    sets `started` once `after` blocks were consumed and counts what was handed out."""

    def __init__(self, seed: int, after: int) -> None:
        self.seed = seed
        self.after = after
        self.handed_out = 0
        self.started = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        rng = random.Random(self.seed)
        for i in range(BIG // BLOCK):
            if i == self.after:
                self.started.set()
            self.handed_out += BLOCK
            yield rng.randbytes(BLOCK)


@pytest.mark.parametrize("after", [1, 6])
def test_cancelled_backup_leaves_the_repository_as_it_was(
    run: Run[None], repo_path: Path, after: int
) -> None:
    old = random_bytes(300 * KiB, seed=10)
    new = random_bytes(500 * KiB, seed=11)

    async def go() -> None:
        async with await make_repo(repo_path, pack_size=MiB) as repo:
            first = (await repo.backup(io.BytesIO(old), name="db")).id
            source = LazySource(seed=12, after=after)
            task = asyncio.create_task(repo.backup(source, name="big"))
            await source.started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()
            consumed = source.handed_out
            assert consumed < BIG  # the backup stopped reading
            await asyncio.sleep(0)
            assert source.handed_out == consumed  # and does not go on in the background

            assert [g.id for g in await repo.generations()] == [first]
            assert await restored(repo, first) == old
            again = (await repo.backup(io.BytesIO(new), name="db")).id
            assert await restored(repo, again) == new

        await check_intact(repo_path, {first: old, again: new})

    run(go())
    assert leftovers(repo_path) == []


def test_cancelled_backup_then_the_same_stream_backs_up(run: Run[None], repo_path: Path) -> None:
    """Whatever the cancelled backup stored (packs without an index object) does not
    confuse a later backup of the same data."""
    data = random_bytes(6 * MiB, seed=13)

    async def slow_source(started: asyncio.Event) -> AsyncIterator[bytes]:
        for i, pos in enumerate(range(0, len(data), 256 * KiB)):
            if i == 12:
                started.set()
                await asyncio.sleep(0.05)  # let the pipeline write a pack or two
            yield data[pos : pos + 256 * KiB]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            started = asyncio.Event()
            task = asyncio.create_task(repo.backup(slow_source(started), name="db"))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await repo.generations() == []
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            gen = (await repo.backup(io.BytesIO(data), name="db")).id
            assert await restored(repo, gen) == data

    run(go())


def test_cancelled_restore_to_path_leaves_no_file(
    run: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    data = random_bytes(20 * MiB, seed=14)  # more than one restore window
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    async def go() -> None:
        async with await make_repo(repo_path, pack_size=MiB) as repo:
            gen = (await repo.backup(io.BytesIO(data), name="db")).id
            some_written = asyncio.Event()

            def progress(p: Any) -> None:
                if p.bytes_written > 0:
                    some_written.set()

            task = asyncio.create_task(repo.restore(gen, out_dir / "db.bin", progress=progress))
            await some_written.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert os.listdir(out_dir) == []
            await repo.restore(gen, out_dir / "db.bin")
            assert (out_dir / "db.bin").read_bytes() == data

    run(go())


def _restore_write_running() -> bool:
    """Whether some thread is inside the restore's blocking write of a window."""
    code = OutputFile.write.__code__
    for frame in sys._current_frames().values():
        f: Any = frame
        while f is not None:
            if f.f_code is code:
                return True
            f = f.f_back
    return False


def test_cancelled_restore_never_writes_into_a_reused_descriptor(
    run: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """Cancelling a restore while a window is being written on a worker thread must not let
    that write go on after the target's descriptor was closed: the number is reused by the
    next file the application opens, which would receive the rest of the window.

    The test cancels while the write is running (seen in the thread's frames), opens a file
    at once as an embedding application might, lets any orphaned write finish, and checks
    the file is untouched. Several attempts, since the write may finish before the cancel.
    """
    data = random_bytes(20 * MiB, seed=15)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    async def go() -> None:
        async with await make_repo(repo_path, pack_size=MiB) as repo:
            gen = (await repo.backup(io.BytesIO(data), name="db")).id
            for attempt in range(6):
                writing = asyncio.Event()

                def progress(p: Any, writing: asyncio.Event = writing) -> None:
                    if p.bytes_written:
                        writing.set()

                target = out_dir / f"db{attempt}.bin"
                task = asyncio.create_task(repo.restore(gen, target, progress=progress))
                await writing.wait()
                while not _restore_write_running() and not task.done():
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                victim = tmp_path / f"victim{attempt}"
                fd = os.open(victim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    while _restore_write_running():
                        await asyncio.sleep(0.001)
                finally:
                    os.close(fd)
                assert victim.stat().st_size == 0, (
                    f"attempt {attempt}: a file opened after the restore was cancelled received "
                    f"{victim.stat().st_size} bytes of the restored stream"
                )
                if task.cancelled():
                    assert os.listdir(out_dir) == []
                else:
                    target.unlink()

    run(go())
