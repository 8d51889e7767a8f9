"""A generation whose header is sound and whose body is damaged (a torn manifest on a
store without atomic writes, bit rot) is listed, by its header, as `NAME@latest`. The
next incremental or differential must not fail because of it, nor chain onto it: it is
made as a full, says why, and restores (found by the crash-point harness's torn writes)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import make_repo

from dedupe.errors import IntegrityError


@pytest.mark.parametrize("source", ["stream", "tree"])
@pytest.mark.parametrize("kind", ["incremental", "differential"])
def test_a_backup_onto_a_damaged_latest_generation_is_made_as_a_full(
    run_asyncio,
    repo_path: Path,
    tmp_path: Path,
    source: str,
    kind: str,  # type: ignore[no-untyped-def]
) -> None:
    data = os.urandom(200_000)
    tree = tmp_path / "src"
    (tree / "d").mkdir(parents=True)
    (tree / "d" / "f.bin").write_bytes(data)

    def what() -> str | io.BytesIO:
        return str(tree) if source == "tree" else io.BytesIO(data)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(what(), name="db", kind="full")
            manifest = repo_path / "generations" / first.id
            raw = bytearray(manifest.read_bytes())
            raw[-3] ^= 0x01  # in the body: the header, and the listing, are intact
            manifest.write_bytes(bytes(raw))
            assert [g.id for g in await repo.generations("db")] == [first.id]
            with pytest.raises(IntegrityError):
                await repo.restore(first.id, tmp_path / "out-first")

            stats = await repo.backup(what(), name="db", kind=kind)
            assert (stats.kind, stats.parent) == ("full", None)
            assert stats.note is not None and f"{first.id[:12]} of 'db' is damaged" in stats.note
            assert stats.chunks_new == 0  # it still deduplicates against the index
            if source == "tree":
                await repo.restore(stats.id, tmp_path / "out")
                assert (tmp_path / "out" / "d" / "f.bin").read_bytes() == data
            else:
                out = io.BytesIO()
                await repo.restore(stats.id, out)
                assert out.getvalue() == data

    run_asyncio(go())
