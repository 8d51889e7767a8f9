"""The complete chunk tables of many generations, each manifest read and each delta
applied once (verify and prune need every generation's table).

`RepositoryStore.generation_chunks` expands one generation through its whole parent
chain. Called for each generation of a chain of n incrementals, it reads and applies
n(n+1)/2 manifests: 465 for a month of daily incrementals, each table 36 bytes per chunk.
Here generations are visited parents first, and an expanded table is kept only until the
last generation based on it has been expanded: for a chain of incrementals, one table
beside the one being built.

Directory trees, and generations whose parent is unknown (a manifest that does not open,
a parent forgotten meanwhile), go through `generation_chunks` on their own, so that they
fail, or succeed, exactly as they would there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from dedupe.format.delta import apply_delta
from dedupe.store.repository import RepositoryStore

HEADER_CONCURRENCY = 16

# (body meta, complete chunk table), or the exception expanding that generation raised.
Outcome = tuple[dict[str, Any], bytes] | Exception


async def each_generation_table(
    store: RepositoryStore, gen_ids: Iterable[str]
) -> AsyncIterator[tuple[str, Outcome]]:
    """(generation id, outcome) for every id in `gen_ids`, parents before the generations
    based on them. An error expanding one generation is handed out as its outcome, not
    raised, so that callers can report it and go on with the others."""
    ids = list(dict.fromkeys(gen_ids))
    parents = await _parents(store, ids)
    waiting = {g: 0 for g in ids}  # generations based on g still to expand
    for based_on in parents.values():
        if based_on in waiting:
            waiting[based_on] += 1
    expanded: dict[str, bytes] = {}

    for gen_id in _parents_first(ids, parents):
        parent = parents.get(gen_id)
        outcome: Outcome
        try:
            outcome = await _expand(store, gen_id, parent, expanded)
        except Exception as e:  # noqa: BLE001 - handed to the caller with its generation
            outcome = e
        if waiting[gen_id] and not isinstance(outcome, Exception):
            if outcome[0].get("type") == "stream":  # trees expand their own way
                expanded[gen_id] = outcome[1]
        if parent in waiting:
            waiting[parent] -= 1
            if not waiting[parent]:
                expanded.pop(parent, None)
        yield gen_id, outcome


async def _expand(
    store: RepositoryStore, gen_id: str, parent: str | None, expanded: dict[str, bytes]
) -> tuple[dict[str, Any], bytes]:
    _header, meta, own = await store.read_manifest(gen_id)
    delta = meta.get("delta")
    if meta.get("type") == "stream":
        if delta is None:
            return meta, own
        # The delta names its parent; the header's (which ordered the walk) must agree.
        if delta["parent"] == parent and parent in expanded:
            table = await asyncio.to_thread(
                apply_delta, expanded[parent], own, delta["ops"], f"generation {gen_id}"
            )
            return meta, table
    return await store.generation_chunks(gen_id)


async def _parents(store: RepositoryStore, ids: list[str]) -> dict[str, str]:
    """Each generation's parent, from the manifest headers (a few hundred bytes each).
    A generation whose header does not open is left out: it is expanded on its own."""
    sem = asyncio.Semaphore(HEADER_CONCURRENCY)
    parents: dict[str, str] = {}

    async def one(gen_id: str) -> None:
        async with sem:
            try:
                header = await store.read_manifest_header(gen_id)
            except Exception:  # noqa: BLE001 - reported when it is expanded
                return
        if header.get("parent"):
            parents[gen_id] = str(header["parent"])

    await asyncio.gather(*(one(g) for g in ids))
    return parents


def _parents_first(ids: list[str], parents: dict[str, str]) -> list[str]:
    """`ids` ordered so that a parent comes before the generations based on it, depth
    first (a branch is finished before the next starts, so few tables wait at once).
    Generations in a cycle come last, in the given order."""
    known = set(ids)
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for g in ids:
        p = parents.get(g)
        if p is not None and p in known:
            children.setdefault(p, []).append(g)
        else:
            roots.append(g)
    order: list[str] = []
    seen: set[str] = set()
    stack = list(reversed(roots))
    while stack:
        g = stack.pop()
        if g in seen:
            continue
        seen.add(g)
        order.append(g)
        stack.extend(reversed(children.get(g, [])))
    order.extend(g for g in ids if g not in seen)
    return order
