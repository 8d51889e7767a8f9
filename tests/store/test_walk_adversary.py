"""each_generation_table (verify, prune and stats) against crafted repositories: a holder
of a key that can sign generations (authentic manifests of any shape: docs/FORMAT.md 8,
8.1, 11) and the storage (manifests replaced, cut, extended between the walk's header
probe and its read). The reference is RepositoryStore.generation_chunks, each generation
expanded through its chain on its own: the walk must give the same table, or fail where
it fails (prune deletes what no table names, so a table short of records, or a failure
handed out as a table, deletes live data).

test_chain_adversary.py runs the same crafted deltas through spill_complete_table and
generation_chunks only; here they go through the walk, with branches (a parent kept
for several children, written out when it has children, composed on the fly when not)
and with the walk's spools in memory, partly in files, or all in files.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo, open_descriptors, settled_descriptors
from test_chain_adversary import (
    BAD_DELTAS,
    SETTINGS,
    TrackedSpool,
    _apply_settings,
    below_table,
    chain_with_a_bad_link,
    put,
    random_ops,
    recs,
    tracked_spools,  # noqa: F401 - a fixture
)
from test_tables import joined

from dedupe import Repository
from dedupe.errors import DedupeError, IntegrityError
from dedupe.format.delta import apply_delta
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store.repository import RepositoryStore
from dedupe.store.tables import each_generation_table, spill_complete_table

R = CHUNK_RECORD.size


async def walked(store: RepositoryStore, ids: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(the order the walk hands generations out in, each one's outcome with its table
    read into bytes while it is valid)."""
    order: list[str] = []
    got: dict[str, Any] = {}
    async for gen_id, outcome in each_generation_table(store, ids):
        assert gen_id not in got, f"{gen_id} handed out twice"
        order.append(gen_id)
        got[gen_id] = joined(outcome)
    return order, got


async def reference(store: RepositoryStore, gen_id: str) -> Any:
    try:
        return await store.generation_chunks(gen_id)
    except DedupeError as e:
        return e


def agree(walk: Any, alone: Any, gen_id: str) -> None:
    """The walk's outcome is generation_chunks': the same (meta, table), or a failure
    where it fails (of the same type)."""
    if isinstance(alone, Exception):
        assert isinstance(walk, Exception), f"{gen_id}: the walk gave a table, alone it fails"
        assert type(walk) is type(alone), (gen_id, walk, alone)
    else:
        assert not isinstance(walk, Exception), (gen_id, walk)
        assert walk == alone, gen_id


# --- crafted trees of deltas -----------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("seed", range(6))
def test_crafted_branching_chains_walk_to_what_generation_chunks_gives(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_spools: list[TrackedSpool],  # noqa: F811
    seed: int,
    setting: str,
) -> None:
    """Two fulls and up to 14 authentic deltas of every shape, each on a generation
    picked at random (so parents with several children, kept while they wait, and
    leaves composed on their parent's table without a copy), listed in a shuffled order
    with some ids twice: the walk hands out each generation once, after its parent, with
    the table apply_delta makes link by link and generation_chunks gives; every spool
    is closed at the end and no scratch file stays open.

    Property: the walk's keep / write-out / compose-on-the-fly paths, and the budget
    they share, give exactly the spec's tables for any authentic delta."""
    _apply_settings(monkeypatch, setting)
    rnd = random.Random(1000 + seed)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            spec: dict[str, bytes] = {}
            parent_of: dict[str, str | None] = {}
            for tag in (0, 1):
                table = recs(100 + tag, rnd.randint(0, 30))
                gen_id = await put(store, table)
                spec[gen_id], parent_of[gen_id] = table, None
            for link in range(rnd.randint(4, 14)):
                parent = rnd.choice(sorted(spec))
                below = spec[parent]
                literal = recs(link, rnd.randint(0, 5))
                ops = random_ops(rnd, len(below) // R, len(literal) // R)
                gen_id = await put(store, literal, parent, ops)
                spec[gen_id] = apply_delta(below, literal, ops, "spec")
                parent_of[gen_id] = parent
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            ids = list(spec)
            rnd.shuffle(ids)
            ids += rnd.sample(ids, 3)
            before = open_descriptors()
            tracked_spools.clear()
            order, got = await walked(store, ids)
            assert sorted(order) == sorted(spec)
            assert tracked_spools and all(s.closed for s in tracked_spools)
            assert await settled_descriptors(before) == before
            for gen_id, want in spec.items():
                based_on = parent_of[gen_id]
                if based_on is not None:
                    assert order.index(based_on) < order.index(gen_id)
                assert not isinstance(got[gen_id], Exception), got[gen_id]
                assert got[gen_id][1] == want, gen_id
                assert got[gen_id] == await store.generation_chunks(gen_id)

    run_asyncio(go())


@pytest.mark.parametrize("setting", ["default", "files"])
@pytest.mark.parametrize("bad", sorted(BAD_DELTAS))
def test_a_bad_delta_fails_in_the_walk_as_on_its_own_and_nothing_below_or_beside_it(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str, setting: str
) -> None:
    """Every bad delta of test_chain_adversary (copies past the parent's table, a
    negative start or count, literals past or left unused, a header count that says
    more or fewer, malformed ops) on a link that is kept for a child of its own (`bad`,
    with `above` on it: the write-out path) and on a leaf beside it (`bad_leaf`: the
    compose-on-the-fly path). Walked together with the links below and a good sibling:
    `bad`, `above` and `bad_leaf` fail with the IntegrityError generation_chunks
    raises, naming the bad link; the others give their tables.

    Property: the walk checks every delta against its parent's table and its header's
    count (delta_ranges with `n`) before it hands out a table; a table the checks would
    refuse never reaches prune's live set."""
    _apply_settings(monkeypatch, setting)
    ops, n_literal, chunks = BAD_DELTAS[bad]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full_id, below, bad_id, above = await chain_with_a_bad_link(
                store, ops, n_literal, chunks
            )
            bad_leaf = await put(store, recs(3, n_literal), below, ops, chunks=chunks)
            good = await put(store, recs(4, 1), below, [[1, 1], [0, 3, 5]])
            ids = [above, bad_leaf, good, bad_id, below, full_id]
            before = open_descriptors()
            _order, got = await walked(store, ids)
            assert await settled_descriptors(before) == before
            for gen_id in ids:
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            for gen_id, named in ((bad_id, bad_id), (above, bad_id), (bad_leaf, bad_leaf)):
                assert isinstance(got[gen_id], IntegrityError), (gen_id, got[gen_id])
                assert named in str(got[gen_id])
            below_records = below_table()
            assert got[below][1] == below_records
            assert got[good][1] == apply_delta(below_records, recs(4, 1), [[1, 1], [0, 3, 5]], "s")

    run_asyncio(go())


# --- the storage changes between the header probe and the read -------------------------------


def _cut_in_body(data: bytes, other: bytes) -> bytes:
    return data[: len(data) - 7]


def _extended(data: bytes, other: bytes) -> bytes:
    return data + b"\0" * 40


def _another_body(data: bytes, other: bytes) -> bytes:
    from dedupe.format.manifest import header_span

    _s, end = header_span(data, "this")
    _s, other_end = header_span(other, "other")
    return data[:end] + other[other_end:]


def _another_manifest(data: bytes, other: bytes) -> bytes:
    return other


def _header_only(data: bytes, other: bytes) -> bytes:
    from dedupe.format.manifest import header_span

    _s, end = header_span(data, "this")
    return data[:end]


CHANGES = {
    "cut inside its last frame": _cut_in_body,
    "bytes appended": _extended,
    "its sibling's body after its header": _another_body,
    "its sibling's manifest whole": _another_manifest,
    "its header alone": _header_only,
}


@pytest.mark.parametrize("setting", ["default", "files"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_manifest_changed_after_the_header_probe_fails_with_everything_based_on_it(
    run_asyncio: Any, repo_path: Path, monkeypatch: pytest.MonkeyPatch, change: str, setting: str
) -> None:
    """A chain full -> mid -> top (mid has a second child, `side`, written with the same
    ops, so that its body is a valid body of another generation). The walk's header
    probe sees every manifest intact; then, before the first body is read, mid's file is
    replaced (cut, extended, given side's body, replaced by side's manifest whole, cut
    to its header). mid and top, which is based on it, fail with a DedupeError, as
    generation_chunks fails on them; the full and side still give their tables.

    Property: what orders the walk (the headers) is never trusted for what the walk
    hands out; each manifest is checked when its body is read, and a child is composed
    only on a parent whose body checked out (a parent that failed keeps nothing)."""
    _apply_settings(monkeypatch, setting)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full_id = await put(store, recs(0, 12))
            mid = await put(store, recs(1, 3), full_id, [[0, 0, 6], [1, 3], [0, 6, 6]])
            side = await put(store, recs(1, 3), full_id, [[0, 0, 6], [1, 3], [0, 6, 6]], size=1)
            top = await put(store, recs(2, 1), mid, [[0, 2, 10], [1, 1]])
        path = repo_path / "generations" / mid
        original = path.read_bytes()
        replaced = CHANGES[change](original, (repo_path / "generations" / side).read_bytes())
        assert replaced != original
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            real_spill = store.spill_manifest

            async def spill_after_change(gen_id: str, sink: Any) -> Any:
                path.write_bytes(replaced)  # every header was probed before the first read
                return await real_spill(gen_id, sink)

            store.spill_manifest = spill_after_change  # type: ignore[method-assign]
            ids = [full_id, mid, side, top]
            before = open_descriptors()
            _order, got = await walked(store, ids)
            assert await settled_descriptors(before) == before
            for gen_id in (mid, top):
                assert isinstance(got[gen_id], DedupeError), (gen_id, got[gen_id])
                assert isinstance(await reference(store, gen_id), DedupeError)
            for gen_id in (full_id, side):
                agree(got[gen_id], await reference(store, gen_id), gen_id)
                assert not isinstance(got[gen_id], Exception)

    run_asyncio(go())


# --- what the header probe says is only an order ---------------------------------------------


@pytest.mark.parametrize("lie", ["another parent", "no parent", "a cycle"])
def test_parents_the_probe_reports_wrongly_never_change_a_table(
    run_asyncio: Any, repo_path: Path, lie: str
) -> None:
    """Two fulls of 10 records each, A and B (different ids), and a delta D on A that
    copies 10 records and a delta E on D. The header probe (read_manifest_header, which
    a handle may answer from its cache) is made to report D's parent as B (a full of
    the same size: composed on it, D's ops would make a table of B's records), as none,
    or D and E as each other's parents. The walk gives D and E the tables
    generation_chunks gives, which follow the bodies.

    Not reachable by an attacker: a manifest's id hashes its header and the cache's
    copies are MACed and hashed. It pins the walk's own check that the delta names the
    parent the walk ordered it by (`delta["parent"] == parent`), which is what stands
    between a wrong order and a wrong table."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            a = await put(store, recs(10, 10))
            b = await put(store, recs(11, 10))
            d = await put(store, recs(12, 1), a, [[0, 0, 10], [1, 1]])
            e = await put(store, b"", d, [[0, 1, 10]])
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            real = store.read_manifest_header
            every: dict[str, dict[str, str | None]] = {
                "another parent": {d: b},
                "no parent": {d: None},
                "a cycle": {d: e, e: d},
            }
            lies = every[lie]

            async def lying(gen_id: str) -> dict[str, Any]:
                header = dict(await real(gen_id))
                if gen_id in lies:
                    header["parent"] = lies[gen_id]
                return header

            store.read_manifest_header = lying  # type: ignore[method-assign]
            order, got = await walked(store, [a, b, d, e])
            assert sorted(order) == sorted([a, b, d, e])
            for gen_id in (a, b, d, e):
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            assert got[d][1] == recs(10, 10) + recs(12, 1)

    run_asyncio(go())


# --- type confusion between streams and trees ------------------------------------------------


async def _tree_and_forgeries(repo_path: Path, tmp_path: Path) -> tuple[str, str, str, str]:
    """(a directory tree's full, a stream delta on it, a stream full, a tree delta on that
    stream full) in a repository whose chunks are real (verify can vouch)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(9_000))
    async with await make_repo(repo_path) as repo:
        tree = (await repo.backup(src, name="dir", kind="full")).id
        stream = (await repo.backup(io.BytesIO(os.urandom(30_000)), name="db")).id
        store = repo._store
        _h, tree_meta, tree_literal = await store.read_manifest(tree)
        n = len(tree_literal) // R
        # A stream delta whose parent is the tree: its ops copy the tree's literal table.
        on_tree = await put(store, b"", tree, [[0, 0, n]])
        # A tree delta whose parent is a stream full: the tree full's body (a complete,
        # consistent tree on its own) naming the stream as its parent.
        from conftest import manifest_header

        header = manifest_header(
            "dir", kind="incremental", parent=stream, source={"type": "tree", "label": "x"}
        )
        meta = dict(tree_meta, delta={"parent": stream})
        tree_on_stream = await store.write_manifest(header, meta, tree_literal)
    return tree, on_tree, stream, tree_on_stream


def test_a_stream_on_a_tree_and_a_tree_on_a_stream_walk_as_generation_chunks_expands_them(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """Authentic manifests that mix the types along a chain: a stream delta whose parent
    is a directory tree, and a tree delta whose parent is a stream full. The walk keeps
    the tree's expanded tree (not a _Spool) and the stream's spool (not a tree), so
    neither child is composed on the wrong kind of parent: both go through
    generation_chunks and get exactly its outcome: both fail (the stream on the tree
    since generation_chunks requires a stream's chain to be streams: see the next
    test)."""

    async def go() -> None:
        ids = await _tree_and_forgeries(repo_path, tmp_path)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            _order, got = await walked(store, list(ids))
            for gen_id in ids:
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            tree, on_tree, stream, tree_on_stream = ids
            assert isinstance(got[tree_on_stream], IntegrityError)
            assert isinstance(got[on_tree], IntegrityError)

    run_asyncio(go())


def test_verify_does_not_vouch_for_a_stream_on_a_tree_that_restore_refuses(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """Was a finding of the stop 31 adversary review (pre-existing, in
    generation_chunks): a key that signs generations writes a stream delta whose parent
    is a directory tree. _check_meta checks each body's own type, and _expand_stream did
    not check that the links below are streams, so generation_chunks expanded it over
    the tree's literal table and verify (through the walk's fallback) called it sound,
    while restore (spill_complete_table, which checks every link's type) refuses it.
    FORMAT 8.1: a reader refuses a stream's chain any link of which is not a stream.
    Now verify names it, as restore refuses it."""

    async def go() -> None:
        _tree, on_tree, _stream, tree_on_stream = await _tree_and_forgeries(repo_path, tmp_path)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            with pytest.raises(IntegrityError, match="not a stream"):
                await spill_complete_table(store, on_tree)
            with pytest.raises(IntegrityError, match="not a stream"):
                await repo.restore(on_tree, io.BytesIO())
            report = await repo.verify()
            damaged = {d.name.rsplit("/", 1)[-1] for d in report.damaged}
            assert tree_on_stream in damaged  # refused as it should be
            assert on_tree in damaged

    run_asyncio(go())


# --- a parent that fails keeps nothing --------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_parent_whose_body_fails_after_its_records_were_spilled_keeps_nothing(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_spools: list[TrackedSpool],  # noqa: F811
    setting: str,
) -> None:
    """A full of 40 000 records (three table frames) whose last byte is flipped: its
    table frames open and go to its spool before the meta frame fails. Its children (a
    delta that copies the whole full, kept for a grandchild, and a leaf) fail with it,
    as generation_chunks fails on them, and no spool or scratch file stays open; a
    second full and its child, walked in between, are unaffected.

    Property: a parent's partly filled spool is never kept for its children (the
    exception path closes the step before take_kept)."""
    _apply_settings(monkeypatch, setting)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            big = recs(20, 40_000)
            bad_full = await put(store, big)
            child = await put(store, b"", bad_full, [[0, 0, 40_000]])
            grandchild = await put(store, b"", child, [[0, 5, 10]])
            leaf = await put(store, recs(21, 1), bad_full, [[1, 1], [0, 0, 3]])
            ok_full = await put(store, recs(22, 40_000))
            ok_child = await put(store, b"", ok_full, [[0, 0, 40_000]])
        path = repo_path / "generations" / bad_full
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            ids = [bad_full, ok_full, child, ok_child, grandchild, leaf]
            before = open_descriptors()
            tracked_spools.clear()
            _order, got = await walked(store, ids)
            assert all(s.closed for s in tracked_spools)
            assert await settled_descriptors(before) == before
            for gen_id in ids:
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            for gen_id in (bad_full, child, grandchild, leaf):
                assert isinstance(got[gen_id], DedupeError)
            assert got[ok_child][1] == recs(22, 40_000)

    run_asyncio(go())


# --- prune ------------------------------------------------------------------------------------


def test_prune_deletes_nothing_while_a_crafted_delta_fails_in_the_walk(
    run_asyncio: Any, repo_path: Path
) -> None:
    """A real full and an authentic incremental on it whose header says one record more
    than its ops make (a key that signs generations can write it). generation_chunks
    refuses it; prune, whose live set is the walk's tables, must refuse to prune rather
    than count the incremental's chunks dead, and every pack stays."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = (await repo.backup(io.BytesIO(os.urandom(200_000)), name="db")).id
            store = repo._store
            _h, _m, table = await store.read_manifest(full)
            n = len(table) // R
            # The incremental references only its own literal records: new chunks that
            # only it names. Back a second stream up, take its table as the literals,
            # then forget that stream: its chunks are live only through the forgery.
            other = (await repo.backup(io.BytesIO(os.urandom(100_000)), name="tmp")).id
            _h, _m, literal = await store.read_manifest(other)
            k = len(literal) // R
            bad = await put(store, literal, full, [[0, 0, n], [1, k]], chunks=n + k + 1)
            await repo.forget(ids=[other])
            with pytest.raises(IntegrityError):
                await store.generation_chunks(bad)
        packs = sorted(p.name for p in (repo_path / "packs").rglob("*") if p.is_file())
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            with pytest.raises(IntegrityError):
                await repo.prune()
        assert sorted(p.name for p in (repo_path / "packs").rglob("*") if p.is_file()) == packs

    run_asyncio(go())


# --- what the walk keeps -------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["default", "files"])
def test_the_walk_keeps_only_the_tables_generations_still_to_come_are_based_on(
    run_asyncio: Any,
    repo_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tracked_spools: list[TrackedSpool],  # noqa: F811
    setting: str,
) -> None:
    """A full, a chain of 10 incrementals on it and 5 differentials on the full (leaves).
    Whenever the walk hands a table out, at most 4 of its spools are open: the full's
    table (the differentials wait for it), the parent's, the generation's own and its
    table written out for its child; a leaf's table is never kept, and a parent's goes
    once its last child is done.

    Property: the scratch space (or memory) of verify, prune and stats is a few tables,
    not one per generation (fails when every generation's table is kept, `keep=True`,
    until the walk ends: the walk's memory is bounded, its TMPDIR would not be)."""
    _apply_settings(monkeypatch, setting)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            full = recs(0, 30)
            full_id = await put(store, full)
            ids, parent = [full_id], full_id
            for link in range(10):
                parent = await put(store, recs(1 + link, 2), parent, [[1, 2], [0, 2, 20]])
                ids.append(parent)
            for leaf in range(5):
                ids.append(await put(store, recs(20 + leaf, 1), full_id, [[0, leaf, 9], [1, 1]]))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            tracked_spools.clear()
            most = 0
            async for gen_id, outcome in each_generation_table(store, ids):
                assert not isinstance(outcome, Exception), (gen_id, outcome)
                most = max(most, sum(not s.closed for s in tracked_spools))
                joined(outcome)
            assert all(s.closed for s in tracked_spools)
            assert len(tracked_spools) == len(ids) + 9  # own tables; 9 written out
            assert most <= 4, f"{most} spools open at once"

    run_asyncio(go())


def test_a_delta_whose_body_names_another_parent_than_its_header_fails_in_the_walk(
    run_asyncio: Any, repo_path: Path
) -> None:
    """An authentic manifest whose header names full A as its parent and whose delta
    names full B (same size, other records), and a child on it. The walk orders it after
    A (its header), reads its body, and hands out the IntegrityError generation_chunks
    raises, for it and for its child; never a table composed on A or on B."""

    async def go() -> None:
        from conftest import manifest_header

        async with await make_repo(repo_path) as repo:
            store = repo._store
            a = await put(store, recs(30, 8))
            b = await put(store, recs(31, 8))
            header = manifest_header("db", kind="incremental", parent=a, chunks=8)
            meta = {
                "type": "stream",
                "digest": "ab" * 32,
                "chunk_count": 0,
                "delta": {"parent": b, "ops": [[0, 0, 8]]},
            }
            mixed = await store.write_manifest(header, meta, b"")
            child = await put(store, b"", mixed, [[0, 0, 8]])
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            _order, got = await walked(store, [child, mixed, b, a])
            for gen_id in (a, b, mixed, child):
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            for gen_id in (mixed, child):
                assert isinstance(got[gen_id], IntegrityError), got[gen_id]

    run_asyncio(go())


@pytest.mark.parametrize(
    "delta", ["no ops", "ops not a list", "not an object"], ids=lambda d: d.replace(" ", "-")
)
def test_verify_names_a_malformed_stream_delta_instead_of_stopping(
    run_asyncio: Any, repo_path: Path, delta: str
) -> None:
    """Was a finding of the stop 31 adversary review (pre-existing, not in the walk): an
    authentic stream manifest whose delta names its parent and has no `ops` passed
    _check_meta; expanding it read meta["delta"]["ops"] and raised KeyError, in the walk
    as in generation_chunks. verify classifies only DedupeError (and zstd / JSON errors)
    as damage and re-raises anything else: one such manifest, which any key that signs
    generations can write, stopped every verify of the repository before it reported
    anything. Now every reader refuses it as malformed (FORMAT.md 8.1), with the delta's
    other malformed shapes (ops that are not a list, a delta that is not an object),
    and verify names it."""
    shapes: dict[str, Any] = {
        "no ops": lambda full: {"parent": full},
        "ops not a list": lambda full: {"parent": full, "ops": {"0": [0, 0, 1]}},
        "not an object": lambda full: [full, [[0, 0, 1]]],
    }

    async def go() -> None:
        from conftest import manifest_header

        async with await make_repo(repo_path) as repo:
            full = (await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")).id
            store = repo._store
            header = manifest_header("db", kind="incremental", parent=full)
            meta = {
                "type": "stream",
                "digest": "ab" * 32,
                "chunk_count": 0,
                "delta": shapes[delta](full),
            }
            odd = await store.write_manifest(header, meta, b"")
            _order, got = await walked(store, [full, odd])
            assert isinstance(got[odd], IntegrityError), got[odd]
            assert "malformed delta" in got[odd].message
            with pytest.raises(IntegrityError, match="malformed delta"):
                await store.generation_chunks(odd)
            with pytest.raises(IntegrityError, match="malformed delta"):
                await repo.restore(odd, io.BytesIO())
            report = await repo.verify()
            assert [d.name.endswith(odd) for d in report.damaged] == [True]

    run_asyncio(go())


def test_sibling_tree_deltas_do_not_see_each_other(run_asyncio: Any, repo_path: Path) -> None:
    """A directory tree's full F and two authentic deltas on it, walked in this order:
    D1 deletes f1 and adds a file x; D2 changes nothing. D2's complete table is F's
    (f1 in, x out), as generation_chunks gives it: D1 was applied to a copy of F's
    expanded tree, not to the tree kept for D2.

    Property: a tree kept for several children is never changed by one of them
    (`dict(base)` in _tree_step). Without the copy, D2's table loses f1's records
    (verify would not tie f1's damaged chunks to D2) and gains x's. The existing
    test_tables test kills that mutant only when the backups' entries happen to differ
    (flaky); this one always does."""

    async def go() -> None:
        from conftest import manifest_header

        src = repo_path.parent / "src"
        src.mkdir()
        for i in range(3):
            (src / f"f{i}").write_bytes(os.urandom(6_000 + i))
        async with await make_repo(repo_path) as repo:
            full = (await repo.backup(src, name="dir", kind="full")).id
            store = repo._store
            _h, meta, literal = await store.read_manifest(full)
            f0 = next(e for e in meta["entries"] if e["path"] == "f0")
            start, count = f0["chunks"]
            x = dict(f0, path="x", chunks=[0, count])
            header = manifest_header(
                "dir", kind="differential", parent=full, source={"type": "tree", "label": "x"}
            )

            def body(entries: list[Any], deleted: list[str], n: int) -> dict[str, Any]:
                return {
                    "type": "tree",
                    "chunk_count": n,
                    "entries": entries,
                    "deleted": deleted,
                    "delta": {"parent": full},
                }

            d1 = await store.write_manifest(
                header, body([x], ["f1"], count), literal[start * R : (start + count) * R]
            )
            d2 = await store.write_manifest(dict(header, size=1), body([], [], 0), b"")
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            order, got = await walked(store, [full, d1, d2])
            assert order == [full, d1, d2]
            for gen_id in (full, d1, d2):
                agree(got[gen_id], await reference(store, gen_id), gen_id)
            assert got[d2][1] == got[full][1] != got[d1][1]

    run_asyncio(go())
