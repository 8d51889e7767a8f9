"""The repair cycle an operator runs after bit rot: verify finds a flipped byte and names
the generations it hits, the next full stores the damaged chunk again, every generation
restores, and after prune verify --read-data passes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.errors import IntegrityError
from dedupe.format.manifest import CHUNK_RECORD


def test_flip_verify_full_prune_verify(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    shared = os.urandom(400_000)
    data_a = shared + os.urandom(300_000)
    data_b = os.urandom(500_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_a = await repo.backup(io.BytesIO(data_a), name="a", kind="full")
            gen_b = await repo.backup(io.BytesIO(data_b), name="b", kind="full")
            # Flip a byte inside the blob of a's first chunk.
            store = repo._store
            _meta, table = await store.generation_chunks(gen_a.id)
            first_id = next(CHUNK_RECORD.iter_unpack(table))[0]
            loc = store.index.get(first_id)
            assert loc is not None
            pack = store.index.packs[loc.pack_no].pack_id.hex()
        path = repo_path / "packs" / pack[:2] / pack
        raw = bytearray(path.read_bytes())
        raw[loc.offset + loc.stored_length // 2] ^= 0x40
        path.write_bytes(bytes(raw))

        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            report = await repo.verify(read_data=True)
            assert not report.ok
            hit = {g for d in report.damaged for g in d.generations}
            assert hit == {gen_a.id}, "only the generation using the chunk is named"
            assert any(first_id.hex() in d.chunk_ids for d in report.damaged)
            # The next full stores the damaged chunk again ...
            again = await repo.backup(io.BytesIO(data_a), name="a", kind="full")
            assert again.chunks_new >= 1
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            # ... after which every generation, the old one too, restores exactly,
            for gen, want in ((gen_a.id, data_a), (again.id, data_a), (gen_b.id, data_b)):
                out = io.BytesIO()
                await repo.restore(gen, out)
                assert out.getvalue() == want
            # no generation is affected any more (the bad copy is superseded),
            report = await repo.verify(read_data=True)
            assert not any(d.generations for d in report.damaged)
            # and prune drops the superseded copy: verify passes outright.
            await repo.prune(repack_threshold=0.0)
            report = await repo.verify(read_data=True)
            assert report.ok, report.to_dict()

    run(go())


def test_a_damaged_index_object_does_not_lock_everyone_out(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dedupe.errors import MissingObject

    data_a, data_b = os.urandom(300_000), os.urandom(300_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            a = await repo.backup(io.BytesIO(data_a), name="a", kind="full")
            b = await repo.backup(io.BytesIO(data_b), name="b", kind="full")
        # Flip a byte in the index object written by the second backup.
        objects = sorted((repo_path / "index").iterdir(), key=lambda p: p.stat().st_mtime_ns)
        victim = objects[-1]
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 1
        victim.write_bytes(bytes(raw))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            out = io.BytesIO()
            await repo.restore(a.id, out)  # untouched by the damage
            assert out.getvalue() == data_a
            try:
                await repo.restore(b.id, io.BytesIO())
            except MissingObject as e:
                assert victim.name in str(e)
            else:
                raise AssertionError("restore of b must fail: its chunks lost their index")
            report = await repo.verify()
            assert not report.ok
            assert any(victim.name in d.name for d in report.damaged)
            # Prune must not take the packs only the damaged object lists for garbage.
            packs_before = sorted(p.name for p in (repo_path / "packs").rglob("*"))
            with pytest.raises(IntegrityError):
                await repo.prune()
            assert sorted(p.name for p in (repo_path / "packs").rglob("*")) == packs_before

    run(go())
