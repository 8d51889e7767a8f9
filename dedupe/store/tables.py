"""The complete chunk tables of many generations, each manifest read and each delta
applied once (verify, prune and stats need every generation's table).

`RepositoryStore.generation_chunks` expands one generation through its whole parent
chain. Called for each generation of a chain of n incrementals, it reads and applies
n(n+1)/2 manifests: 465 for a month of daily incrementals, each table 36 bytes per chunk.
Here generations are visited parents first, and an expanded table is kept only until the
last generation based on it has been expanded: for a chain of incrementals, one table
beside the one being built. Tables are read and kept as spools (in memory up to
SPOOL_MEMORY in all, then in scratch files) and handed out as `Table`s read piece by
piece, so that a walk over generations of millions of chunks holds a few MiB, not two
complete tables (72 MiB at 4 GiB of 4 KiB pages).

A directory tree keeps its expanded tree (path -> entry) for the generations based on it,
as its deltas apply to entries, not to chunk records. Generations whose parent is unknown
(a manifest that does not open, a parent forgotten meanwhile) go through
`generation_chunks` on their own, so that they fail, or succeed, exactly as they would
there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol

from dedupe.errors import IntegrityError
from dedupe.format.delta import Pieces, compose, compose_chain, delta_ranges, whole
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import (
    Entry,
    apply_tree_delta,
    complete_table,
    decode_tree,
    ordered_entries,
)
from dedupe.store.manifests import Buffer, open_scratch, read_scratch, write_scratch
from dedupe.store.repository import RepositoryStore

HEADER_CONCURRENCY = 16
# Records copied per read while a delta is applied from file to file (~1 MiB).
COPY_RECORDS = 29127
# Read windows a composed table's writing keeps, one per source at most (_write_pieces):
# the full's table and the newest literal tables are what a forward pass goes back to.
WINDOWS_HELD = 4
_R = CHUNK_RECORD.size


class Table:
    """A generation's complete chunk table as each_generation_table hands it out:
    `records` CHUNK_RECORDs, iterated in pieces of whole records (at most COPY_RECORDS
    each), read from memory or from scratch files. It is readable until the walk is asked
    for its next generation, which may release what it is read from."""

    def __init__(self, sources: Sequence[_Source], pieces: Pieces, records: int) -> None:
        self._sources, self._pieces, self.records = sources, pieces, records

    def __iter__(self) -> Iterator[Buffer]:
        for s, first, n in zip(*self._pieces, strict=True):
            yield from self._sources[s].pieces(first * _R, (first + n) * _R)

    @classmethod
    def held(cls, table: bytes) -> Table:
        """A table already in memory."""
        records = len(table) // _R
        return cls([_Held(table)], whole(records), records)


# (body meta, complete chunk table), or the exception expanding that generation raised.
Outcome = tuple[dict[str, Any], Table] | Exception


async def each_generation_table(
    store: RepositoryStore, gen_ids: Iterable[str]
) -> AsyncIterator[tuple[str, Outcome]]:
    """(generation id, outcome) for every id in `gen_ids`, parents before the generations
    based on them. An error expanding one generation is handed out as its outcome, not
    raised, so that callers can report it and go on with the others.

    What is held in memory is bounded whatever the tables' size: a stream generation's
    own table and the complete tables kept for the generations based on them are spools
    that share SPOOL_MEMORY, past which they are scratch files (a full's own table is
    its complete table; a delta's complete table is written out only when generations
    are based on it). A tree's expanded tree is held in memory."""
    ids = list(dict.fromkeys(gen_ids))
    parents = await _parents(store, ids)
    waiting = {g: 0 for g in ids}  # generations based on g still to expand
    for based_on in parents.values():
        if based_on in waiting:
            waiting[based_on] += 1
    budget = _Budget(SPOOL_MEMORY)
    # What the generations still to come are based on: a stream's complete table, a
    # tree's expanded tree.
    expanded: dict[str, _Spool | dict[str, Entry]] = {}
    try:
        for gen_id in _parents_first(ids, parents):
            parent = parents.get(gen_id)
            outcome: Outcome
            step = _Step(budget, keep=waiting[gen_id] > 0)
            try:
                try:
                    outcome = await _expand(store, gen_id, parent, expanded, step)
                except Exception as e:  # noqa: BLE001 - handed to the caller with its generation
                    outcome = e
                    step.close()
                kept = step.take_kept()
                if kept is not None:
                    expanded[gen_id] = kept
                yield gen_id, outcome
            finally:
                step.close()
            if parent in waiting:
                waiting[parent] -= 1
                if not waiting[parent]:
                    _release(expanded.pop(parent, None))
    finally:
        for kept in expanded.values():
            _release(kept)


class _Step:
    """What expanding one generation holds: the spools its table is read from beside
    its parent's (closed once the caller has read the table), and what to keep for the
    generations based on it (`kept`, when `keep`)."""

    def __init__(self, budget: _Budget, keep: bool) -> None:
        self.budget, self.keep = budget, keep
        self.spools: list[_Spool] = []
        self.kept: _Spool | dict[str, Entry] | None = None

    def spool(self) -> _Spool:
        spool = _Spool(self.budget)
        self.spools.append(spool)
        return spool

    def take_kept(self) -> _Spool | dict[str, Entry] | None:
        kept, self.kept = self.kept, None
        if isinstance(kept, _Spool):
            self.spools.remove(kept)
        return kept

    def close(self) -> None:
        """Close every spool still held, `kept` among them (made by spool())."""
        for spool in self.spools:
            spool.close()
        self.spools.clear()
        self.kept = None


def _release(kept: _Spool | dict[str, Entry] | None) -> None:
    if isinstance(kept, _Spool):
        kept.close()


async def _expand(
    store: RepositoryStore,
    gen_id: str,
    parent: str | None,
    expanded: dict[str, _Spool | dict[str, Entry]],
    step: _Step,
) -> tuple[dict[str, Any], Table]:
    """(meta, complete table) of a generation; what to keep for those based on it goes
    to `step.kept`."""
    own = step.spool()
    header, meta, n_own = await store.spill_manifest(gen_id, own)
    delta = meta.get("delta")
    what = f"generation {gen_id}"
    # The delta names its parent; the header's (which ordered the walk) must agree.
    base = None
    if delta is not None and parent is not None and delta["parent"] == parent:
        base = expanded.get(parent)
    if meta.get("type") == "stream":
        if delta is None:
            if step.keep:
                step.kept = own
            return meta, Table([own], whole(n_own), n_own)
        if isinstance(base, _Spool):
            n = int(header["chunks"])
            ranges = delta_ranges(delta["ops"], base.size // _R, n_own, what, n)
            sources: list[_Source] = [base, own]
            pieces = compose(whole(base.size // _R), ranges, 1)
            if step.keep:  # written out, so that its parent can go
                flat = step.spool()
                await asyncio.to_thread(_write_pieces, flat, sources, pieces)
                step.kept = flat
                return meta, Table([flat], whole(n), n)
            return meta, Table(sources, pieces, n)
    elif meta.get("type") == "tree" and (delta is None or isinstance(base, dict)):
        tree_base = base if isinstance(base, dict) else None
        table = b"".join(own.pieces(0, own.size))
        own.close()
        tree, complete = await asyncio.to_thread(_tree_step, tree_base, meta, table, what)
        if step.keep:
            step.kept = tree
        return meta, Table.held(complete)
    own.close()
    got_meta, complete = await store.generation_chunks(gen_id)
    return got_meta, Table.held(complete)


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

# What the own tables of a chain's manifests may hold in memory, in all, while the chain
# is expanded; past it they go to scratch files (a full's own table is as large as the
# complete table; a day's incremental holds a few records).
SPOOL_MEMORY = 4 << 20


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
    the full down into a file, with its own meta. An incremental backup compares its own
    table with the file (dedupe.format.delta.DeltaBuilder), a restore reads it piece by
    piece.

    The chain's manifests are read (CHAIN_AHEAD at once where the store knows the
    parents: RepositoryStore.parent_hint), each checked as spill_manifest checks it, and
    their own tables kept in memory up to SPOOL_MEMORY in all, the rest in scratch
    files. Then every delta is checked against the table below it (delta_ranges, from
    the full up) and the deltas are composed into one list of pieces of the full's table
    and of the literal tables, written once: the chain costs its ops and its literal
    records, not one copy of the complete table per link. What is held in memory is
    bounded whatever the tables' size: SPOOL_MEMORY, the ops of the chain's deltas, at
    most MAX_PIECES pieces (beyond them the table so far is written out) and a copy
    buffer."""
    links = await _read_chain(store, gen_id)
    try:
        file, records = await asyncio.to_thread(_compose_and_write, links[::-1])
    finally:
        for link in links:
            link.own.close()
    return SpilledTable(file, records, links[0].meta)


class _Budget:
    """Bytes the spools of one chain may still keep in memory (shared by the threads
    that fill them)."""

    def __init__(self, limit: int) -> None:
        self.left = limit
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if n > self.left:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.left += n


class _Spool:
    """Records written in order, read back by range: in memory while the chain's budget
    lasts, else (from then on, all of them) in an unnamed scratch file."""

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self._closed = False
        self.size = 0

    def write(self, data: bytes) -> None:
        if self._closed:  # a worker still opening frames after a cancellation
            raise ValueError("write to a closed spool")
        if self._memory is not None and self._budget.take(len(data)):
            self._memory += data
        else:
            if self._file is None:
                self._file = open_scratch()
                if self._memory:
                    write_scratch(self._file, self._memory)
                self._release()
            assert self._file is not None
            write_scratch(self._file, data)
        self.size += len(data)

    def pieces(self, start: int, end: int) -> Iterator[Buffer]:
        """Bytes `start`..`end`, in pieces of at most COPY_RECORDS records."""
        if self._memory is not None:
            return _memory_pieces(self._memory, start, end)
        assert self._file is not None
        self._file.flush()
        return read_scratch(self._file, start, end, COPY_RECORDS * _R)

    def window(self, start: int, end: int) -> Buffer:
        """Bytes `start`..`end` (at most COPY_RECORDS records) in one piece."""
        if self._memory is not None:
            return memoryview(self._memory)[start:end]
        return b"".join(self.pieces(start, end))

    def take_file(self) -> BinaryIO | None:
        """The scratch file holding the records, for the caller to keep (and close), if
        they are in one; this spool then holds nothing."""
        file, self._file = self._file, None
        if file is not None:
            file.flush()
        return file

    def _release(self) -> None:
        if self._memory is not None:
            self._budget.give(len(self._memory))
            self._memory = None

    def close(self) -> None:
        self._closed = True
        self._release()
        if self._file is not None:
            self._file.close()
            self._file = None


class _Source(Protocol):
    """Records read back by byte range (a _Spool, or a table held in memory)."""

    size: int

    def pieces(self, start: int, end: int) -> Iterator[Buffer]: ...

    def window(self, start: int, end: int) -> Buffer: ...


class _Held:
    """A table already in memory, as a _Source."""

    def __init__(self, table: bytes) -> None:
        self._table = table
        self.size = len(table)

    def pieces(self, start: int, end: int) -> Iterator[Buffer]:
        return _memory_pieces(self._table, start, end)

    def window(self, start: int, end: int) -> Buffer:
        return memoryview(self._table)[start:end]


def _memory_pieces(data: Buffer, start: int, end: int) -> Iterator[Buffer]:
    view = memoryview(data)
    step = COPY_RECORDS * _R
    for at in range(start, end, step):
        yield view[at : min(at + step, end)]


class _Link:
    """One manifest of a chain: its id, body meta, own table, the record count of that
    and of its complete table (its header's `chunks`)."""

    def __init__(self, gen_id: str, meta: dict[str, Any], own: _Spool, n_own: int, n: int) -> None:
        self.gen_id, self.meta, self.own, self.n_own, self.n_complete = gen_id, meta, own, n_own, n


async def _read_link(store: RepositoryStore, gen_id: str, budget: _Budget) -> _Link:
    own = _Spool(budget)
    try:
        header, meta, n_own = await store.spill_manifest(gen_id, own)
        return _Link(gen_id, meta, own, n_own, int(header["chunks"]))
    except BaseException:
        own.close()
        raise


async def _read_chain(store: RepositoryStore, gen_id: str) -> list[_Link]:
    """The manifests from `gen_id` up its chain to the full, in that order, each a
    stream generation (RepositoryStore.walk_chain: read ahead where the parents are
    known)."""
    budget = _Budget(SPOOL_MEMORY)

    def meta_of(link: _Link) -> dict[str, Any]:
        if link.meta.get("type") != "stream":
            raise IntegrityError(f"generation {link.gen_id} is not a stream generation")
        return link.meta

    return await store.walk_chain(
        gen_id,
        lambda g: _read_link(store, g, budget),
        meta_of,
        "the chain is broken: restore another generation, back up a full",
        lambda link: link.own.close(),
    )


def _compose_and_write(links: list[_Link]) -> tuple[BinaryIO, int]:
    """The complete table of the last of `links` (a chain from its full up) in a new
    scratch file, and its record count.

    A table is held as pieces: parallel lists of source (an index into `sources`: the
    full's own table, then each link's), first record there and record count. A delta's
    COPY range becomes the pieces of the table below that it covers (cut at its ends),
    a LITERAL range one piece of the link's own table; every delta is checked against
    the table below and its header's count (delta_ranges) before the table it makes is
    used, and before anything is written. Nothing is read but the records the complete
    table holds."""
    made: list[_Spool] = []  # tables written out along the way (MAX_PIECES)

    def flatten(sources: list[_Spool], pieces: Pieces) -> _Spool:
        flat = _Spool(_Budget(0))  # a scratch file from the first byte
        made.append(flat)
        _write_pieces(flat, sources, pieces)
        for spool in made[:-1]:  # the tables written out before: no longer a source
            spool.close()
        del made[:-1]
        return flat

    full = links[0]
    total = links[-1].n_complete if len(links) > 1 else full.n_own
    try:
        sources, pieces = compose_chain(
            full.own,
            full.n_own,
            (
                (
                    link.own,
                    link.meta["delta"]["ops"],
                    link.n_own,
                    link.n_complete,
                    f"generation {link.gen_id}",
                )
                for link in links[1:]
            ),
            flatten,
        )
        src, start, _count = pieces
        if len(src) == 1 and start[0] == 0 and sources[src[0]].size == total * _R:
            file = sources[src[0]].take_file()  # one table, already in a file of its own
            if file is not None:
                return file, total
        out = open_scratch()
        try:
            _write_pieces(out, sources, pieces)
            out.flush()
        except BaseException:
            out.close()
            raise
        return out, total
    finally:
        for spool in made:
            spool.close()


def _write_pieces(out: BinaryIO | _Spool, sources: Sequence[_Source], pieces: Pieces) -> None:
    """The records of `pieces`, in order, to `out`, in writes of ~COPY_RECORDS.

    A delta of a day of scattered changes cuts its table into tens of thousands of short
    pieces, and its copies run forward through the table below: each source is read
    through a window of up to COPY_RECORDS records, so that one read (and no Python
    generator) serves every short piece inside it. A window reads ahead only while the
    bytes read stay within four times the bytes the pieces needed so far (pieces that
    use a quarter of what they pass over or more): pieces that jump about (an
    authenticated but hostile delta can make 2^17 of them) then cost at most four times
    the table, plus one window. A piece longer than a window is read on its own, in
    pieces, as it comes.

    At most WINDOWS_HELD windows are kept, the least recently used going first: a
    window of a file is a copy of up to COPY_RECORDS records, and a chain whose every
    link's literal table is still used (a hostile one makes hundreds) would otherwise hold
    one window per link. A window dropped and needed again is read again, within the same
    four-times rule."""
    step = COPY_RECORDS * _R
    buf = bytearray()
    # source -> (its first byte, the bytes), least recently used first
    windows: dict[int, tuple[int, Buffer]] = {}
    needed = fetched = 0
    for s, first, n in zip(*pieces, strict=True):
        start, end = first * _R, (first + n) * _R
        needed += end - start
        if end - start > step:
            fetched += end - start
            for piece in sources[s].pieces(start, end):
                buf += piece
                if len(buf) >= step:
                    _write(out, buf)
                    buf = bytearray()
            continue
        at, data = windows.pop(s, (0, b""))
        if start < at or end > at + len(data):
            source = sources[s]
            ahead = min(start + step, source.size) if fetched <= 4 * needed else end
            at, data = start, source.window(start, ahead)
            fetched += len(data)
        windows[s] = at, data  # the most recently used now
        if len(windows) > WINDOWS_HELD:
            del windows[next(iter(windows))]
        buf += data[start - at : end - at]
        if len(buf) >= step:
            _write(out, buf)
            buf = bytearray()
    if buf:
        _write(out, buf)


def _write(out: BinaryIO | _Spool, data: bytearray) -> None:
    if isinstance(out, _Spool):
        out.write(bytes(data))
    else:
        write_scratch(out, data)
