"""The keyed-id check with teeth (docs/FORMAT.md 2, 6, 9.6): a blob that is authentic
(sealed under its pack's real key, in a pack a key map vouches for, indexed by a signed
index object) and of exactly the right length, but whose content is not the chunk its id
names. Only the comparison of the keyed BLAKE3 of the opened content with the id can tell;
restore, verify and prune's repack each make it, and none passes the wrong bytes on."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo

from dedupe import Repository
from dedupe.errors import IntegrityError
from dedupe.store.packer import PackWriter
from dedupe.store.repository import IndexBatch

Run = Any


async def _plant(repo: Repository, chunk_id: bytes, content: bytes, filler: bytes) -> str:
    """Store `content` under `chunk_id` (and `filler` under its own id, unreferenced, so
    the pack is sparse and prune repacks it), as a key holder's buggy or hostile client
    would: a real pack, a real key, a signed key map and index object. Returns the pack
    file name."""
    store = repo._store
    framed = store.codec.frame([content, filler], [chunk_id, store.hasher.chunk_id(filler)])
    packer = PackWriter(store.pack_size)
    finished = packer.add(framed)
    last = packer.flush()
    if last is not None:
        finished.append(last)
    batch = IndexBatch()
    for pack in finished:
        await store.write_finished_pack(pack, batch)
    await store.write_batch(batch)
    assert len(batch.packs) == 1
    await store.refresh_index()
    return batch.packs[0].pack_id.hex()


def test_authentic_content_of_the_right_length_under_the_wrong_id_is_refused(
    run_asyncio: Run, repo_path: Path
) -> None:
    data = os.urandom(3000)  # shorter than the smallest chunk: one chunk, the whole stream
    wrong = os.urandom(len(data))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            chunk_id = repo._store.hasher.chunk_id(data)
            pack = await _plant(repo, chunk_id, wrong, os.urandom(40_000))
            # The next backup of `data` trusts the index: nothing new is stored.
            stats = await repo.backup(io.BytesIO(data), name="db", kind="full")
            assert (stats.chunks, stats.chunks_new) == (1, 0)

            # restore: the opened blob's keyed id is not the chunk's
            out = io.BytesIO()
            with pytest.raises(IntegrityError, match=chunk_id.hex()[:12]) as refused:
                await repo.restore(stats.id, out)
            print(f"\nrestore: {refused.value}")
            assert wrong not in out.getvalue()

            # prune's repack: the live blob of the sparse pack is checked before it is
            # re-sealed; prune deletes nothing and writes no pack holding it
            packs = sorted(p.name for p in (repo_path / "packs").glob("*/*"))
            with pytest.raises(IntegrityError, match=chunk_id.hex()[:12]) as refused:
                await repo.prune(repack_threshold=0.0)
            print(f"\nprune: {refused.value}")
            assert sorted(p.name for p in (repo_path / "packs").glob("*/*")) == packs

            # verify --read-data: names the copy, quarantines it
            report = await repo.verify(read_data=True)
            assert not report.ok
            assert any(pack in d.name for d in report.damaged), report.to_dict()

            # and the next full stores the chunk again: the generation after it restores
            again = await repo.backup(io.BytesIO(data), name="db", kind="full")
            assert again.chunks_new == 1
            out = io.BytesIO()
            await repo.restore(again.id, out)
            assert out.getvalue() == data

    run_asyncio(go())
