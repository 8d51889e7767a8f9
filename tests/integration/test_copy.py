"""`copy`: generations go into another repository (its own keys, local or S3) with their
names, kinds, times and labels, restore there byte for byte, store only what the target
lacks, are verified on the way (a damaged chunk copies nothing), and a copy killed half
way finishes when run again, without duplicates."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, changing_versions, env_for, make_repo

from dedupe import Repository
from dedupe.crypto import KdfParams
from dedupe.errors import IntegrityError, RoleNotPermitted, WrongPassphrase

TARGET_PASSPHRASE = "another passphrase for the copy"


async def init(location: str | Path, passphrase: str = PASSPHRASE) -> Repository:
    return await make_repo(location, passphrase, cache=False)


async def fill_source(path: Path, tree: Path) -> dict[str, bytes | Path]:
    """Three generations of "db" (full, incremental, differential), one of "logs", and
    one of a directory tree: id -> the bytes (or the tree) each holds."""
    expected: dict[str, bytes | Path] = {}
    async with await init(path) as repo:
        for kind, data in zip(
            ("full", "incremental", "differential"),
            changing_versions(3, 1_000_000, 30_000),
            strict=True,
        ):
            s = await repo.backup(io.BytesIO(data), name="db", kind=kind, tags=["nightly"])
            expected[s.id] = data
        logs = os.urandom(40_000)
        expected[(await repo.backup(io.BytesIO(logs), name="logs", label="app.log")).id] = logs
        (tree / "sub").mkdir(parents=True)
        (tree / "a.bin").write_bytes(os.urandom(70_000))
        (tree / "sub" / "b.txt").write_bytes(b"hello\n" * 500)
        os.chmod(tree / "sub" / "b.txt", 0o640)
        expected[(await repo.backup(tree, name="files")).id] = tree
    return expected


def same_tree(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*"))
    for rel in files_a:
        pa, pb = a / rel, b / rel
        assert pa.stat().st_mode == pb.stat().st_mode, rel
        if pa.is_file():
            assert pa.read_bytes() == pb.read_bytes(), rel
            assert pa.stat().st_mtime_ns == pb.stat().st_mtime_ns, rel


async def assert_copied(
    target: Repository, source_id: str, expected: dict[str, bytes | Path], out: Path
) -> dict[str, str]:
    """Every expected generation has one copy in `target` that restores exactly; returns
    source id -> copy id."""
    out.mkdir(exist_ok=True)
    copies: dict[str, str] = {}
    for g in await target.generations():
        assert g.copied_from is not None
        repo_id, original = g.copied_from.split("/")
        assert repo_id == source_id and original not in copies
        copies[original] = g.id
    assert copies.keys() == expected.keys()
    for original, copy_id in copies.items():
        want = expected[original]
        if isinstance(want, Path):
            dest = out / copy_id
            await target.restore(copy_id, dest)
            same_tree(want, dest)
        else:
            got = io.BytesIO()
            await target.restore(copy_id, got)
            assert got.getvalue() == want
    return copies


def test_copy_keeps_every_generation_and_stores_only_what_is_new(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    repo_path = tmp_path / "source"  # `location` may be repo_path: the target

    async def go() -> None:
        expected = await fill_source(repo_path, tmp_path / "tree")
        async with (
            await Repository.open(repo_path, PASSPHRASE) as source,
            await init(location, TARGET_PASSPHRASE) as target,
        ):
            report = await source.copy(target)
            originals = {g.id: g for g in await source.generations()}
            assert [c.source_id for c in report.copied] == list(originals)  # oldest first
            copies = await assert_copied(target, source.id, expected, tmp_path / "out")
            for g in await target.generations():
                o = originals[g.copied_from.split("/")[1]]  # type: ignore[union-attr]
                assert (g.name, g.kind, g.created, g.source, g.tags, g.host) == (
                    o.name,
                    o.kind,
                    o.created,
                    o.source,
                    o.tags,
                    o.host,
                )
            by_source = {c.source_id: c for c in report.copied}
            db = [g.id for g in originals.values() if g.name == "db"]
            # The later generations of "db" share most chunks with the first: only their
            # changed 30 KB and the chunks around it (at most 64 KiB each side) are new.
            assert by_source[db[0]].bytes_new >= 900_000
            assert all(by_source[g].bytes_new < 250_000 for g in db[1:])
            again = await source.copy(target)
            assert again.copied == [] and sorted(again.already_there) == sorted(copies)
            assert len(await target.generations()) == len(expected)
            assert (await target.verify(read_data=True)).ok

    run_asyncio(go())


def test_a_damaged_chunk_copies_nothing_of_its_generation(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    async def go() -> None:
        async with await init(repo_path) as source:
            first, second = changing_versions(2, 250_000, 30_000)
            a = await source.backup(io.BytesIO(first), name="db", kind="full")
            b = await source.backup(io.BytesIO(os.urandom(60_000)), name="other")
            store = source._store
            await store.refresh_index()
            _meta, table = await store.generation_chunks(b.id)
            where = store.index.get(table[:32])
            assert where is not None
            pack = repo_path / "packs"
            name = store.index.packs[where.pack_no].pack_id.hex()
            path = pack / name[:2] / name
            data = bytearray(path.read_bytes())
            data[where.offset + 40] ^= 1
            path.write_bytes(bytes(data))
        async with (
            await Repository.open(repo_path, PASSPHRASE) as source,
            await init(tmp_path / "target", TARGET_PASSPHRASE) as target,
        ):
            with pytest.raises(IntegrityError):
                await source.copy(target)
            # The generation made before the damaged one was copied; the damaged one not.
            assert [g.copied_from for g in await target.generations()] == [f"{source.id}/{a.id}"]
            with pytest.raises(IntegrityError):
                await source.copy(target, [b.id])
            assert len(await target.generations()) == 1

    run_asyncio(go())


def test_roles_and_refusals(run_asyncio: Any, repo_path: Path, tmp_path: Path) -> None:
    async def go() -> None:
        async with await init(repo_path) as source:
            await source.backup(io.BytesIO(os.urandom(30_000)), name="db")
            await source.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
            await source.keys.add("r", role="reader", name="r", kdf=KdfParams.weakest())
            with pytest.raises(ValueError, match="same repository"):
                await source.copy(source)
        async with await init(tmp_path / "target", TARGET_PASSPHRASE) as target:
            await target.keys.add("tw", role="writer", name="tw", kdf=KdfParams.weakest())
            await target.keys.add("tr", role="reader", name="tr", kdf=KdfParams.weakest())
        target_path = tmp_path / "target"
        async with await Repository.open(repo_path, "w") as writer:
            async with await Repository.open(target_path, "tw") as into:
                with pytest.raises(RoleNotPermitted, match="a writer key may not restore"):
                    await writer.copy(into)
        async with await Repository.open(repo_path, "r") as reader:
            async with await Repository.open(target_path, "tr") as into:
                with pytest.raises(RoleNotPermitted, match="a reader key may not back up"):
                    await reader.copy(into)
            # A reader of the source and a writer of the target: the least a copy needs.
            async with await Repository.open(target_path, "tw") as into:
                report = await reader.copy(into)
                assert len(report.copied) == 1

    run_asyncio(go())


def test_a_copy_killed_half_way_finishes_when_run_again(
    run_asyncio: Any, location: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The CLI, SIGKILLed once the target holds its first copied generation; the second
    run copies the rest and nothing twice; every copy restores byte for byte."""
    repo_path = tmp_path / "source"  # `location` may be repo_path: the target
    versions = changing_versions(10, 600_000, 30_000)

    async def make_source() -> dict[str, bytes | Path]:
        expected: dict[str, bytes | Path] = {}
        async with await init(repo_path) as source:
            for data in versions:
                expected[(await source.backup(io.BytesIO(data), name="db")).id] = data
        async with await init(location, TARGET_PASSPHRASE):
            pass
        return expected

    expected = run_asyncio(make_source())
    env = env_for(str(repo_path), cli_env)
    env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    env["DEDUPE_TO_PASSWORD"] = TARGET_PASSPHRASE
    argv = [sys.executable, "-m", "dedupe", "copy", "--to", location, "--json"]

    async def copies_so_far() -> int:
        async with await Repository.open(location, TARGET_PASSPHRASE, cache=False) as t:
            return len(await t.generations())

    child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while run_asyncio(copies_so_far()) < 1:
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = run_asyncio(copies_so_far())
    assert 1 <= done_before < len(versions), "the kill came too late to test anything"

    finish = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert finish.returncode == 0, finish.stderr
    report = json.loads(finish.stdout)
    assert len(report["already_there"]) == done_before
    assert len(report["copied"]) == len(versions) - done_before

    async def check() -> None:
        async with (
            await Repository.open(repo_path, PASSPHRASE) as source,
            await Repository.open(location, TARGET_PASSPHRASE) as target,
        ):
            await assert_copied(target, source.id, expected, tmp_path / "out")

    run_asyncio(check())


def test_cli_copy_with_a_wrong_target_passphrase_copies_nothing(
    run_asyncio: Any, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async def make() -> None:
        async with await init(repo_path) as source:
            await source.backup(io.BytesIO(os.urandom(30_000)), name="db")
        async with await init(tmp_path / "target", TARGET_PASSPHRASE):
            pass

    run_asyncio(make())
    env = dict(cli_env, DEDUPE_TO_PASSWORD="not it")
    wrong = subprocess.run(
        [sys.executable, "-m", "dedupe", "copy", "--to", str(tmp_path / "target")],
        env=env,
        capture_output=True,
    )
    assert wrong.returncode == WrongPassphrase.exit_code, wrong.stderr
    assert b"wrong passphrase" in wrong.stderr
    assert not list((tmp_path / "target").glob("generations/*"))
