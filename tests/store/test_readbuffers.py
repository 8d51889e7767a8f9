"""ReadBuffers: pack reads reuse memory, but never memory that something still reads, and
the pool holds no more than its byte budget."""

from __future__ import annotations

import asyncio
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest

from dedupe.store.readbuffers import ReadBuffers

Run = Callable[..., Any]

MiB = 1024 * 1024


def address(view: memoryview) -> int:
    """Where the view's memory starts (ctypes sees through to the bytearray)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_returned_buffer_is_reused_and_sized_to_the_request(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(1, MiB)
        async with buffers.take(1000) as first:
            assert len(first) == 1000 and not first.readonly
            first[:] = b"a" * 1000
            where = address(first)
        async with buffers.take(900) as second:  # smaller: the same memory
            assert len(second) == 900
            assert address(second) == where
        async with buffers.take(5000) as bigger:  # larger: new memory, exact length
            assert len(bigger) == 5000

    run(go())


def test_a_buffer_still_viewed_is_not_reused(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(1, MiB)
        async with buffers.take(1000) as first:
            first[:] = b"x" * 1000
            kept = first[10:20]  # a caller that (wrongly) keeps a slice
        async with buffers.take(1000) as second:
            second[:] = b"y" * 1000
        assert bytes(kept) == b"x" * 10  # its bytes did not change under it

    run(go())


def test_a_buffer_exported_to_native_code_is_not_reused(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(1, MiB)
        async with buffers.take(100) as first:
            first[:] = b"x" * 100
            # A buffer export of the view itself, as a C reader holds while an executor
            # job outlives a cancelled task: the view cannot be released.
            held = pickle.PickleBuffer(first)
            where = address(first)
        async with buffers.take(100) as second:
            assert address(second) != where
            second[:] = b"y" * 100
        assert bytes(held.raw()) == b"x" * 100

    run(go())


def test_no_more_than_count_buffers_are_out(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(2, MiB)
        out = 0
        most = 0

        async def reader() -> None:
            nonlocal out, most
            async with buffers.take(64):
                out += 1
                most = max(most, out)
                await asyncio.sleep(0.01)
                out -= 1

        await asyncio.gather(*(reader() for _ in range(6)))
        assert most == 2

    run(go())


def test_count_and_budget_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReadBuffers(0, MiB)
    with pytest.raises(ValueError):
        ReadBuffers(1, 0)


def capacity(view: memoryview) -> int:
    """The length of the buffer under the view (its size plus headroom)."""
    return len(view.obj)  # type: ignore[arg-type]


async def settle() -> None:
    """Let every task that can run do so."""
    for _ in range(10):
        await asyncio.sleep(0)


async def no_wait(buffers: ReadBuffers, size: int) -> None:
    """A take that must be granted at once (a leaked slot or budget would hang it)."""

    async def go() -> None:
        async with buffers.take(size) as view:
            view[:] = bytes(size)

    await asyncio.wait_for(go(), 1)


def test_the_pool_never_holds_more_than_its_budget(run: Run) -> None:
    """Readers of varied sizes, some cancelled (waiting, or holding a buffer): the bytes
    the pool holds (its own count, and the buffers lent as measured) stay within the
    budget, and all of it comes back."""

    async def go() -> None:
        budget = 10_000
        buffers = ReadBuffers(6, budget)
        rng = random.Random(7)
        out: dict[int, memoryview] = {}  # by id: memoryviews compare by content
        most_out = 0
        most_held = 0

        async def reader(size: int, pause: int) -> None:
            nonlocal most_out, most_held
            async with buffers.take(size) as view:
                out[id(view)] = view
                try:
                    view[:] = b"r" * size
                    most_out = max(most_out, len(out))
                    most_held = max(most_held, buffers.held)
                    assert buffers.held <= budget
                    assert sum(capacity(v) for v in out.values()) <= buffers.held
                    for _ in range(pause):
                        await asyncio.sleep(0)
                finally:
                    del out[id(view)]

        tasks = [
            asyncio.create_task(reader(rng.randrange(1, 4_000), rng.randrange(1, 8)))
            for _ in range(200)
        ]
        cancelled = 0
        while not all(task.done() for task in tasks):
            await asyncio.sleep(0)
            task = rng.choice(tasks)
            if rng.random() < 0.2 and task.cancel():
                cancelled += 1
        errors = [task.exception() for task in tasks if not task.cancelled()]
        assert errors == [None] * len(errors)
        assert cancelled > 10
        assert most_out > 2  # the budget bounds, it does not serialise the readers
        assert most_held > budget // 2
        assert buffers.held <= budget and buffers.lent == 0
        await no_wait(buffers, budget)

    run(go())


def test_headroom_is_kept_only_as_far_as_the_budget_allows(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(4, 2_000)
        async with buffers.take(1_000) as first:
            assert capacity(first) == 1_125  # 1/8 headroom: room for it
            async with buffers.take(800) as second:
                assert capacity(second) == 875  # the 75 bytes left, not 100
                assert buffers.held == 2_000

    run(go())


def test_kept_buffers_make_room_and_the_best_fit_is_reused(run: Run) -> None:
    async def go() -> None:
        budget = 1_000
        buffers = ReadBuffers(4, budget)
        async with buffers.take(100) as small:  # 112 bytes with its headroom
            small_at = address(small)
            async with buffers.take(500) as medium:  # 562
                medium_at = address(medium)
        assert buffers.held == 112 + 562  # both fit: both kept
        async with buffers.take(90) as again:  # the smallest that is large enough
            assert address(again) == small_at
        async with buffers.take(400) as again:
            assert address(again) == medium_at
        # Neither is large enough: both go (not only the first) so that 900 and its
        # headroom fit.
        async with buffers.take(900) as large:
            assert capacity(large) == 1_000
            assert buffers.held == 1_000
        assert buffers.held == 1_000

    run(go())


def test_no_more_than_count_buffers_are_kept(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(2, MiB)
        async with buffers.take(100):  # 112 with its headroom
            async with buffers.take(200):  # 225
                pass
        assert buffers.held == 112 + 225
        async with buffers.take(300):  # neither is large enough; a third is one too many
            assert buffers.held == 225 + 337  # the smaller one went
        assert buffers.held == 225 + 337

    run(go())


def test_waiters_proceed_when_memory_comes_back(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(4, 1_000)
        release = asyncio.Event()
        entered: list[str] = []

        async def reader(name: str, size: int, hold: bool) -> int:
            async with buffers.take(size) as view:
                entered.append(name)
                if hold:
                    await release.wait()
                return address(view)

        first = asyncio.create_task(reader("first", 600, True))
        await settle()
        second = asyncio.create_task(reader("second", 600, False))
        await settle()
        assert entered == ["first"]  # 600 + 600 > 1000: the second waits
        assert buffers.held <= 1_000
        release.set()
        first_at, second_at = await asyncio.wait_for(asyncio.gather(first, second), 1)
        assert entered == ["first", "second"]
        assert second_at == first_at  # the same memory, come back
        assert buffers.lent == 0

    run(go())


def test_a_request_larger_than_the_budget_proceeds_alone(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(4, 1_000)

        async def alone() -> None:
            async with buffers.take(5_000) as view:  # nothing else out: granted
                assert len(view) == capacity(view) == 5_000  # no headroom past the budget
                view[:] = b"a" * 5_000
                assert buffers.held == 5_000

        await asyncio.wait_for(alone(), 1)
        assert buffers.held == 0  # not kept: the pool holds its budget at most

        release = asyncio.Event()
        entered: list[str] = []

        async def reader(name: str, size: int, hold: bool) -> None:
            async with buffers.take(size):
                entered.append(name)
                assert name == "big" or buffers.held <= 1_000
                if hold:
                    await release.wait()

        small = asyncio.create_task(reader("small", 400, True))
        await settle()
        big = asyncio.create_task(reader("big", 5_000, True))
        await settle()
        after = asyncio.create_task(reader("after", 100, False))
        await settle()
        assert entered == ["small"]  # the big one waits for the small one to go
        release.set()
        await asyncio.wait_for(asyncio.gather(small, big, after), 1)
        # The big one went alone: the small one after it (which would have fit beside the
        # first) waited until the big one was done.
        assert entered == ["small", "big", "after"]
        assert buffers.held <= 1_000 and buffers.lent == 0

    run(go())


def test_a_big_waiter_is_not_starved_by_small_ones(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(16, 1_000)
        entered: list[str] = []
        stop = False

        async def small(name: str) -> None:
            # A stream of short reads that, let past the waiting big one, would keep
            # more than 200 bytes out all the time.
            while not stop:
                async with buffers.take(100):
                    entered.append(name)
                    await asyncio.sleep(0)

        smalls = [asyncio.create_task(small(f"small{i}")) for i in range(4)]
        await settle()

        async def big() -> None:
            async with buffers.take(800):
                entered.append("big")

        try:
            await asyncio.wait_for(big(), 1)
        finally:
            stop = True
            await asyncio.gather(*smalls)
        assert "big" in entered
        assert buffers.held <= 1_000 and buffers.lent == 0

    run(go())


def test_a_cancelled_waiter_leaks_nothing_and_unblocks_those_behind_it(run: Run) -> None:
    async def go() -> None:
        budget = 1_000
        buffers = ReadBuffers(2, budget)
        release = asyncio.Event()
        entered: list[str] = []

        async def reader(name: str, size: int) -> None:
            async with buffers.take(size):
                entered.append(name)
                await release.wait()

        holder = asyncio.create_task(reader("holder", 800))
        await settle()
        held = buffers.held
        waiting = asyncio.create_task(reader("waiting", 800))
        await settle()
        behind = asyncio.create_task(reader("behind", 100))  # fits, but queues behind
        await settle()
        assert entered == ["holder"]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle()
        # The one behind goes in at once (the holder is still out), and nothing of the
        # cancelled one is counted.
        assert entered == ["holder", "behind"]
        assert buffers.lent == 2 and buffers.held == held + 100 == budget  # no headroom
        release.set()
        await asyncio.wait_for(asyncio.gather(holder, behind), 1)
        assert buffers.lent == 0 and buffers.held <= budget
        await no_wait(buffers, budget)
        await no_wait(buffers, budget)

    run(go())


def test_a_waiter_cancelled_once_granted_gives_its_buffer_back(run: Run) -> None:
    """The buffer comes back while the waiter is granted but has not run yet, and then it
    is cancelled: the buffer and slot it was given are returned, not lost."""

    async def go() -> None:
        budget = 1_000
        buffers = ReadBuffers(1, budget)
        entered: list[str] = []

        async def waiter() -> None:
            async with buffers.take(900):
                entered.append("waiter")

        async with buffers.take(900):
            task = asyncio.create_task(waiter())
            await settle()
            assert buffers.lent == 1
        # The block's end granted the waiter its buffer; it has not run yet.
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert entered == []
        assert buffers.lent == 0 and buffers.held == 1_000  # its buffer is kept, once
        await no_wait(buffers, budget)  # count 1: a leaked slot would hang this

    run(go())


def test_a_buffer_dropped_for_a_live_view_stops_counting(run: Run) -> None:
    async def go() -> None:
        budget = 1_000
        buffers = ReadBuffers(2, budget)
        async with buffers.take(800) as first:
            first[:] = b"x" * 800
            kept = first[:10]
            where = address(first)
        async with buffers.take(800) as second:
            held = pickle.PickleBuffer(second)
            second[:] = b"z" * 800
        # Neither is the pool's any more: it holds nothing, and a take of the whole
        # budget does not wait for them.
        assert buffers.held == 0 and buffers.lent == 0
        async with buffers.take(budget) as third:
            assert address(third) != where
            third[:] = b"y" * budget
        assert bytes(kept) == b"x" * 10
        assert bytes(held.raw()) == b"z" * 800

    run(go())
