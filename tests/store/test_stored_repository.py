"""The stored format vectors (tests/vectors): known-answer chunk ids and stream digests, and
a repository of format version 2 written by an earlier build, read back by this one."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import blake3
import pytest

from dedupe import Repository
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import ChunkHasher

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
# BLAKE3 of ids.json: the file and the script that writes it cannot drift together unseen.
GOLDEN_IDS_JSON_BLAKE3 = "99e25821230f95d0a4b3bd45bc8a2849d4e12ed59979e8b0dc8704e1a8e99708"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, VECTORS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunk_ids_and_stream_digests_are_the_spec_s() -> None:
    """docs/FORMAT.md 2 and 4.1: chunk ids are BLAKE3 keyed with id_key, the stream digest
    is BLAKE3 keyed with a key derived from id_key. dedupe's hasher gives the values the
    spec gives, for the fixed key of the vectors, and the vectors are those the script
    writes (and those this test pins)."""
    maker = _load("make_id_vectors")
    raw = (VECTORS / "ids.json").read_text()
    assert maker.render() == raw
    assert blake3.blake3(raw.encode()).hexdigest() == GOLDEN_IDS_JSON_BLAKE3
    vectors = json.loads(raw)
    hasher = ChunkHasher(bytes.fromhex(vectors["id_key"]))
    chunks = [maker.pattern(int(n)) for n in vectors["chunk_ids"]]
    for n, chunk in zip(vectors["chunk_ids"], chunks, strict=True):
        assert hasher.chunk_id(chunk).hex() == vectors["chunk_ids"][n], f"length {n}"
    assert [c.hex() for c in hasher.chunk_ids(chunks)] == list(vectors["chunk_ids"].values())
    ordered = [maker.pattern(n) for n in maker.LENGTHS]
    digest = hasher.stream_digest()
    digest.update_many(ordered[:3])
    for c in ordered[3:]:
        digest.update(c)
    assert digest.hexdigest() == vectors["stream_digest"]


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of tests/vectors/repo-v2 (restores take a lock: the original stays as it
    is), and what it holds."""
    root = tmp_path / "repo-v2"
    shutil.copytree(VECTORS / "repo-v2", root)
    return root, json.loads((VECTORS / "repo-v2.json").read_text())


async def _read_back(root: Path, expected: dict[str, Any], out: Path, passphrase: str) -> None:
    data = _load("make_repo_vector").content()
    out.mkdir(parents=True)
    async with await Repository.open(root, passphrase) as repo:
        gens = {g.id: g for g in await repo.generations()}
        assert sorted(gens) == sorted(g["id"] for g in expected["generations"]), repo.problems
        for want in expected["generations"]:
            g = gens[want["id"]]
            assert (g.name, g.kind, g.parent) == (want["name"], want["kind"], want["parent"])
            if want["step"] == "tree":
                target = out / want["id"]
                await repo.restore(g.id, target)
                got = {
                    p.relative_to(target).as_posix(): p.read_bytes()
                    for p in target.rglob("*")
                    if p.is_file()
                }
                assert got == data["tree"]
            else:
                buf = io.BytesIO()
                await repo.restore(g.id, buf)
                assert buf.getvalue() == data[want["step"]], want["step"]
        report = await repo.verify(read_data=True)
        assert report.ok, report.to_dict()


def test_a_repository_of_format_version_2_reads_back(
    stored: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Every generation lists with its name, kind and parent, and restores to the bytes
    the maker regenerates; verify --read-data passes; with the admin and the reader key.
    The index it holds names every chunk by its keyed id (an unkeyed or differently keyed
    id would not match what restore computes)."""
    root, expected = stored
    assert expected["format_version"] == 2
    asyncio.run(_read_back(root, expected, tmp_path / "out-admin", expected["passphrase"]))
    asyncio.run(_read_back(root, expected, tmp_path / "out-reader", expected["reader_passphrase"]))


def test_the_stored_repository_takes_new_backups(stored: tuple[Path, dict[str, Any]]) -> None:
    """This build writes into a repository an earlier one made: an incremental onto the
    stored chain deduplicates against it, and prune keeps everything."""
    root, expected = stored
    data = _load("make_repo_vector").content()

    async def go() -> None:
        async with await Repository.open(root, expected["passphrase"]) as repo:
            day4 = data["day3"] + b"one more day"
            stats = await repo.backup(io.BytesIO(day4), name="db", kind="incremental")
            assert stats.parent == expected["generations"][2]["id"]
            assert stats.chunks_new <= 2
            await repo.prune()
            buf = io.BytesIO()
            await repo.restore(stats.id, buf)
            assert buf.getvalue() == day4
            assert (await repo.verify(read_data=True)).ok

    asyncio.run(go())


def test_index_entries_are_keyed_ids_of_their_chunks(stored: tuple[Path, dict[str, Any]]) -> None:
    """The stored index names chunks by BLAKE3 keyed with the repository's id_key: every
    chunk of the first generation's data, cut where the index says, hashes (keyed) to an
    id the index holds, and none hashes unkeyed to one."""
    root, expected = stored

    async def go() -> None:
        async with await Repository.open(root, expected["passphrase"]) as repo:
            store = repo._store
            await store.refresh_index()  # loaded by the first operation that needs it
            id_key = store.holder.id_key
            _header, _meta, table = await store.read_manifest(expected["generations"][0]["id"])
            assert table
            data = _load("make_repo_vector").content()["day1"]
            pos, keyed, unkeyed = 0, 0, 0
            for cid, length in CHUNK_RECORD.iter_unpack(table):
                chunk = data[pos : pos + length]
                pos += length
                assert blake3.blake3(chunk, key=id_key).digest() == cid
                keyed += cid in store.index
                unkeyed += blake3.blake3(chunk).digest() in store.index
            assert pos == len(data) and keyed > 0 and unkeyed == 0

    asyncio.run(go())
