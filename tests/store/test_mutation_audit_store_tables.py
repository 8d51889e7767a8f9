"""Mutation audit of dedupe/store/tables.py (issue 12): the test that kills `_expand_43`,
a tree delta whose parent was not expanded read on its own. Each test names the property
it pins and the mutant it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo
from test_tables import joined, same_failure

from dedupe import Repository
from dedupe.errors import DedupeError
from dedupe.store.tables import each_generation_table

Run = Callable[..., Any]


def test_a_tree_delta_is_never_expanded_without_its_parent(
    run_asyncio: Run, repo_path: Path, tmp_path: Path
) -> None:
    """A directory backed up as a full, then twice as an incremental (a file added at
    the top, then a file changed). Asked for the incrementals without their full,
    each_generation_table gives each the complete table generation_chunks gives (the
    full's files included). Then the full's body is damaged: the full fails, and so does
    every incremental based on it, with the error generation_chunks raises; none of them
    is handed out as the table of its own delta.

    Property: verify and prune see a tree generation's complete table or an error, never
    the few files its delta holds (verify would call a generation whose full is damaged
    sound; prune would count the full's chunks dead). Killed: `_expand_43` (`type ==
    "tree" and (...)` -> `or`: a tree delta whose parent is not expanded was expanded on
    an empty tree, and the first incremental passed as sound with only the added file
    in its table). An unknown meta type, which the same mutant also reads as a tree, is
    refused there by decode_tree (stricter); main reads it as a stream through
    generation_chunks, as a restore does."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(4):
        (src / f"f{i}").write_bytes(os.urandom(8_000))
    (src / "sub" / "g").write_bytes(os.urandom(8_000))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = (await repo.backup(src, name="dir", kind="full")).id
            # A file added at the top: the root directory's entry is in the delta too,
            # so the delta alone is a consistent (and much smaller) tree.
            (src / "new").write_bytes(os.urandom(8_000))
            os.utime(src, ns=(1_000_000_000, 1_000_000_000))
            first = (await repo.backup(src, name="dir", kind="incremental")).id
            (src / "sub" / "g").write_bytes(os.urandom(8_000))
            second = (await repo.backup(src, name="dir", kind="incremental")).id
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            for gen_id in (first, second):
                assert (await store.read_manifest_header(gen_id))["parent"] is not None
            outcomes = {
                g: joined(o) async for g, o in each_generation_table(store, [first, second])
            }
            for gen_id in (first, second):
                assert outcomes[gen_id] == await store.generation_chunks(gen_id)
        path = repo_path / "generations" / full
        data = bytearray(path.read_bytes())
        data[-10] ^= 1  # in the body's last frame: the full no longer reads
        path.write_bytes(bytes(data))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            ids = [full, first, second]
            outcomes = {g: joined(o) async for g, o in each_generation_table(store, ids)}
            for gen_id in ids:
                outcome = outcomes[gen_id]
                assert isinstance(outcome, DedupeError), gen_id
                try:
                    await store.generation_chunks(gen_id)
                except DedupeError as e:  # the same kind of failure as on its own
                    assert same_failure(e, outcome)
                else:
                    raise AssertionError(f"{gen_id} expanded on its own")

    run_asyncio(go())


def test_a_generation_of_a_type_this_version_does_not_read_is_not_vouched_for(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """An authenticated manifest (a writer key can make one) whose body is neither a
    stream nor a tree: the table readers took it for a stream, so verify called sound a
    generation that restore refuses. Now every reader refuses it by its type, and verify
    names it."""
    from dedupe.errors import UnsupportedFormat
    from dedupe.format.manifest import CHUNK_RECORD

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            real = await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")
            store = repo._store
            _header, _meta, table = await store.read_manifest(real.id)
            n = len(table) // CHUNK_RECORD.size
            header = {
                "name": "db",
                "kind": "full",
                "parent": None,
                "created": "2026-12-06T00:00:00.000000Z",
                "size": 50_000,
                "chunks": n,
                "new_chunks": 0,
                "new_bytes": 0,
                "stored_bytes": 0,
                "seconds": 0.0,
                "source": {},
            }
            odd = await store.write_manifest(
                header, {"type": "future-kind", "chunk_count": n}, table
            )
            with pytest.raises(UnsupportedFormat, match="future-kind"):
                await store.generation_chunks(odd)
            report = await repo.verify()
            assert not report.ok
            assert [d.name.endswith(odd) for d in report.damaged] == [True]

    run_asyncio(go())
