"""The Backend contract (dedupe/backends/base.py), run against every backend we have."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from conftest import closed

from dedupe.backends import Backend, LocalBackend
from dedupe.backends.s3 import S3Backend
from dedupe.errors import MissingObject, ObjectChanged, ScratchError, TruncatedObject


class ReadIntoViaGet(LocalBackend):
    """A backend that keeps the contract's default read_into (a copy of what get returns)
    and put_stream (the pieces joined, then put)."""

    read_into = Backend.read_into
    put_stream = Backend.put_stream


@pytest.fixture(params=["local", "defaults", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield LocalBackend(tmp_path / "store")
    elif request.param == "defaults":
        yield ReadIntoViaGet(tmp_path / "store")
    elif request.param == "s3":
        yield S3Backend(request.getfixturevalue("s3_location"))


def test_put_get_ranges(run: Callable, backend: Backend) -> None:  # type: ignore[type-arg]
    data = os.urandom(100_000)

    async def go() -> None:
        await backend.put("packs/ab/abcd", data)
        assert await backend.get("packs/ab/abcd") == data
        assert await backend.get("packs/ab/abcd", 10, 100) == data[10:110]
        assert await backend.get("packs/ab/abcd", 99_000) == data[99_000:]
        assert await backend.stat("packs/ab/abcd") == len(data)
        with pytest.raises(TruncatedObject):
            await backend.get("packs/ab/abcd", 99_990, 100)
        with pytest.raises(MissingObject):
            await backend.get("packs/ab/nope")
        with pytest.raises(MissingObject):
            await backend.stat("packs/ab/nope")
        await backend.put("packs/ab/abcd", b"replaced")
        assert await backend.get("packs/ab/abcd") == b"replaced"

    run(closed(backend, go()))


def test_read_into(run: Callable, backend: Backend) -> None:  # type: ignore[type-arg]
    data = os.urandom(100_000)

    async def go() -> None:
        await backend.put("packs/ab/abcd", data)
        buf = bytearray(b"\xee" * 200)
        view = memoryview(buf)
        await backend.read_into("packs/ab/abcd", 10, view[:100])
        assert buf[:100] == data[10:110]
        assert buf[100:] == b"\xee" * 100  # nothing past the view is touched
        await backend.read_into("packs/ab/abcd", 99_900, view[50:150])
        assert buf[50:150] == data[99_900:]
        await backend.read_into("packs/ab/abcd", 0, view[:0])
        whole = bytearray(len(data))
        await backend.read_into("packs/ab/abcd", 0, memoryview(whole))
        assert whole == data
        with pytest.raises(TruncatedObject, match="packs/ab/abcd"):
            await backend.read_into("packs/ab/abcd", 99_990, view[:100])
        with pytest.raises(MissingObject):
            await backend.read_into("packs/ab/nope", 0, view[:10])

    run(closed(backend, go()))


def test_list_exists_delete(run: Callable, backend: Backend) -> None:  # type: ignore[type-arg]
    async def go() -> None:
        assert await backend.list("index/") == []
        for name in ("index/1", "index/2", "packs/00/x", "config"):
            await backend.put(name, name.encode())
        assert sorted(await backend.list("index/")) == ["index/1", "index/2"]
        assert sorted(await backend.list("packs/")) == ["packs/00/x"]
        assert await backend.exists("config") and not await backend.exists("nope")
        await backend.delete("index/1")
        assert await backend.list("index/") == ["index/2"]
        with pytest.raises(MissingObject):
            await backend.delete("index/1")

    run(closed(backend, go()))


def test_put_stream(run: Callable, backend: Backend, tmp_path: Path) -> None:  # type: ignore[type-arg]
    pieces = [os.urandom(n) for n in (0, 1, 70_000, 5, 1 << 20)]

    def failing() -> Iterator[bytes]:
        yield pieces[2]
        raise ScratchError("the spill could not be read")

    async def go() -> None:
        await backend.put_stream(
            "generations/g",
            iter([pieces[0], bytearray(pieces[1]), memoryview(pieces[2]), *pieces[3:]]),
        )
        assert await backend.get("generations/g") == b"".join(pieces)
        with pytest.raises(ScratchError, match="could not be read"):
            await backend.put_stream("generations/h", failing())
        assert await backend.list("generations/") == ["generations/g"]
        assert not await backend.exists("generations/h")
        assert await backend.remove_leftovers() == 0  # the failed one left no temporary

    run(closed(backend, go()))


def test_local_put_leaves_no_temp_files(run: Callable, tmp_path: Path) -> None:  # type: ignore[type-arg]
    backend = LocalBackend(tmp_path / "store")
    run(backend.put("a/b", b"x" * 1000))
    assert [p.name for p in (tmp_path / "store" / "a").iterdir()] == ["b"]


def test_leftovers_of_killed_puts_are_removed(run: Callable, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """A put killed before its rename leaves a temporary file that no listing shows; the
    backend removes it when asked (prune does, under its exclusive lock)."""

    async def go() -> None:
        backend = LocalBackend(tmp_path / "store")
        await backend.put("packs/ab/abcd", b"kept")
        left = tmp_path / "store" / "packs" / "ab" / ".tmp-0123456789abcdef"
        left.write_bytes(b"half a pack")
        assert await backend.list("packs/") == ["packs/ab/abcd"]
        assert await backend.remove_leftovers() == 1
        assert not left.exists() and await backend.get("packs/ab/abcd") == b"kept"
        assert await backend.remove_leftovers() == 0

    run(go())


# --- conditional writes: what locks stand on ---------------------------------------------------


def test_conditional_writes_change_nothing_unless_their_condition_holds(
    run: Callable,  # type: ignore[type-arg]
    backend: Backend,
) -> None:
    """create_new only where nothing is; swap and delete_if only over the exact bytes
    expected; a missing object is never brought back by a swap."""

    async def go() -> None:
        await backend.create_new("locks/a", b"first")
        with pytest.raises(ObjectChanged):
            await backend.create_new("locks/a", b"second")
        assert await backend.get("locks/a") == b"first"

        with pytest.raises(ObjectChanged):
            await backend.swap("locks/a", b"third", expected=b"not what it holds")
        assert await backend.get("locks/a") == b"first"
        await backend.swap("locks/a", b"third", expected=b"first")
        assert await backend.get("locks/a") == b"third"

        with pytest.raises(ObjectChanged):
            await backend.delete_if("locks/a", expected=b"first")
        assert await backend.get("locks/a") == b"third"
        await backend.delete_if("locks/a", expected=b"third")
        assert not await backend.exists("locks/a")

        with pytest.raises(MissingObject):
            await backend.swap("locks/a", b"back", expected=b"third")
        with pytest.raises(MissingObject):
            await backend.delete_if("locks/a", expected=b"third")
        assert await backend.list("locks/") == []  # nothing resurrected, no temporary left
        with pytest.raises(MissingObject):  # not even a directory for it
            await backend.delete_if("nowhere/a", expected=b"")
        with pytest.raises(MissingObject):
            await backend.swap("nowhere/a", b"back", expected=b"")

    run(closed(backend, go()))


def test_racing_conditional_writes_have_one_winner(
    run: Callable,  # type: ignore[type-arg]
    backend: Backend,
) -> None:
    """Many concurrent create_new of one name, then many concurrent swaps from the same
    expected bytes: exactly one of each succeeds, and the object holds the winner's bytes
    (on worker threads, so the file system sees them interleave)."""

    async def go() -> None:
        contenders = [f"contender {i}".encode() for i in range(16)]

        async def attempt(job: Awaitable[None], data: bytes) -> bytes | None:
            try:
                await job
            except (ObjectChanged, MissingObject):
                return None
            return data

        for _round in range(5):
            won = await asyncio.gather(
                *(attempt(backend.create_new("locks/r", d), d) for d in contenders)
            )
            winners = [w for w in won if w is not None]
            assert len(winners) == 1 and await backend.get("locks/r") == winners[0]
            base = winners[0]
            won = await asyncio.gather(
                *(attempt(backend.swap("locks/r", d + b"'", base), d + b"'") for d in contenders)
            )
            winners = [w for w in won if w is not None]
            assert len(winners) == 1 and await backend.get("locks/r") == winners[0]
            await backend.delete("locks/r")

    run(closed(backend, go()))
