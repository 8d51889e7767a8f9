"""Properties of prune's repacking (dedupe/engine/prune.py, `_repack`), on real
repositories: what re-encryption writes is indexed as it goes, and the index object prune
writes at the end lists every rewritten chunk in the pack that holds it."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo, part_live_packs

import dedupe.engine.prune as prune_module
from dedupe import Repository
from dedupe.crypto.aead import Buffer


def test_reencryption_indexes_its_new_packs_every_flush_and_everything_restores(  # type: ignore[no-untyped-def]
    run_asyncio, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`key rotate --reencrypt` indexes its new packs every REENCRYPT_FLUSH packs (here 2),
    so that a run killed half way leaves what it rewrote indexed: never more than that
    many new packs are written before an index object lists them. The index object prune
    writes at the end lists the packs of every flush at their own place (pack numbers of
    later flushes moved past the earlier ones'): every generation restores and verifies,
    from the same handle and a fresh one."""
    monkeypatch.setattr(prune_module, "REENCRYPT_FLUSH", 2)
    data = [os.urandom(300_000), os.urandom(200_000)]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gens = [await repo.backup(io.BytesIO(d), name=f"n{i}") for i, d in enumerate(data)]
            backend = repo._store.backend
            put = backend.put
            puts: list[str] = []

            async def recording_put(name: str, blob: Buffer) -> None:
                puts.append(name.split("/", 1)[0])
                await put(name, blob)

            with monkeypatch.context() as m:
                m.setattr(backend, "put", recording_put)
                await repo.keys.rotate(reencrypt=True)

            kinds = "".join({"packs": "P", "index": "I"}.get(k, "") for k in puts)
            assert kinds.count("P") > 4, kinds
            assert "PPP" not in kinds and kinds.endswith("I"), kinds
            assert len(await backend.list("index/")) == 1
            for gen, d in zip(gens, data, strict=True):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == d
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            for gen, d in zip(gens, data, strict=True):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == d
            report = await repo.verify(read_data=True)
            assert report.ok, report.to_dict()

    run_asyncio(go())


class Stop(Exception):
    pass


def test_a_prune_stopped_after_its_index_object_is_finished_by_the_next_without_repacking(  # type: ignore[no-untyped-def]
    run_asyncio, repo_path: Path
) -> None:
    """Prune stopped right after writing its index object (before deleting anything): the
    live chunks have copies in the old, sparse packs and in the new packs it wrote. The
    next prune prefers the copies in the fuller packs, the new ones (module docstring of
    engine/prune.py): it writes no pack, deletes the old ones, and everything restores."""
    kept = os.urandom(300_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gone_id, keep_id = await part_live_packs(repo, kept)
            before = {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}

            def stop(progress: Any) -> None:
                if progress.stage == "deleting index objects":
                    raise Stop

            with pytest.raises(Stop):
                await repo.prune(repack_threshold=0.0, progress=stop)
            written = {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()} - before
            assert written

            report = await repo.prune(repack_threshold=0.0)
            assert report.packs_written == 0 and report.packs_repacked == 0
            left = {p.name for p in (repo_path / "packs").rglob("*") if p.is_file()}
            assert written <= left
            out = io.BytesIO()
            await repo.restore(keep_id, out)
            assert out.getvalue() == kept

    run_asyncio(go())
