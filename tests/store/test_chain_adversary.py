"""A chain of incremental manifests walked with read-ahead and expanded by composing its
deltas (RepositoryStore.walk_chain, dedupe.format.delta.compose_chain,
dedupe.store.tables.spill_complete_table), against an attacker who holds a writer key
(authentic manifests of any shape: docs/FORMAT.md 8, 8.1, 11) or the storage (objects
planted, cut, appended to), and against a cancellation mid-walk.

Crafted tables use made-up chunk ids (they are expanded, never restored): record `i` of
table `tag` carries `tag` in its id and `i` as its length, so a record taken from the
wrong table or the wrong place shows in a comparison.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import (
    PASSPHRASE,
    make_repo,
    manifest_header,
    open_descriptors,
    settled_descriptors,
)

import dedupe.format.delta as delta_module
import dedupe.store.repository as repository
import dedupe.store.tables as tables
from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.errors import GenerationNotFound, IntegrityError, MissingObject, TruncatedObject
from dedupe.format.delta import apply_delta, compose_chain, join_pieces
from dedupe.format.manifest import CHUNK_RECORD, FRAME_LENGTH, MAX_TABLE_FRAME, header_span
from dedupe.store.manifests import ManifestWriter
from dedupe.store.repository import RepositoryStore
from dedupe.store.tables import spill_complete_table

R = CHUNK_RECORD.size
HEADER = manifest_header(
    "db", source={"type": "stream", "label": ""}, chunker={"algorithm": "fixed", "block_size": 4096}
)


def random_table(seed: int, n: int) -> bytes:
    """A chunk table of `n` records with random ids (three frames of a manifest body)."""
    rng = random.Random(seed)
    return b"".join(CHUNK_RECORD.pack(rng.randbytes(32), 4096) for _ in range(n))


def recs(tag: int, n: int, first: int = 0) -> bytes:
    return b"".join(CHUNK_RECORD.pack(tag.to_bytes(32, "little"), i) for i in range(first, n))


def made_by(ops: list[Any]) -> int:
    return sum(int(op[2]) if op[0] == 0 else int(op[1]) for op in ops)


async def put(
    store: RepositoryStore,
    table: bytes,
    parent: str | None = None,
    ops: list[Any] | None = None,
    chunks: int | None = None,
    **meta_extra: Any,
) -> str:
    """An authentic generation (what any writer key can sign): a full of `table`, or an
    incremental on `parent` with `ops` and literal table `table`; its header's count is
    `chunks`, else what the ops make."""
    n = len(table) // R
    meta: dict[str, Any] = {"type": "stream", "digest": "ab" * 32, "chunk_count": n, **meta_extra}
    header = dict(HEADER, chunks=n if chunks is None else chunks)
    if parent is not None:
        assert ops is not None
        meta["delta"] = {"parent": parent, "ops": ops}
        header.update(kind="incremental", parent=parent)
        if chunks is None:
            header["chunks"] = made_by(ops)
    return await store.write_manifest(header, meta, table)


async def expanded_every_way(store: RepositoryStore, gen_id: str) -> bytes:
    """The complete table by spill_complete_table (restore, incremental backup) and by
    generation_chunks (listing, replication), which must agree; the spilled file holds
    the table and nothing else."""
    with await spill_complete_table(store, gen_id) as spilled:
        got = b"".join(spilled)
        size = os.fstat(spilled.file.fileno()).st_size
        assert spilled.records * R == len(got) == size, (spilled.records, len(got), size)
    _meta, table = await store.generation_chunks(gen_id)
    assert table == got
    return got


class TrackedSpool(tables._Spool):
    """Every spool made is kept (so that the garbage collector closes none of them)."""

    made: list[TrackedSpool] = []

    def __init__(self, budget: Any) -> None:
        super().__init__(budget)
        TrackedSpool.made.append(self)

    @property
    def closed(self) -> bool:
        return self._memory is None and self._file is None


@pytest.fixture
def tracked_spools(monkeypatch: pytest.MonkeyPatch) -> list[TrackedSpool]:
    TrackedSpool.made = []
    monkeypatch.setattr(tables, "_Spool", TrackedSpool)
    return TrackedSpool.made


@pytest.fixture
def tracked_scratch(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every scratch file tables.py opens, kept open until the test looks at it."""
    opened: list[Any] = []
    real = tables.open_scratch

    def tracking() -> Any:
        f = real()
        opened.append(f)
        return f

    monkeypatch.setattr(tables, "open_scratch", tracking)
    return opened


# --- crafted chains compose to the spec ------------------------------------------------------


def random_ops(rnd: random.Random, n_parent: int, n_literal: int) -> list[list[int]]:
    """Valid ops of every shape: copies anywhere (overlapping, reordered, single records,
    the parent's last record, the whole parent again), literal runs using the literal
    table up; every count at least 1 (FORMAT.md 8.1); the table made stays under ~300
    records."""
    ops: list[list[int]] = []
    left = n_literal
    total = 0
    while left or (rnd.random() < 0.85 and total < 300):
        r = rnd.random()
        if left and (r < 0.3 or total >= 300 or not n_parent):
            take = rnd.randint(1, left)
            ops.append([1, take])
            left -= take
            total += take
        elif not n_parent:
            break
        elif r < 0.55:
            start = rnd.randrange(n_parent)
            count = rnd.randint(1, n_parent - start)
            ops.append([0, start, count])
            total += count
        elif r < 0.85:
            ops.append([0, rnd.randrange(n_parent), 1])
            total += 1
        elif r < 0.9:
            ops.append([0, n_parent - 1, 1])  # the very end of the parent
            total += 1
        else:
            ops.append([0, 0, n_parent])
            total += n_parent
    return ops


SETTINGS = {
    "default": {},
    # Pieces written out all the time, own tables partly in files.
    "tight": {"MAX_PIECES": 3, "SPOOL_MEMORY": 5 * R},
    # Every own table in a file of its own, and the table written out at every link.
    "files": {"MAX_PIECES": 1, "SPOOL_MEMORY": 0},
}


def _apply_settings(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    for name, value in SETTINGS[setting].items():
        module = delta_module if name == "MAX_PIECES" else tables
        monkeypatch.setattr(module, name, value)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("seed", range(8))
def test_crafted_chains_expand_to_what_applying_their_deltas_one_by_one_makes(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_spools: list[TrackedSpool],
    seed: int,
    setting: str,
) -> None:
    """Chains of up to 10 authentic deltas of every shape (a writer's to choose: records
    reordered one by one, the parent copied whole again, its last record alone,
    literal runs in between) expand, at every link, to the table apply_delta (the spec)
    makes link by link, by spill_complete_table and by generation_chunks alike, however
    often the composed table is written out (MAX_PIECES) and wherever the own tables are
    kept (SPOOL_MEMORY); the spilled file holds exactly the table, and every own table
    and table written out along the way is released once it is handed out."""
    _apply_settings(monkeypatch, setting)
    rnd = random.Random(seed)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            table = recs(0, rnd.randint(0, 40))
            chain = [(await put(store, table), table)]
            for link in range(1, rnd.randint(2, 11)):
                literal = recs(link, rnd.randint(0, 6))
                ops = random_ops(rnd, len(table) // R, len(literal) // R)
                table = apply_delta(table, literal, ops, "spec")
                chain.append((await put(store, literal, chain[-1][0], ops), table))
            for gen_id, want in chain:
                tracked_spools.clear()
                assert await expanded_every_way(store, gen_id) == want
                assert tracked_spools and all(s.closed for s in tracked_spools)

    run_asyncio(go())


@pytest.mark.parametrize(
    "ops",
    [[[0, 0, 9]], [[0, 1, 9]], [[1, 10]]],
    ids=["a prefix of the full", "a suffix of the full", "all literal"],
)
def test_a_table_that_is_one_piece_of_a_file_is_that_table_and_no_more(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, ops: list[list[int]]
) -> None:
    """With every own table in a scratch file (SPOOL_MEMORY 0), an incremental whose
    table is one piece of one of them (a prefix or a suffix of the full's, or its own
    literal table whole): the file spill_complete_table hands out holds exactly the
    complete table (the take_file shortcut applies only to a piece that is the whole
    file), and no other scratch file stays open."""
    monkeypatch.setattr(tables, "SPOOL_MEMORY", 0)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full = recs(0, 10)
            literal = recs(1, 10) if ops[0][0] == 1 else b""
            top = await put(store, literal, await put(store, full), ops)
            before = open_descriptors()
            want = apply_delta(full, literal, ops, "spec")
            assert await expanded_every_way(store, top) == want
            assert await settled_descriptors(before) == before

    run_asyncio(go())


# --- bad deltas are refused wherever they sit in a chain ------------------------------------

# Below the bad link: a full of 20 records and a link that reverses it record by record
# and adds 2 literals (22 records in 22 pieces). (ops, literal records, header's count)
BAD_DELTAS: dict[str, tuple[list[Any], int, int]] = {
    "a copy one record past the parent": ([[0, 0, 23]], 0, 23),
    "a copy starting at the parent's end": ([[0, 0, 22], [0, 22, 1]], 0, 23),
    "a copy past the end inside the last piece": ([[0, 21, 2]], 0, 2),
    "a negative start": ([[0, -1, 2]], 0, 2),
    "a negative count": ([[0, 0, -1], [0, 0, 22]], 0, 21),
    "literals past the literal table": ([[1, 3]], 2, 3),
    "literal records left unused": ([[1, 1]], 2, 1),
    "a header that says more": ([[0, 0, 22]], 0, 23),
    "a header that says fewer": ([[0, 0, 22]], 0, 21),
    "an unknown op": ([[2, 0, 1]], 0, 1),
    "a short op": ([[0, 1]], 0, 1),
    "an op that is no number": ([[0, "x", 1]], 0, 1),
    "an op that is no list": ([5], 0, 0),
    # Found by the adversary review of stop 35: these escaped as KeyError or
    # OverflowError (a traceback from verify and stats), or were read as other numbers.
    "an op that is an object": ([{}], 0, 1),
    "a copy count of Infinity": ([[0, 0, float("inf")]], 0, 1),
    "a literal count of Infinity": ([[1, float("inf")]], 1, 1),
    "a count that is a float": ([[0, 0, 22.0]], 0, 22),
    "a count that is a string": ([[0, 0, "22"]], 0, 22),
    "a kind that is a boolean": ([[False, 0, 22]], 0, 22),
    "ops that are no list": ({"0": [0, 0, 22]}, 0, 22),
    # Every op makes a record or more, so ops cannot outnumber the header's records.
    "a copy of no records": ([[0, 0, 0], [0, 0, 22]], 0, 22),
    "a literal run of no records": ([[1, 0], [0, 0, 22]], 0, 22),
}


async def chain_with_a_bad_link(
    store: Any, ops: Any, n_literal: int, chunks: int
) -> tuple[str, str, str, str]:
    """(full, below, bad, above): a full of 20 records, a delta reversing it, the bad
    delta (`ops`, `n_literal` literal records, `chunks` in its header) on that, and a
    delta copying the bad one's table whole."""
    full_id = await put(store, recs(0, 20))
    below = await put(store, recs(1, 2), full_id, REVERSE)
    bad_id = await put(store, recs(2, n_literal), below, ops, chunks=chunks)
    above = await put(store, b"", bad_id, [[0, 0, chunks]] if chunks else [], chunks)
    return full_id, below, bad_id, above


# The delta of chain_with_a_bad_link's `below`: the full's 20 records reversed, then 2 of
# its own; and the table it makes.
REVERSE = [[0, i, 1] for i in reversed(range(20))] + [[1, 2]]


def below_table() -> bytes:
    return apply_delta(recs(0, 20), recs(1, 2), REVERSE, "spec")


@pytest.mark.parametrize("setting", ["default", "files"])
@pytest.mark.parametrize("bad", sorted(BAD_DELTAS))
def test_a_bad_delta_in_the_middle_of_a_chain_is_refused_by_name(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str, setting: str
) -> None:
    """An authentic delta that copies outside the table below it (as that table is
    composed of pieces of the full and of the link below), reads outside or leaves
    unused its literal table, disagrees with its header's count, or is malformed, in
    the middle of a chain: expanding it, or the link above it, fails with an
    IntegrityError naming it, by both expansions, with no scratch file left open; the
    links below it still expand."""
    _apply_settings(monkeypatch, setting)
    ops, n_literal, chunks = BAD_DELTAS[bad]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full_id, below, bad_id, above = await chain_with_a_bad_link(
                store, ops, n_literal, chunks
            )
            before = open_descriptors()
            for gen_id in (bad_id, above):
                with pytest.raises(IntegrityError) as refused:
                    await spill_complete_table(store, gen_id)
                assert bad_id in refused.value.message
                with pytest.raises(IntegrityError) as refused:
                    await store.generation_chunks(gen_id)
                assert bad_id in refused.value.message
            assert await settled_descriptors(before) == before
            assert await expanded_every_way(store, below) == below_table()

    run_asyncio(go())


# --- what composing holds (findings) ---------------------------------------------------------


def test_one_delta_cannot_multiply_the_pieces_held_past_max_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table held in MAX_PIECES pieces (here 4: the full reversed record by record)
    and one authentic delta of 50 ops, each copying that whole table (the header says
    200 records, so every count check passes): no composition may hand back more pieces
    than MAX_PIECES plus the delta's own ops (what its ops list already costs), however
    the table below is cut.

    Property: what spill_complete_table holds is bounded by MAX_PIECES and the ops, as
    its docstring says (with the real MAX_PIECES, 2**17, a delta of k such ops makes
    k * 2**17 pieces before the check after compose: ~1 GiB for k = 400, where the code
    before this change streamed the table from file to file). Fails while compose_chain
    checks MAX_PIECES only after a delta has been composed whole."""
    monkeypatch.setattr(delta_module, "MAX_PIECES", 4)
    held: list[tuple[int, int]] = []  # (pieces handed back, the delta's ranges)
    real = delta_module.compose

    def counting(parent: Any, ranges: Any, own: int) -> Any:
        out = real(parent, ranges, own)
        held.append((len(out[0]), len(ranges)))
        return out

    monkeypatch.setattr(delta_module, "compose", counting)
    full = recs(0, 4)
    reverse = [[0, i, 1] for i in reversed(range(4))]
    again = [[0, 0, 4]] * 50
    links = [(b"", reverse, 0, 4, "g1"), (b"", again, 0, 200, "g2")]
    sources, pieces = compose_chain(full, 4, links, join_pieces)
    want = apply_delta(apply_delta(full, b"", reverse, "g1"), b"", again, "g2")
    assert join_pieces(sources, pieces) == want
    assert all(n <= 4 + ops for n, ops in held), held


def test_tables_written_out_along_a_chain_do_not_pile_up(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_scratch: list[Any],
) -> None:
    """A chain of 8 authentic links, each reversing the table below record by record,
    with MAX_PIECES 2: the composed table is written out (flattened) at every link.
    While it is written out again, or written as the result, at most two of those
    tables are open: the one read and the one written (the code before this change
    kept two tables at a time, one per step).

    Property: the scratch space a restore or an incremental backup takes is about twice
    the complete table, not the complete table once per write-out (a long chain of
    fragmenting deltas, from a writer or from a busy file, otherwise fills TMPDIR).
    Fails while every table written out stays open until the end."""
    monkeypatch.setattr(delta_module, "MAX_PIECES", 2)
    most = [0]
    real = tables._write_pieces

    def counting(out: Any, sources: Any, pieces: Any) -> None:
        most[0] = max(most[0], sum(not f.closed for f in tracked_scratch))
        real(out, sources, pieces)

    monkeypatch.setattr(tables, "_write_pieces", counting)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            table = recs(0, 6)
            gen_id = await put(store, table)
            for _link in range(8):
                ops = [[0, i, 1] for i in reversed(range(6))]
                gen_id = await put(store, b"", gen_id, ops)
                table = apply_delta(table, b"", ops, "spec")
            tracked_scratch.clear()
            most[0] = 0
            with await spill_complete_table(store, gen_id) as spilled:
                assert b"".join(spilled) == table
            assert len(tracked_scratch) >= 8  # written out at every link
            assert most[0] <= 2, f"{most[0]} tables written out open at once"

    run_asyncio(go())


# --- the walk: cycles, hints, reads ahead ----------------------------------------------------


class FakeChain:
    """walk_chain's inputs without a repository: `parents` as the bodies name them,
    `hints` as headers opened earlier would (parent_hint). A read returns its id after
    `delay` seconds (GenerationNotFound for an id in `missing`); every read that
    returned and every discard is counted."""

    def __init__(
        self,
        parents: dict[str, str | None],
        hints: dict[str, str | None] | None = None,
        missing: Collection[str] = (),
        delay: Callable[[str], float] = lambda _g: 0.001,
    ) -> None:
        self.parents, self.missing, self.delay = parents, missing, delay
        self.store = SimpleNamespace(parent_hint=(hints or {}).get)
        self.reads: list[str] = []
        self.returned: list[str] = []
        self.discarded: list[str] = []

    async def read(self, gen_id: str) -> str:
        self.reads.append(gen_id)
        await asyncio.sleep(self.delay(gen_id))
        if gen_id in self.missing or gen_id not in self.parents:
            raise GenerationNotFound(f"generation {gen_id} does not exist")
        self.returned.append(gen_id)
        return gen_id

    def meta_of(self, gen_id: str) -> dict[str, Any]:
        parent = self.parents[gen_id]
        return {"delta": {"parent": parent}} if parent else {}

    async def walk(self, gen_id: str) -> list[str]:
        return await RepositoryStore.walk_chain(
            self.store,  # type: ignore[arg-type]
            gen_id,
            self.read,
            self.meta_of,
            "hint",
            self.discarded.append,
        )


@pytest.mark.parametrize("hinted", [False, True])
@pytest.mark.parametrize(
    "parents",
    [{"a": "a"}, {"a": "b", "b": "a"}, {"a": "b", "b": "c", "c": "d", "d": "b"}],
    ids=["itself", "two", "a tail into three"],
)
def test_a_parent_cycle_is_refused_not_walked_forever(
    parents: dict[str, str | None], hinted: bool
) -> None:
    """Bodies whose parents make a cycle (a hash cycle no writer can make, but the walk
    must not rely on that): walk_chain fails with IntegrityError within a second, with
    or without the parents known as hints, and every read that returned is discarded
    once, none left running."""

    async def go() -> FakeChain:
        chain = FakeChain(parents, hints=parents if hinted else None)
        with pytest.raises(IntegrityError, match="cycle"):
            await asyncio.wait_for(chain.walk("a"), 1.0)
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert sorted(chain.discarded) == sorted(chain.returned)


def test_hints_that_disagree_with_the_bodies_only_cost_reads_that_are_let_go() -> None:
    """Hints (parent_hint) that lead elsewhere than the bodies' parents: into
    generations of no chain, into a missing one, into a cycle of their own, back into
    the chain from its full. The walk
    follows the bodies (a, b, full), reads each generation at most once, and every read
    it did not take is discarded, none left running.

    Property: a read ahead never puts a generation into a chain, and holds nothing once
    the walk is over (fails when reads ahead that the walk did not take are dropped
    without their discard: their own tables, kept in memory against the chain's
    SPOOL_MEMORY budget or in scratch files, are released only by the garbage
    collector)."""
    parents: dict[str, str | None] = {"a": "b", "b": "full", "full": None}
    parents |= {"x": "y", "y": "x", "z": None}
    hints: dict[str, str | None] = {"a": "x", "x": "y", "y": "x", "b": "gone", "full": "a"}

    async def go() -> FakeChain:
        chain = FakeChain(parents, hints)
        assert await chain.walk("a") == ["a", "b", "full"]
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert len(chain.reads) == len(set(chain.reads))
    assert {"x", "y"} <= set(chain.reads)  # read ahead, by the hints
    assert sorted(chain.discarded) == sorted(set(chain.returned) - {"a", "b", "full"})


def test_a_missing_link_fails_the_walk_and_lets_every_read_go() -> None:
    """A chain a, b, c, d, full whose c is gone, its parents all known as hints (read
    ahead): MissingObject naming c, and every read that returned (those below c, read
    ahead, too) discarded once, none left running."""
    parents: dict[str, str | None] = {"a": "b", "b": "c", "c": "d", "d": "full", "full": None}

    async def go() -> FakeChain:
        chain = FakeChain(parents, parents, missing={"c"}, delay=lambda g: 0.02 * (g == "c"))
        with pytest.raises(MissingObject, match="generation c"):
            await chain.walk("a")
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert {"d", "full"} <= set(chain.returned)
    assert sorted(chain.discarded) == sorted(chain.returned)


def test_a_walk_cancelled_as_a_read_completes_lets_that_read_go() -> None:
    """The walk is cancelled in the loop turn between the read it waits for completing
    and the walk resuming (a restore's timeout or ^C can land there): every read that
    returned is still discarded.

    Property: cancelling a restore or a backup mid-walk leaves no own table held, no
    scratch file open, until the garbage collector gets to it (fails while walk_chain
    pops a read from `reading` before it has its result: a cancellation that lands
    before the walk resumes loses that read's link). Old code: each own scratch file was
    in `levels` before its manifest was read, so a cancellation anywhere closed it."""
    parents: dict[str, str | None] = {"a": "b", "b": None}
    walk: list[asyncio.Task[list[str]]] = []

    class CancelledOnReturn(FakeChain):
        async def read(self, gen_id: str) -> str:
            got = await super().read(gen_id)
            if gen_id == "a":  # the walk waits for a: cancel it as a completes
                asyncio.get_running_loop().call_soon(walk[0].cancel)
            return got

    async def go() -> CancelledOnReturn:
        chain = CancelledOnReturn(parents, delay=lambda g: 0.01)
        walk.append(asyncio.ensure_future(chain.walk("a")))
        with pytest.raises(asyncio.CancelledError):
            await walk[0]
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert chain.returned == ["a"]
    assert chain.discarded == ["a"], "the link read as the walk was cancelled is lost"


@pytest.mark.parametrize("turns", range(6))
def test_a_walk_cancelled_twice_lets_go_of_reads_done_ahead(turns: int) -> None:
    """A chain a, b, full read ahead: full is read, b is slow. The walk is cancelled
    while it waits for b, and again `turns` turns of the loop later (while it waits for
    its reads ahead to end, for some of them): full's read, which had returned, is
    still discarded, and nothing is left running.

    Property: as above, for a second cancellation (a timeout, then ^C; a task group
    cancelling a task already cancelled). Fails while the reads ahead are discarded
    only after an await of them that a cancellation can interrupt."""
    parents: dict[str, str | None] = {"a": "b", "b": "full", "full": None}

    async def go() -> FakeChain:
        chain = FakeChain(parents, parents, delay=lambda g: 5.0 if g == "b" else 0.0)
        task = asyncio.ensure_future(chain.walk("a"))
        while "full" not in chain.returned:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)
        task.cancel()
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert chain.returned == ["a", "full"]
    assert sorted(chain.discarded) == ["a", "full"]


def test_a_long_chain_walked_with_every_parent_known_reads_at_most_chain_ahead_at_once() -> None:
    """A chain of 10,000 links, every parent known as a hint: the walk takes them all,
    in order, reading each once and never more than CHAIN_AHEAD (and the one it waits
    for) at once, and leaves nothing running."""
    n = 10_000
    parents: dict[str, str | None] = {f"g{i}": f"g{i + 1}" for i in range(n - 1)}
    parents[f"g{n - 1}"] = None
    in_flight = [0, 0]  # now, most

    class Counting(FakeChain):
        async def read(self, gen_id: str) -> str:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            try:
                return await super().read(gen_id)
            finally:
                in_flight[0] -= 1

    async def go() -> FakeChain:
        chain = Counting(parents, parents, delay=lambda _g: 0)
        assert await chain.walk("g0") == [f"g{i}" for i in range(n)]
        assert len(asyncio.all_tasks()) == 1
        return chain

    chain = asyncio.run(go())
    assert len(chain.reads) == n and chain.discarded == []
    assert 1 < in_flight[1] <= repository.CHAIN_AHEAD + 1


def test_a_link_replaced_by_another_manifest_is_refused_read_ahead_or_not(
    run_asyncio: Any, repo_path: Path, tracked_spools: Any
) -> None:
    """A storage attacker puts another authentic manifest's bytes under the name of a
    link in the middle of a chain (a name the read-ahead fetches), then garbage: the
    walk refuses the link by name, read ahead or not, and every own table read is
    released."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            ids = [await put(store, recs(0, 10))]
            for link in range(1, 6):
                ids.append(await put(store, recs(link, 1), ids[-1], [[0, 0, 9 + link], [1, 1]]))
            other = await put(store, recs(9, 3))
        victim = repo_path / "generations" / ids[2]
        kept = victim.read_bytes()
        planted = [(repo_path / "generations" / other).read_bytes(), b"DDPGEN" + os.urandom(90)]
        for data in planted:
            victim.write_bytes(data)
            for listed in (False, True):
                async with await Repository.open(repo_path, PASSPHRASE) as repo:
                    store = repo._store
                    if listed:
                        store._parents_seen.update(zip(ids[1:], ids[:-1], strict=True))
                    tracked_spools.clear()
                    with pytest.raises(IntegrityError, match=ids[2]):
                        await spill_complete_table(store, ids[-1])
                    with pytest.raises(IntegrityError, match=ids[2]):
                        await store.generation_chunks(ids[-1])
                    assert all(s.closed for s in tracked_spools)
                    assert len(asyncio.all_tasks()) == 1
        victim.write_bytes(kept)

    run_asyncio(go())


def test_a_hint_into_another_chain_does_not_change_the_table_and_is_let_go(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, tracked_spools: Any
) -> None:
    """A store whose parent hints point into another chain (as a hint from a header
    that is not the one the walk reads would): spill_complete_table still expands the
    chain the bodies name, and every own table read, taken or not, is released (the
    other chain's full, read ahead by the hint, too), with no scratch file left open
    (SPOOL_MEMORY 0: each own table in a file)."""
    monkeypatch.setattr(tables, "SPOOL_MEMORY", 0)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full = recs(0, 8)
            full_id = await put(store, full)
            mid = await put(store, recs(1, 1), full_id, [[0, 0, 4], [1, 1], [0, 4, 4]])
            top = await put(store, b"", mid, [[0, 5, 4], [0, 0, 5]])
            other = await put(store, recs(9, 7))
            other_top = await put(store, b"", other, [[0, 0, 7]])
            want = await expanded_every_way(store, top)
            store._parents_seen[top] = other_top  # the hints lead into the other chain
            store._parents_seen[mid] = other
            before = open_descriptors()
            tracked_spools.clear()
            with await spill_complete_table(store, top) as spilled:
                assert b"".join(spilled) == want
            assert len(tracked_spools) >= 4  # other_top and other were read ahead
            assert all(s.closed for s in tracked_spools)
            assert await settled_descriptors(before) == before
            assert len(asyncio.all_tasks()) == 1

    run_asyncio(go())


# --- cancellation of a real walk -------------------------------------------------------------


def _slow_backend(root: Path, delay: float) -> LocalBackend:
    """A local backend whose manifest reads take `delay` seconds (an object store's round
    trip)."""

    class Slow(LocalBackend):
        async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            if name.startswith("generations/"):
                await asyncio.sleep(delay)
            return await super().get(name, offset, length)

    return Slow(root)


def test_a_restore_cancelled_mid_walk_leaves_no_task_and_no_file(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spill_complete_table (what a restore and an incremental backup start with) of a
    chain of 12 links on a store whose manifest reads take 5 ms, read ahead, each own
    table in a scratch file (SPOOL_MEMORY 0), cancelled at ten points of its walk: no
    task of it is left running and no scratch file open once the cancellation is
    through, and the same handle then expands the chain."""
    monkeypatch.setattr(tables, "SPOOL_MEMORY", 0)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            table = recs(0, 30)
            ids = [await put(store, table)]
            for link in range(1, 13):
                ops = [[0, 0, 10], [1, 1], [0, 11, len(table) // R - 11]]
                table = apply_delta(table, recs(link, 1), ops, "spec")
                ids.append(await put(store, recs(link, 1), ids[-1], ops))
        async with await Repository.open(_slow_backend(repo_path, 0.005), PASSPHRASE) as repo:
            store = repo._store
            await repo.generations()  # every header opened: the chain is read ahead
            before = open_descriptors()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with await spill_complete_table(store, ids[-1]) as spilled:
                assert b"".join(spilled) == table
            whole = loop.time() - started
            cancelled = 0
            for tenth in range(10):
                task = asyncio.ensure_future(spill_complete_table(store, ids[-1]))
                await asyncio.sleep(whole * tenth / 10)
                task.cancel()
                try:
                    (await task).close()  # done before the cancellation
                except asyncio.CancelledError:
                    cancelled += 1
                await asyncio.sleep(0.02)
                assert len(asyncio.all_tasks()) == 1
                assert await settled_descriptors(before) == before
            assert cancelled >= 5
            with await spill_complete_table(store, ids[-1]) as spilled:
                assert b"".join(spilled) == table

    run_asyncio(go())


def test_a_worker_still_opening_frames_after_a_cancel_opens_no_scratch_file(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_scratch: list[Any],
) -> None:
    """A large manifest's frames are opened on a worker thread, into a spool that keeps
    nothing in memory (SPOOL_MEMORY 0). The restore is cancelled while the worker is at
    it: the spool is closed at once, and the worker, which cannot be stopped, goes on
    writing into it when it gets to run. No scratch file may be opened after the spool
    was closed (nothing would ever close it; the code before this change wrote to the
    closed file and failed there, in the worker).

    Fails while _Spool.write, after close(), opens a new scratch file."""
    monkeypatch.setattr(tables, "SPOOL_MEMORY", 0)
    entered, release, left = threading.Event(), threading.Event(), threading.Event()
    real = repository._BodyFrames.take

    def gated(self: Any, buf: bytearray, complete: bool, limit: int | None = None) -> bool:
        # The first take on a worker that holds a whole frame (it writes to the spool).
        if threading.current_thread() is threading.main_thread() or len(buf) <= MAX_TABLE_FRAME:
            return real(self, buf, complete, limit)
        entered.set()
        release.wait(10)
        try:
            return real(self, buf, complete, limit)
        finally:
            left.set()

    monkeypatch.setattr(repository._BodyFrames, "take", gated)
    rng = random.Random(3)
    n = 2 * 16_384 + 99
    table = b"".join(CHUNK_RECORD.pack(rng.randbytes(32), 4096) for _ in range(n))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            gen_id = await put(store, table)
            tracked_scratch.clear()
            task = asyncio.ensure_future(spill_complete_table(store, gen_id))
            while not entered.is_set():
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            while not left.is_set():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)
            assert [f for f in tracked_scratch if not f.closed] == []

    try:
        run_asyncio(go())
    finally:
        release.set()


# --- spill_manifest: frames, pieces, the loop's thread ---------------------------------------


def _frame_ends(data: bytes) -> list[int]:
    """Where each frame of a stored manifest ends (the first entry: where its prefix
    ends)."""
    _start, end = header_span(data, "m")
    ends = [end]
    while ends[-1] < len(data):
        (n,) = FRAME_LENGTH.unpack_from(data, ends[-1])
        ends.append(ends[-1] + FRAME_LENGTH.size + n)
    return ends


def _cut_reads(root: Path, cuts: list[int]) -> Any:
    """A local backend whose manifest reads stop at each offset of `cuts` (spill_manifest
    goes on from where a read stopped): the pieces end exactly at frame boundaries."""

    class Cut(LocalBackend):
        async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
            data = await super().get(name, offset, length)
            if name.startswith("generations/") and length is not None:
                stop = next((c for c in cuts if offset < c < offset + len(data)), None)
                if stop is not None:
                    data = data[: stop - offset]
            return data

    return Cut(root)


@pytest.mark.parametrize("inline", ["never", "always", "one byte of plain"])
def test_a_manifest_read_in_pieces_that_end_at_its_frames_spills_whole(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, inline: str
) -> None:
    """A manifest of three table frames and the meta frame, read in pieces that each
    end exactly where a frame ends (the prefix read too), its frames opened on the
    loop's thread never, always, or until one byte of plain: the records, their count
    and the meta are read_manifest's. The same object cut at each frame boundary (a
    storage attacker's), or one byte longer, is refused."""
    limits = {"never": (-1, 0), "always": (1 << 30, 1 << 30), "one byte of plain": (1 << 30, 1)}
    frames, plain = limits[inline]
    monkeypatch.setattr(repository, "INLINE_FRAMES", frames)
    monkeypatch.setattr(repository, "INLINE_PLAIN", plain)
    n = 2 * 16_384 + 99
    table = random_table(5, n)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id = await put(repo._store, table)
        path = repo_path / "generations" / gen_id
        data = path.read_bytes()
        ends = _frame_ends(data)
        assert len(ends) == 5
        for probe in ends[:-1]:
            monkeypatch.setattr(repository, "HEADER_PROBE", probe)
            backend = _cut_reads(repo_path, ends)
            async with await Repository.open(backend, PASSPHRASE) as repo:
                store = repo._store
                header, meta, _ = await store.read_manifest(gen_id)
                sink = io.BytesIO()
                assert await store.spill_manifest(gen_id, sink) == (header, meta, n)
                assert sink.getvalue() == table
        monkeypatch.setattr(repository, "HEADER_PROBE", 65536)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            a, b, c = ends[1], ends[2], ends[3]
            swapped = data[:a] + data[b:c] + data[a:b] + data[c:]  # frames 1 and 2
            cut = [data[:end] for end in ends[1:-1]]
            for damaged in [*cut, data + b"\0", swapped, data[:-1]]:
                path.write_bytes(damaged)
                with pytest.raises(IntegrityError):
                    await store.spill_manifest(gen_id, io.BytesIO())
            path.write_bytes(data)

    run_asyncio(go())


def test_a_large_body_is_never_opened_on_the_loop(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest of three frames of random records (~1.2 MB): no frame larger than
    INLINE_FRAMES is opened (authenticated, decompressed) on the event loop's thread,
    whatever the size of the pieces it is read in (each holds whole frames here).

    Property: a restore's loop is not held up by a large manifest (fails when the
    pieces of any size are opened on the loop until INLINE_PLAIN is passed)."""
    on_loop: list[int] = []
    real = repository.open_sealed

    def recording(key: bytes, sealed: Any, aad: bytes, what: str) -> Any:
        if threading.current_thread() is threading.main_thread():
            on_loop.append(len(sealed))
        return real(key, sealed, aad, what)

    monkeypatch.setattr(repository, "open_sealed", recording)
    n = 2 * 16_384 + 99
    table = random_table(9, n)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id = await put(repo._store, table)
        for piece in (1 << 20, 700_000, 4 << 20):
            monkeypatch.setattr(repository, "SPILL_PIECE", piece)
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                on_loop.clear()
                sink = io.BytesIO()
                _h, _meta, got = await repo._store.spill_manifest(gen_id, sink)
                assert got == n and sink.getvalue() == table
                assert all(size <= repository.INLINE_FRAMES for size in on_loop), on_loop

    run_asyncio(go())


def test_a_small_body_whose_meta_expands_is_not_decompressed_on_the_loop(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An authentic manifest of a few hundred bytes whose meta frame decompresses to
    8 MiB (a writer's padding; MAX_META_FRAME allows 256 MiB): the frames the loop's
    thread decompresses add up to at most INLINE_PLAIN and one table frame, as
    spill_manifest's docstring promises ("up to INLINE_PLAIN bytes of plain frames; the
    rest goes on on a worker").

    Fails while the limit is looked at only after a frame has been decompressed: the
    meta frame, the last, is then decompressed (and decoded) on the loop whatever its
    size."""
    on_loop: list[int] = []
    real = repository.decompress_capped

    def recording(data: Any, cap: int, what: str) -> bytes:
        out = real(data, cap, what)
        if threading.current_thread() is threading.main_thread():
            on_loop.append(len(out))
        return out

    monkeypatch.setattr(repository, "decompress_capped", recording)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            gen_id = await put(store, recs(0, 3), pad="x" * (8 << 20))
            assert (repo_path / "generations" / gen_id).stat().st_size < repository.INLINE_FRAMES
            on_loop.clear()
            sink = io.BytesIO()
            _h, _meta, n = await store.spill_manifest(gen_id, sink)
            assert n == 3 and sink.getvalue() == recs(0, 3)
            assert sum(on_loop) <= repository.INLINE_PLAIN + MAX_TABLE_FRAME, on_loop

    run_asyncio(go())


def test_a_body_without_its_meta_frame_is_truncated(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An authentic manifest whose body is empty (the writer sealed no frame, not even
    the meta; its header carries that empty body's hash): spill_manifest (restore,
    incremental backup) and read_manifest refuse it as truncated."""
    real = ManifestWriter._seal_frame

    def no_meta(self: ManifestWriter, payload: Any) -> None:
        if bytes(payload[:1]) != b"{":
            real(self, payload)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            with monkeypatch.context() as m:
                m.setattr(ManifestWriter, "_seal_frame", no_meta)
                gen_id = await put(store, b"")
            with pytest.raises(TruncatedObject):
                await store.spill_manifest(gen_id, io.BytesIO())
            with pytest.raises(TruncatedObject):
                await store.read_manifest(gen_id)
            with pytest.raises(TruncatedObject):
                await spill_complete_table(store, gen_id)

    run_asyncio(go())


def test_a_byte_appended_after_a_meta_that_reads_as_records_is_caught_by_the_body_hash(
    run_asyncio: Any, repo_path: Path
) -> None:
    """A manifest whose meta JSON is a whole number of records long, and a storage
    attacker who appends one byte to the object: the meta frame is then read as a
    table frame (its plain a whole number of records), and what refuses the body is its
    hash, checked against the header once all of it is read."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            for pad in range(R):
                gen_id = await put(store, recs(0, 2), pad="y" * pad)
                _h, meta, _t = await store.read_manifest(gen_id)
                if len(json.dumps(meta, sort_keys=True).encode()) % R == 0:
                    break
            else:
                raise AssertionError("no padding made the meta a whole number of records")
            path = repo_path / "generations" / gen_id
            path.write_bytes(path.read_bytes() + b"\0")
            with pytest.raises(IntegrityError, match="does not belong to its header"):
                await store.spill_manifest(gen_id, io.BytesIO())

    run_asyncio(go())


# --- the spools' memory budget ---------------------------------------------------------------


def test_a_spool_gives_its_memory_back_when_it_moves_to_a_file_or_closes() -> None:
    """Three spools of one chain share a budget of 100 records: the first to outgrow
    what is left moves to a scratch file and gives back what it held, which a third then
    keeps in memory; closing gives back the rest. Every spool reads back what was
    written to it, in order."""
    budget = tables._Budget(100 * R)
    a, b, c = (tables._Spool(budget) for _ in range(3))
    try:
        a.write(recs(1, 60))
        b.write(recs(2, 30))
        assert budget.left == 10 * R
        a.write(recs(1, 80, 60))  # 20 more than is left: a goes to a file
        assert a._file is not None and a._memory is None and budget.left == 70 * R
        c.write(recs(3, 70))
        assert c._file is None and budget.left == 0
        for spool, want in ((a, recs(1, 80)), (b, recs(2, 30)), (c, recs(3, 70))):
            assert spool.size == len(want)
            assert b"".join(bytes(p) for p in spool.pieces(0, spool.size)) == want
            assert b"".join(bytes(p) for p in spool.pieces(R, 3 * R)) == want[R : 3 * R]
        b.close()
        assert budget.left == 30 * R
    finally:
        for spool in (a, b, c):
            spool.close()
    assert budget.left == 100 * R


# --- what a writer's malformed meta does to the commands that read every generation -------


class _CountOf(float):
    """A meta's chunk_count the writer's own check reads as `n`, written as Infinity."""

    def __new__(cls, n: int) -> _CountOf:
        made = super().__new__(cls, "inf")
        made.n = n  # type: ignore[attr-defined]
        return made

    def __int__(self) -> int:
        return self.n  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize(
    "shape",
    [
        "a count of Infinity in an op",
        "an op that is an object",
        "a meta count of Infinity",
        "a meta nested too deep",
    ],
)
def test_verify_and_stats_report_a_malformed_meta_and_go_on(
    run_asyncio: Any, repo_path: Path, shape: str
) -> None:
    """Found by the adversary review of stop 35: one writer's generation whose meta holds
    an op of Infinity or an object (json.loads takes both), a chunk_count of Infinity, or
    arrays nested past the parser's stack made verify, stats and ls end in a traceback
    (KeyError, OverflowError, RecursionError) for the whole repository. Verify reports it
    as a damaged manifest and checks the rest; generation_chunks (ls, stats, replication)
    refuses it with an IntegrityError; the full below it still expands."""
    from dedupe.format.manifest import RawJSON

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full_id = await put(store, recs(0, 20))
            if shape == "a count of Infinity in an op":
                bad_id = await put(store, b"", full_id, [[0, 0, float("inf")]], chunks=20)
            elif shape == "an op that is an object":
                bad_id = await put(store, b"", full_id, [{}], chunks=20)
            elif shape == "a meta count of Infinity":
                bad_id = await put(store, recs(1, 3), chunk_count=_CountOf(3))
            else:
                bad_id = await put(store, recs(1, 3), deep=RawJSON(b"[" * 100_000 + b"]" * 100_000))
            report = await repo.verify()
            assert not report.ok
            damaged = {d.name: d for d in report.damaged}
            # (the made-up chunk ids are in no index object: "index" is reported too)
            manifests = [name for name in damaged if name.startswith("generations/")]
            assert manifests == [f"generations/{bad_id}"], damaged
            assert "malformed" in " ".join(damaged[manifests[0]].details)
            assert report.generations == 2
            with pytest.raises(IntegrityError, match=bad_id[:12]):
                await store.generation_chunks(bad_id)
            assert await expanded_every_way(store, full_id) == recs(0, 20)

    run_asyncio(go())


@pytest.mark.parametrize("shape", ["seconds too large for a float", "a header nested too deep"])
def test_a_malformed_header_is_reported_not_a_traceback(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str
) -> None:
    """The same review's question asked of the header: one a writer seals with `seconds`
    of 10^400 (float() overflows) or arrays nested past the parser's stack made listing
    and verify end in a traceback. The listing names it as damaged and goes on; verify
    reports it."""
    import dedupe.store.manifests as manifests

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full_id = await put(store, recs(0, 20))
            if shape == "seconds too large for a float":
                meta = {"type": "stream", "digest": "ab" * 32, "chunk_count": 3}
                header = dict(HEADER, chunks=3, seconds=10**400)
                bad_id = await store.write_manifest(header, meta, recs(1, 3))
            else:
                real_dumps = manifests.json.dumps

                def deep_header(obj: Any, **kw: Any) -> str:
                    if isinstance(obj, dict) and "body" in obj:
                        return real_dumps(dict(obj, deep=[]), **kw).replace(
                            '"deep": []', '"deep": ' + "[" * 100_000 + "]" * 100_000
                        )
                    return real_dumps(obj, **kw)

                monkeypatch.setattr(manifests.json, "dumps", deep_header)
                try:
                    bad_id = await put(store, recs(1, 3))
                finally:
                    monkeypatch.setattr(manifests.json, "dumps", real_dumps)
            listed = dict(await store.generation_headers())
            assert isinstance(listed[bad_id], IntegrityError)
            assert "header is malformed" in listed[bad_id].message
            assert isinstance(listed[full_id], dict)
            report = await repo.verify()
            assert f"generations/{bad_id}" in {d.name for d in report.damaged}
            assert await expanded_every_way(store, full_id) == recs(0, 20)

    run_asyncio(go())
