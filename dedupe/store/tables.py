"""The complete chunk tables of many generations, each manifest read and each delta
applied once (verify and prune need every generation's table).

`RepositoryStore.generation_chunks` expands one generation through its whole parent
chain. Called for each generation of a chain of n incrementals, it reads and applies
n(n+1)/2 manifests: 465 for a month of daily incrementals, each table 36 bytes per chunk.
Here generations are visited parents first, and an expanded table is kept only until the
last generation based on it has been expanded: for a chain of incrementals, one table
beside the one being built.

A directory tree keeps its expanded tree (path -> entry) for the generations based on it,
as its deltas apply to entries, not to chunk records. Generations whose parent is unknown
(a manifest that does not open, a parent forgotten meanwhile) go through
`generation_chunks` on their own, so that they fail, or succeed, exactly as they would
there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, BinaryIO

from dedupe.errors import GenerationNotFound, IntegrityError, MissingObject
from dedupe.format.delta import COPY, apply_delta, delta_ranges
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import (
    Entry,
    apply_tree_delta,
    complete_table,
    decode_tree,
    ordered_entries,
)
from dedupe.store.manifests import open_scratch, read_scratch, write_scratch
from dedupe.store.repository import RepositoryStore

HEADER_CONCURRENCY = 16
# Records copied per read while a delta is applied from file to file (~1 MiB).
COPY_RECORDS = 29127
_R = CHUNK_RECORD.size

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
    # What the generations still to come are based on: a stream's complete table, a
    # tree's expanded tree.
    expanded: dict[str, bytes | dict[str, Entry]] = {}

    for gen_id in _parents_first(ids, parents):
        parent = parents.get(gen_id)
        outcome: Outcome
        try:
            outcome, kept = await _expand(store, gen_id, parent, expanded)
        except Exception as e:  # noqa: BLE001 - handed to the caller with its generation
            outcome, kept = e, None
        if waiting[gen_id] and kept is not None:
            expanded[gen_id] = kept
        if parent in waiting:
            waiting[parent] -= 1
            if not waiting[parent]:
                expanded.pop(parent, None)
        yield gen_id, outcome


async def _expand(
    store: RepositoryStore,
    gen_id: str,
    parent: str | None,
    expanded: dict[str, bytes | dict[str, Entry]],
) -> tuple[tuple[dict[str, Any], bytes], bytes | dict[str, Entry] | None]:
    """(meta, complete table) of a generation, and what to keep for those based on it."""
    header, meta, own = await store.read_manifest(gen_id)
    delta = meta.get("delta")
    what = f"generation {gen_id}"
    # The delta names its parent; the header's (which ordered the walk) must agree.
    base = None
    if delta is not None and parent is not None and delta["parent"] == parent:
        base = expanded.get(parent)
    if meta.get("type") == "stream":
        if delta is None:
            return (meta, own), own
        if isinstance(base, bytes):
            table = await asyncio.to_thread(
                apply_delta, base, own, delta["ops"], what, int(header["chunks"])
            )
            return (meta, table), table
    elif meta.get("type") == "tree" and (delta is None or isinstance(base, dict)):
        tree_base = base if isinstance(base, dict) else None
        tree, table = await asyncio.to_thread(_tree_step, tree_base, meta, own, what)
        return (meta, table), tree
    return await store.generation_chunks(gen_id), None


def _tree_step(
    base: dict[str, Entry] | None, meta: dict[str, Any], own: bytes, what: str
) -> tuple[dict[str, Entry], bytes]:
    tree = dict(base) if base is not None else {}  # `base` may serve other generations
    entries, deleted = decode_tree(meta, own, what)
    apply_tree_delta(tree, entries, deleted)
    return tree, complete_table(ordered_entries(tree, what))


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


# --- a stream generation's complete table in a file -------------------------------------


class SpilledTable:
    """A complete chunk table in an unnamed temporary file: `records` CHUNK_RECORDs,
    iterated in pieces of COPY_RECORDS (~1 MiB), and the body meta of its generation.
    Close it when done (it is a context manager)."""

    def __init__(self, file: BinaryIO, records: int, meta: dict[str, Any]) -> None:
        self.file, self.records, self.meta = file, records, meta

    def __iter__(self) -> Iterator[bytes]:
        return read_scratch(self.file, 0, self.records * _R, COPY_RECORDS * _R)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> SpilledTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def spill_complete_table(store: RepositoryStore, gen_id: str) -> SpilledTable:
    """The complete chunk table of stream generation `gen_id`, its chain expanded from
    the full down, file to file, with its own meta. What is held in memory is a frame, a
    copy buffer and the ops of the chain's deltas, however large the tables: an
    incremental backup compares its own table with the file
    (dedupe.format.delta.DeltaBuilder), a restore reads it piece by piece."""
    # (gen id, meta, own table, its records, its complete table's records), up to the full
    levels: list[tuple[str, dict[str, Any], BinaryIO, int, int]] = []
    try:
        current: str | None = gen_id
        while current is not None:
            if any(current == g for g, *_ in levels):
                raise IntegrityError(f"generation {gen_id} has a cycle in its parent chain")
            own = open_scratch()
            levels.append((current, {}, own, 0, 0))
            try:
                header, meta, n = await store.spill_manifest(current, own)
            except GenerationNotFound:
                raise MissingObject(
                    f"generation {current}, which {gen_id} is based on, is missing",
                    hint="the chain is broken: restore another generation, back up a full",
                ) from None
            if meta.get("type") != "stream":
                raise IntegrityError(f"generation {current} is not a stream generation")
            levels[-1] = (current, meta, own, n, int(header["chunks"]))
            delta = meta.get("delta")
            current = str(delta["parent"]) if delta else None
        own_meta = levels[0][1]
        _gid, _meta, table, n_table, _c = levels.pop()
    except BaseException:
        for _g, _m, f, _n, _c in levels:
            f.close()
        raise
    try:  # from the full down: each delta applied to the table above it
        while levels:
            gid, meta, own, n_own, n_complete = levels.pop()
            try:
                out = open_scratch()
                try:
                    n_out = await asyncio.to_thread(
                        _apply_delta_files,
                        table,
                        n_table,
                        own,
                        n_own,
                        meta["delta"]["ops"],
                        out,
                        f"generation {gid}",
                        n_complete,
                    )
                except BaseException:
                    out.close()
                    raise
            finally:
                own.close()
            table.close()
            table, n_table = out, n_out
        table.flush()
    except BaseException:
        table.close()
        for _g, _m, f, _n, _c in levels:
            f.close()
        raise
    return SpilledTable(table, n_table, own_meta)


def _apply_delta_files(
    parent: BinaryIO,
    n_parent: int,
    literal: BinaryIO,
    n_literal: int,
    ops: list[Any],
    out: BinaryIO,
    what: str,
    expected: int,
) -> int:
    """apply_delta from file to file; returns the records written (checked against
    `expected`, the header's count, before any is written)."""
    parent.flush()
    literal.flush()
    written = 0
    for kind, start, count in delta_ranges(ops, n_parent, n_literal, what, expected):
        source = parent if kind == COPY else literal
        for piece in read_scratch(source, start * _R, (start + count) * _R, COPY_RECORDS * _R):
            write_scratch(out, piece)
        written += count
    return written
