"""Mutation audit of dedupe/store/index.py (issue 12): the chunk index must never offer a
copy in a pack the store lacks, and a later good copy must replace it. Each test names
the property it pins and the mutant(s) it was shown red on (bench/README.md, "Mutation
testing")."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import PASSPHRASE, make_repo

from dedupe import Repository

Run = Callable[..., Any]


def _packs(repo_path: Path) -> set[Path]:
    return {p for p in (repo_path / "packs").rglob("*") if p.is_file()}


async def _restores(repo: Repository, gen_id: str, data: bytes) -> None:
    out = io.BytesIO()
    await repo.restore(gen_id, out)
    assert out.getvalue() == data


def test_chunks_in_lost_packs_are_stored_again_by_the_next_backup(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Two backups, each committed with its own index object; one pack of each is lost.
    A new handle loads both index objects (in whatever order), and a new backup of the
    same data stores the lost chunks again instead of referencing the missing packs: it
    restores byte for byte.

    Property: a chunk whose only copy is in a pack the store lacks is not usable for
    dedupe (no data loss: a backup never references a chunk that is not stored).
    Killed: ChunkIndex.add_records not marking the packs of an index object missing
    (`present = None`), and overwriting (`=`) or intersecting (`&=`) the missing packs
    of the objects loaded before it."""

    async def go() -> None:
        data = [os.urandom(200_000), os.urandom(200_000)]
        lost = []
        async with await make_repo(repo_path) as repo:
            for i, d in enumerate(data):
                before = _packs(repo_path)
                await repo.backup(io.BytesIO(d), name=f"db{i}")
                lost.append(sorted(_packs(repo_path) - before)[0])
        for pack in lost:
            pack.unlink()
        both = b"".join(data)  # one backup: both index objects are loaded before it
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            again = await repo.backup(io.BytesIO(both), name="both", kind="full")
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await _restores(repo, again.id, both)

    run_asyncio(go())


def test_a_good_copy_stored_later_replaces_one_in_a_lost_pack(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A pack of a generation is lost; the same handle backs the data up again, which
    stores the lost chunks anew. Every chunk of the first generation now resolves to its
    new copy (not to the first index entry, in the missing pack): the first generation
    restores, in that handle and in a new one.

    Property: an unusable location is replaced by a later usable copy of the chunk
    (ChunkIndex.add_records' duplicate pass). Killed: every duplicate record read from
    offset 0 (`_RECORD.unpack_from(view)`: only the first record's chunk was looked at)."""

    async def go() -> None:
        data = os.urandom(300_000)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
            packs = sorted(_packs(repo_path))
            assert len(packs) >= 3
            for pack in packs[1:]:
                pack.unlink()
            await repo.backup(io.BytesIO(data), name="db", kind="full")
            await _restores(repo, gen.id, data)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await _restores(repo, gen.id, data)

    run_asyncio(go())
