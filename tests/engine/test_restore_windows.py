"""What restore hands out (engine/restore.py, `Window`): a window's chunks, repeats and
out-of-order chunks included, as one buffer (one digest update and one iovec per window,
not per 4 KiB page), `chunks` counting every chunk; a tree restore's `per_chunk` stream
has one buffer per chunk. The bytes are the stream's either way."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from conftest import make_repo

from dedupe.engine.restore import Window, restore_chunks
from dedupe.format.manifest import CHUNK_RECORD

PAGE = 4096


def _pages() -> tuple[bytes, int]:
    """Distinct pages with repeats: the second half reuses pages of the first, out of
    order, so the restored stream needs chunks from anywhere in the packs."""
    rng = random.Random(5)
    fresh = [os.urandom(PAGE) for _ in range(600)]
    order = list(range(600)) + [rng.randrange(600) for _ in range(300)]
    return b"".join(fresh[i] for i in order), len(order)


def test_a_window_is_one_buffer_and_a_tree_restore_gets_one_per_chunk(tmp_path: Path) -> None:
    data, pages = _pages()
    src = tmp_path / "pages.bin"
    src.write_bytes(data)

    async def main() -> None:
        async with await make_repo(tmp_path / "repo", pack_size=1 << 20) as repo:
            await repo.backup(src, name="p", chunker="fixed:4096")
            gen = (await repo.generations())[-1]
            store = repo._store
            meta, table = await store.generation_chunks(gen.id)
            assert len(table) // CHUNK_RECORD.size == pages
            for per_chunk in (False, True):
                stream = restore_chunks(
                    store, gen.id, [table], meta["digest"], repo._executor, per_chunk=per_chunk
                )
                windows = [w async for w in stream]
                assert all(isinstance(w, Window) for w in windows)
                assert b"".join(b"".join(w) for w in windows) == data
                assert sum(w.chunks for w in windows) == pages
                buffers = sum(len(w) for w in windows)
                if per_chunk:
                    assert buffers == pages
                    assert all(len(b) == PAGE for w in windows for b in w)
                else:
                    assert buffers == len(windows)

    asyncio.run(main())
