"""ReadBuffers: pack reads reuse memory, but never memory that something still reads."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from dedupe.store.readbuffers import ReadBuffers

Run = Callable[..., Any]


def address(view: memoryview) -> int:
    """Where the view's memory starts (ctypes sees through to the bytearray)."""
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_a_returned_buffer_is_reused_and_sized_to_the_request(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(1)
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
        buffers = ReadBuffers(1)
        async with buffers.take(1000) as first:
            first[:] = b"x" * 1000
            kept = first[10:20]  # a caller that (wrongly) keeps a slice
        async with buffers.take(1000) as second:
            second[:] = b"y" * 1000
        assert bytes(kept) == b"x" * 10  # its bytes did not change under it

    run(go())


def test_a_buffer_exported_to_native_code_is_not_reused(run: Run) -> None:
    async def go() -> None:
        buffers = ReadBuffers(1)
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
        buffers = ReadBuffers(2)
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


def test_count_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReadBuffers(0)
