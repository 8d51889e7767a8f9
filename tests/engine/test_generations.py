"""Full, incremental and differential generations of a changing stream: parents follow the
rules, manifests hold deltas, every generation restores byte for byte on its own, and a
full re-stores chunks whose pack went missing."""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, dedupe_cli, make_repo

from dedupe import Repository


def _mutate(data: bytearray, rng: random.Random) -> bytearray:
    """Scattered edits, an insertion and a deletion, like a day of database traffic."""
    out = bytearray(data)
    for _ in range(5):
        at = rng.randrange(len(out) - 100)
        out[at : at + 100] = rng.randbytes(100)
    at = rng.randrange(len(out))
    out[at:at] = rng.randbytes(rng.randrange(1, 5000))
    at = rng.randrange(len(out) - 3000)
    del out[at : at + rng.randrange(1, 3000)]
    return out


KINDS = [
    "full",
    "incremental",
    "incremental",
    "differential",
    "incremental",
    "full",
    "differential",
    "incremental",
    "differential",
    "incremental",
    "incremental",
    "full",
]


def test_chain_of_12_mixed_generations_restores_each(run, tmp_path: Path, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(12)
    data = bytearray(rng.randbytes(3_000_000))
    versions: list[bytes] = []

    async def go() -> None:
        nonlocal data
        async with await make_repo(repo_path) as repo:
            latest_full = None
            previous = None
            for i, kind in enumerate(KINDS):
                if i:
                    data = _mutate(data, rng)
                versions.append(bytes(data))
                stats = await repo.backup(io.BytesIO(bytes(data)), name="db", kind=kind)
                assert stats.kind == kind
                expected_parent = {
                    "full": None,
                    "incremental": previous,
                    "differential": latest_full,
                }[kind]
                assert stats.parent == expected_parent
                # A small change stores a small part of the stream again.
                if i:
                    assert stats.bytes_new < len(data) // 4
                if kind == "full":
                    latest_full = stats.id
                previous = stats.id
            gens = await repo.generations("db")
            assert [g.kind for g in gens] == KINDS
        # A fresh open restores every generation on its own, oldest first and newest first.
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            gens = await repo.generations("db")
            for gen, want in reversed(list(zip(gens, versions, strict=True))):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == want, f"generation {gen.kind} {gen.id[:8]} differs"

    run(go())


def test_incremental_manifest_holds_only_the_delta(run_asyncio, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(3)
    base = bytearray(rng.randbytes(8_000_000))

    async def go() -> tuple[int, int]:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(bytes(base)), name="s", kind="full")
            incr = await repo.backup(io.BytesIO(bytes(_mutate(base, rng))), name="s")
        size = {g: (repo_path / "generations" / g).stat().st_size for g in (full.id, incr.id)}
        return size[full.id], size[incr.id]

    full_manifest, incr_manifest = run_asyncio(go())
    assert incr_manifest < full_manifest / 5, (full_manifest, incr_manifest)


def test_the_first_generation_of_a_name_is_a_full_without_a_note(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Nothing to warn about: a new name starts with a full whatever kind was asked for
    (the note that an incremental became a full is for a name that has generations but
    no full this key can chain onto)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            for kind in ("differential", "incremental"):
                stats = await repo.backup(io.BytesIO(b"x" * 10_000), name=kind, kind=kind)
                assert stats.kind == "full" and stats.parent is None
                assert stats.note is None

    run(go())


def test_full_restores_chunks_of_a_missing_pack(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(2_000_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(io.BytesIO(data), name="m", kind="full")
        # Lose one pack.
        victim = sorted((repo_path / "packs").rglob("*"))[-1]
        assert victim.is_file()
        lost = victim.stat().st_size
        victim.unlink()
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            again = await repo.backup(io.BytesIO(data), name="m", kind="full")
            assert 0 < again.bytes_new <= lost  # exactly the lost chunks were stored again
            for gen in (first.id, again.id):  # both now restore, the old one too
                out = io.BytesIO()
                await repo.restore(gen, out)
                assert out.getvalue() == data

    run(go())


def test_generations_carry_host_and_tags(run, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    import socket

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            tagged = await repo.backup(
                io.BytesIO(b"x" * 1000), name="n", tags=["pg", "nightly", "pg"]
            )
            await repo.backup(io.BytesIO(b"y" * 1000), name="n")
            for bad in ("", "a,b", "tab\t"):
                with pytest.raises(ValueError, match="tag"):
                    await repo.backup(io.BytesIO(b"z"), name="n", tags=[bad])
            gens = await repo.generations()
            assert [g.tags for g in gens] == [("nightly", "pg"), ()]
            assert {g.host for g in gens} == {socket.gethostname()}
            assert gens[0].id == tagged.id

    run(go())
    out = dedupe_cli("generations", "--tag", "nightly", "--json", env=cli_env)
    listed = json.loads(out.stdout)
    assert [g["tags"] for g in listed] == [["nightly", "pg"]]
    bad = dedupe_cli("backup", "-", "--name", "n", "--tag", "a,b", env=cli_env, input=b"x")
    assert bad.returncode == 2 and b"--tag" in bad.stderr


def test_a_chain_of_40_incrementals_restores_each_and_an_unchanged_backup_adds_nothing(
    run_asyncio: Any, repo_path: Path
) -> None:
    """A full and 40 incrementals of a file that changes a few 4 KiB pages a day (and
    grows on some days), each a delta on the one before: every generation restores byte
    for byte, from a fresh handle that listed nothing (the chain is walked manifest by
    manifest) and from one that listed the generations (the chain is read ahead), and
    an unchanged backup at the end of the chain stores nothing and is an incremental on
    the last one, with a delta that copies its parent whole."""
    rng = random.Random(40)
    data = bytearray(rng.randbytes(300_000))
    versions: list[bytes] = []
    ids: list[str] = []

    async def go() -> None:
        nonlocal data
        async with await make_repo(repo_path) as repo:
            for day in range(41):
                if day:
                    for _ in range(3):
                        at = rng.randrange(len(data) // 4096) * 4096
                        data[at : at + 4096] = rng.randbytes(4096)
                    if day % 7 == 0:
                        data += rng.randbytes(rng.randrange(1, 20_000))
                versions.append(bytes(data))
                kind = "full" if day == 0 else "incremental"
                stats = await repo.backup(io.BytesIO(versions[-1]), name="db", kind=kind)
                assert stats.kind == kind and stats.parent == (ids[-1] if ids else None)
                ids.append(stats.id)
        for listed in (False, True):
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                if listed:
                    assert [g.id for g in await repo.generations("db")] == ids
                for gen_id, want in reversed(list(zip(ids, versions, strict=True))):
                    out = io.BytesIO()
                    await repo.restore(gen_id, out)
                    assert out.getvalue() == want, f"generation {ids.index(gen_id)} differs"
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            again = await repo.backup(io.BytesIO(versions[-1]), name="db")
            assert again.kind == "incremental" and again.parent == ids[-1]
            assert again.bytes_new == 0 and again.chunks_new == 0 and again.bytes_stored == 0
            _header, meta, own = await repo._store.read_manifest(again.id)
            assert own == b"" and meta["delta"]["ops"] == [[0, 0, again.chunks]]
            out = io.BytesIO()
            await repo.restore(again.id, out)
            assert out.getvalue() == versions[-1]

    run_asyncio(go())
