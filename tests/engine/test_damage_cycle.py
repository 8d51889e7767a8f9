"""The repair cycle an operator runs after bit rot: verify finds a flipped byte and names
the generations it hits, the next full stores the damaged chunk again, every generation
restores, and after prune verify --read-data passes."""

from __future__ import annotations

import io
import os
from pathlib import Path

from conftest import PASSPHRASE, make_repo

from dedupe import Repository
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
