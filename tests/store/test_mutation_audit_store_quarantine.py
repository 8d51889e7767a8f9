"""Mutation audit of dedupe/store/quarantine.py (issue 12): tests that kill the surviving
mutants that changed a safety property. Each test names the property it pins and the
mutant(s) it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.errors import IntegrityError
from dedupe.store.quarantine import read_quarantine

Run = Callable[..., Any]


def test_prune_refuses_while_an_authenticated_quarantine_record_is_unreadable(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A quarantine record that a key map vouches for is damaged in place (one byte
    flipped). Prune refuses, naming it, and deletes nothing: the copies it quarantined
    are unknown, and prune must not keep a damaged copy or delete a good one on that
    ignorance. Backups go on (the record is reported and left out).

    Property: read_quarantine is strict unless asked not to be (prune and verify rely on
    the default). Killed: `strict: bool = True` -> `False` (prune read around the record
    and went on); test_trust's unreadable-record test plants an unauthenticated record,
    which prune refuses by another rule, so it passed on this mutant."""

    async def go() -> None:
        data = os.urandom(120_000)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
            await repo.backup(io.BytesIO(os.urandom(60_000)), name="other")
            name = await repo._store.write_quarantine([(os.urandom(32), os.urandom(32), "x")])
        raw = bytearray((repo_path / name).read_bytes())
        raw[-1] ^= 1
        (repo_path / name).write_bytes(bytes(raw))
        before = sorted(p.relative_to(repo_path) for p in repo_path.rglob("*") if p.is_file())
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await repo.backup(io.BytesIO(data), name="db")
            assert any(name in p for p in repo.problems)
            with pytest.raises(IntegrityError, match=name.rsplit("/", 1)[-1]):
                await repo.prune()
        after = {p.relative_to(repo_path) for p in repo_path.rglob("*") if p.is_file()}
        assert set(before) <= after
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


class _ListsOneGone(LocalBackend):
    """A local store whose quarantine listing also names a record that is gone by the time
    it is read (a prune elsewhere removed it between the LIST and the GET)."""

    GONE = "quarantine/" + "0" * 64

    async def list(self, prefix: str) -> list[str]:
        names = await super().list(prefix)
        return [self.GONE, *names] if prefix.startswith("quarantine") else names


def test_a_quarantine_record_removed_meanwhile_or_unreadable_costs_no_other_record(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Two quarantine records, and before them (in listing order) a name that is gone when
    read and a planted record no key map vouches for: every pair the two good records hold
    is returned (the planted one reported, when not strict).

    Property: quarantined copies stay quarantined (a backup must not reference a copy
    verify found damaged). Killed: `continue` -> `break` after MissingObject, and after
    an unreadable record when not strict (every record after it was dropped)."""

    async def go() -> None:
        pairs = [(os.urandom(32), os.urandom(32)) for _ in range(2)]
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(30_000)), name="db")
            store = repo._store
            for chunk, pack in pairs:
                await store.write_quarantine([(chunk, pack, "damaged")])
            backend = _ListsOneGone(repo_path)
            assert _ListsOneGone.GONE in await backend.list("quarantine/")
            assert await read_quarantine(backend, store.open_quarantine) == set(pairs)
            planted = "quarantine/" + "0" * 63 + "1"
            (repo_path / planted).write_bytes(b"DDPQUA01" + os.urandom(200))
            reported: list[str] = []
            got = await read_quarantine(backend, store.open_quarantine, False, reported.append)
            assert got == set(pairs)
            assert len(reported) == 1 and planted in reported[0]

    run_asyncio(go())
