"""`stats`, `ls` and `diff` (issue 13, point 10): read-only views of what a repository
holds, checked against what the test itself wrote."""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_repo

from dedupe.crypto import KdfParams
from dedupe.errors import RoleNotPermitted

MiB = 1024 * 1024


def test_stats_separates_dedupe_from_compression(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(5)
    noise = rng.randbytes(600_000)  # does not compress
    text = b"".join(b"row %d: the same kind of line again\n" % i for i in range(40_000))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(noise), name="a", kind="full")
            await repo.backup(io.BytesIO(noise), name="a")  # all dedupes
            await repo.backup(io.BytesIO(text), name="b", kind="full")
            groups = {g.name: g for g in await repo.stats()}
            a, b, total = groups["a"], groups["b"], groups[None]
            assert (a.generations, b.generations, total.generations) == (2, 1, 3)
            assert a.logical_bytes == 2 * len(noise) and a.unique_bytes == len(noise)
            assert a.dedupe_ratio == pytest.approx(2.0)
            assert a.compression_ratio < 1.01  # random bytes: sealing only adds
            assert b.unique_bytes == len(text) and b.dedupe_ratio < 1.01
            assert b.compression_ratio > 3  # repetitive text compresses
            assert total.logical_bytes == a.logical_bytes + b.logical_bytes
            assert total.unique_bytes == a.unique_bytes + b.unique_bytes  # nothing shared
            assert total.stored_bytes == a.stored_bytes + b.stored_bytes
            assert total.missing_chunks == 0
            only_a = await repo.stats("a")
            assert [g.name for g in only_a] == ["a", None] and only_a[0] == a

    run(go())


def test_stats_count_a_chunk_once_per_group_however_often_it_appears(  # type: ignore[no-untyped-def]
    run, repo_path: Path
) -> None:
    """Page chunks make the arithmetic exact: a page repeated within a stream, within a
    name across generations and across names counts once in each group it is in."""
    rng = random.Random(6)
    page = [rng.randbytes(4096) for _ in range(6)]
    a1 = page[0] * 5 + page[1]  # page 0 five times in one stream
    a2 = page[0] + page[2]
    c = page[1] + page[3] + page[3]

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            for name, data in (("a", a1), ("a", a2), ("c", c)):
                await repo.backup(io.BytesIO(data), name=name, kind="full", chunker="fixed:4096")
            groups = {g.name: g for g in await repo.stats()}
            a, cc, total = groups["a"], groups["c"], groups[None]
            assert (a.chunks, cc.chunks, total.chunks) == (3, 2, 4)  # pages 0-2; 1, 3; 0-3
            assert (a.unique_bytes, cc.unique_bytes) == (3 * 4096, 2 * 4096)
            assert total.unique_bytes == 4 * 4096
            assert total.stored_bytes < a.stored_bytes + cc.stored_bytes  # page 1 is shared
            only_c = await repo.stats("c")
            assert only_c[0] == cc and only_c[1].chunks == 2 and only_c[1].generations == 1

    run(go())


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "keep.txt").write_bytes(b"unchanged" * 1000)
    (root / "sub" / "edit.db").write_bytes(os.urandom(200_000))
    (root / "gone.log").write_bytes(b"old log")
    (root / "mode.sh").write_bytes(b"#!/bin/sh\n")
    os.symlink("keep.txt", root / "link")


def test_ls_and_diff_of_trees(run, repo_path: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    _tree(root)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(root, name="t", kind="full")
            entries = {e["path"]: e for e in await repo.ls(first.id)}
            assert set(entries) == {
                ".",
                "keep.txt",
                "sub",
                "sub/edit.db",
                "gone.log",
                "mode.sh",
                "link",
            }
            assert entries["sub/edit.db"]["size"] == 200_000
            assert entries["link"]["target"] == "keep.txt"
            assert entries["keep.txt"]["type"] == "file" and entries["sub"]["type"] == "dir"
            mode = stat.S_IMODE((root / "mode.sh").stat().st_mode)
            assert stat.S_IMODE(entries["mode.sh"]["mode"]) == mode
            assert [e["path"] for e in await repo.ls(first.id, "sub")] == ["sub", "sub/edit.db"]

            data = bytearray((root / "sub" / "edit.db").read_bytes())
            data[100_000:100_010] = b"X" * 10
            (root / "sub" / "edit.db").write_bytes(bytes(data))
            (root / "gone.log").unlink()
            (root / "new.txt").write_bytes(b"hello")
            (root / "mode.sh").chmod(0o755)
            second = await repo.backup(root, name="t")
            d = await repo.diff(first.id, second.id)
            assert d["type"] == "tree"
            assert [e["path"] for e in d["added"]] == ["new.txt"]
            assert [e["path"] for e in d["removed"]] == ["gone.log"]
            changed = {e["path"]: e["changed"] for e in d["changed"]}
            assert "content" in changed["sub/edit.db"]
            assert changed["mode.sh"] == ["mode"]
            assert "keep.txt" not in changed and "link" not in changed

    run(go())


def test_diff_of_streams_names_the_new_ranges(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    old = random.Random(8).randbytes(3 * MiB)
    new = bytearray(old)
    new[MiB : MiB + 100] = os.urandom(100)  # one small edit in the middle

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            a = await repo.backup(io.BytesIO(old), name="s", kind="full")
            b = await repo.backup(io.BytesIO(bytes(new)), name="s")
            d = await repo.diff(a.id, b.id)
            assert d["type"] == "stream" and d["new_size"] == len(new)
            assert d["new_bytes"] == sum(e - s for s, e in d["changed_ranges"])
            assert 100 <= d["new_bytes"] < len(new) // 4
            assert any(s <= MiB < e for s, e in d["changed_ranges"])  # covers the edit
            same = await repo.diff(a.id, a.id)
            assert same["new_bytes"] == 0 and same["changed_ranges"] == []
            (row,) = await repo.ls(b.id)
            assert row["type"] == "stream" and row["size"] == len(new) and len(row["digest"]) == 64

    run(go())


def test_a_writer_key_may_not_read_generations(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(os.urandom(10_000)), name="x")
            await repo.keys.add(b"writer pass", role="writer", name="w", kdf=KdfParams.weakest())
        from dedupe import Repository

        async with await Repository.open(repo_path, b"writer pass") as w:
            for call in (w.stats(), w.ls(gen.id), w.diff(gen.id, gen.id)):
                with pytest.raises(RoleNotPermitted):
                    await call

    run(go())


def test_the_commands(run, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    _tree(root)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(root, name="t", kind="full")
            (root / "new.txt").write_bytes(b"hello")
            await repo.backup(root, name="t")

    run(go())

    def cli(*args: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "dedupe", *args], env=cli_env, capture_output=True
        )
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    assert "(total)" in cli("stats") and "compression" in cli("stats")
    listing = cli("ls", "t@latest")
    assert "sub/edit.db" in listing and "\n-rw" in listing and "\ndrwx" in listing
    assert "lrwx" in listing and "link -> keep.txt" in listing
    gens = [line.split()[0] for line in cli("generations").splitlines()[1:]]
    assert "+ new.txt" in cli("diff", *gens)
