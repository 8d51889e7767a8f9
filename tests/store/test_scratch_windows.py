"""Deltas applied through several scratch windows (dedupe.store.tables): the complete
table of an incremental is rebuilt from the parent's and the literal records in pieces of
COPY_RECORDS (~450 MiB of data at default chunking, so a real one needs a large file). The
window is lowered here to 7 records, so that every copy run and literal run of these
generations spans several pieces and ends mid-piece."""

from __future__ import annotations

import io
import os
import random

import pytest
from conftest import PASSPHRASE, make_repo

import dedupe.store.tables as tables
from dedupe import Repository

WINDOW = 7


def _edit(data: bytes, rnd: random.Random, spots: int, size: int) -> bytes:
    out = bytearray(data)
    for _ in range(spots):
        at = rnd.randrange(0, len(out) - size)
        out[at : at + size] = rnd.randbytes(size)
    return bytes(out)


def test_chains_restore_through_many_small_windows(
    run_asyncio,
    repo_path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setattr(tables, "COPY_RECORDS", WINDOW)
    rnd = random.Random(1205)
    full = rnd.randbytes(1_500_000)  # ~90 chunks at 16 KiB
    versions = [full]
    for spots, size in ((2, 30_000), (1, 200_000), (5, 4_000)):  # short and long literal runs
        versions.append(_edit(versions[-1], rnd, spots, size))
    appended = versions[-1] + rnd.randbytes(300_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            made = [(await repo.backup(io.BytesIO(full), name="db", kind="full")).id]
            for v in versions[1:]:
                made.append((await repo.backup(io.BytesIO(v), name="db")).id)
            diff = await repo.backup(io.BytesIO(appended), name="db", kind="differential")
            gens = {g.id: g for g in await repo.generations()}
            assert [gens[g].kind for g in made] == ["full"] + ["incremental"] * 3
            assert gens[diff.id].parent == made[0]
            expected = dict(zip(made, versions, strict=True)) | {diff.id: appended}
            chunks = {g: gens[g].chunks for g in expected}
            assert min(chunks.values()) > 5 * WINDOW  # every table spans several windows
            for gen_id, data in expected.items():
                out = io.BytesIO()
                await repo.restore(gen_id, out)
                assert out.getvalue() == data, f"{gens[gen_id].kind} {gen_id} restored wrong"
            assert (await repo.verify(read_data=True)).ok
        # From a fresh handle too (nothing cached from the backups).
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(made[-1], out)
            assert out.getvalue() == versions[-1]

    run_asyncio(go())
    assert not any(name.startswith(".tmp-") for name in os.listdir(repo_path))
