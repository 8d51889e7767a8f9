"""Run pipeline stages as one unit: all finish, or the first failure cancels the rest and
is raised as itself (not wrapped in an ExceptionGroup), so callers see a DedupeError."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from dedupe.errors import DedupeError


async def run_stages(*stages: Callable[[], Awaitable[None]]) -> None:
    try:
        async with asyncio.TaskGroup() as tg:
            for stage in stages:
                tg.create_task(stage())  # type: ignore[arg-type]
    except BaseExceptionGroup as group:
        # Operational errors first: when a source fails, a later stage may fail as a
        # consequence, and the user needs to hear about the cause.
        errors = list(_leaves(group))
        raise next((e for e in errors if isinstance(e, DedupeError)), errors[0]) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
