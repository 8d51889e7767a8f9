"""Directory-tree generations (docs/FORMAT.md section 8.3): a tree that changes over many
generations restores, generation by generation, to exactly what it was; incrementals read
only what changed; failures name the path and leave nothing half-done."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo

import dedupe.engine.tree as engine_tree
from dedupe import Repository
from dedupe.errors import IntegrityError, SourceError, TargetError
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import diff, encode_tree, expand, sort_key
from dedupe.store.repository import pack_name

Run = Callable[[Coroutine[Any, Any, Any]], Any]
Snapshot = dict[str, Any]


@pytest.fixture
def no_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trust file times at once (tests change files milliseconds before a backup)."""
    monkeypatch.setattr(engine_tree, "RACY_NS", 0)


def snapshot(root: Path) -> Snapshot:
    """path -> (type, mode, mtime_ns, content hash, link target) for the root and
    everything below it, plus the groups of paths that share an inode."""
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            if name == "." and Path(dirpath) != root:
                continue
            full = Path(dirpath) / name if name != "." else root
            rel = full.relative_to(root).as_posix()
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            content = target = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(full.read_bytes()).hexdigest()
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_mtime_ns, content, target)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    out["<hardlinks>"] = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return out


def write(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


# The tree's history: one step before each backup. The kinds mix all three.
def _steps(src: Path, rnd: random.Random) -> list[tuple[str, Callable[[], None]]]:
    def blob(n: int) -> bytes:
        return rnd.randbytes(n)

    def s0() -> None:
        write(src / "docs/readme.txt", b"hello\n")
        write(src / "docs/big.bin", blob(700_000))
        write(src / "data/a/one", blob(5000))
        write(src / "data/a/two", blob(12000))
        write(src / "data/b/three", b"")
        write(src / "setuid", b"#!/bin/sh\n")
        os.chmod(src / "setuid", 0o4755)
        write(src / "private", b"secret")
        os.chmod(src / "private", 0o600)
        (src / "empty").mkdir()
        os.symlink("docs/readme.txt", src / "link")
        write(src / "hard1", b"shared inode")
        os.link(src / "hard1", src / "data/hard2")
        os.mkfifo(src / "pipe")

    def s1() -> None:
        with open(src / "docs/big.bin", "ab") as f:
            f.write(blob(3000))
        write(src / "docs/new.txt", b"new file")

    def s2() -> None:
        os.unlink(src / "data/a/one")
        (src / "empty2/deeper").mkdir(parents=True)
        os.symlink("/nonexistent/target", src / "dangling")

    def s3() -> None:
        os.chmod(src / "private", 0o640)
        os.utime(src / "docs/readme.txt", ns=(1_000_000_000, 1_000_000_000))

    def s4() -> None:
        # Same size, different bytes, another mtime.
        old = (src / "data/a/two").stat()
        write(src / "data/a/two", blob(12000), old.st_mtime_ns + 5_000_000_000)

    def s5() -> None:
        for p in sorted((src / "data/b").iterdir()):
            p.unlink()
        (src / "data/b").rmdir()

    def s6() -> None:
        # A directory becomes a file and a file becomes a directory.
        (src / "empty2/deeper").rmdir()
        (src / "empty2").rmdir()
        write(src / "empty2", b"now a file")
        os.unlink(src / "docs/new.txt")
        write(src / "docs/new.txt/inner", b"now a directory")

    def s7() -> None:
        # The first path of the hard-link pair goes; the second is now a plain file.
        os.unlink(src / "hard1")

    def s8() -> None:
        write(src / "pair/x", blob(2000))
        os.link(src / "pair/x", src / "pair/y")
        os.unlink(src / "pipe")

    def s9() -> None:
        os.unlink(src / "link")
        os.symlink("setuid", src / "link")
        os.chmod(src / "data", 0o750)
        os.utime(src / "empty", ns=(2_000_000_000, 2_000_000_000))

    def s10() -> None:
        pass  # nothing changed

    def s11() -> None:
        for i in range(20):
            write(src / f"many/f{i:02}", blob(100 + i))

    return [
        ("full", s0),
        ("incremental", s1),
        ("incremental", s2),
        ("differential", s3),
        ("incremental", s4),
        ("full", s5),
        ("incremental", s6),
        ("differential", s7),
        ("differential", s8),
        ("incremental", s9),
        ("incremental", s10),
        ("full", s11),
    ]


def test_changing_tree_restores_every_generation(
    run_asyncio: Run, tmp_path: Path, repo_path: Path, no_racy_window: None
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(8)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            taken: list[tuple[str, str, Snapshot]] = []
            for i, (kind, step) in enumerate(_steps(src, rnd)):
                step()
                stats = await repo.backup(src, name="tree", kind=kind)
                assert stats.kind == kind
                if i in (2, 4, 6, 7, 8, 9, 10):  # docs/big.bin unchanged against the parent
                    assert stats.bytes_read < 100_000, (i, stats)
                taken.append((stats.id, kind, snapshot(src)))
            gens = await repo.generations("tree")
            assert [g.kind for g in gens] == [k for _, k, _ in taken]
            assert all(g.source["type"] == "tree" for g in gens)
            for i, (gen_id, _kind, snap) in enumerate(taken):
                out = tmp_path / f"out{i}"
                await repo.restore(gen_id, out)
                assert snapshot(out) == snap, f"generation {i} restored differently"

    run_asyncio(go())


def test_roundtrip_both_loops(run: Run, tmp_path: Path, repo_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "a/b/c", b"x" * 1000)
    write(src / "top", b"")
    (src / "a/empty").mkdir()
    out = tmp_path / "out"

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", kind="full")
            out.mkdir()  # an existing empty directory is a fine target
            restored = await repo.restore(stats.id, out)
            assert restored.bytes_written == 1000

    run(go())
    assert snapshot(out) == snapshot(src)


def test_incremental_reads_only_changed_files(
    run_asyncio: Run, tmp_path: Path, repo_path: Path, no_racy_window: None
) -> None:
    src = tmp_path / "src"
    for i in range(300):
        write(src / f"d{i % 10}/file{i:03}", random.Random(i).randbytes(1000 + i))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(src, name="t", kind="full")
            assert full.bytes_read == sum(1000 + i for i in range(300))
            write(src / "d3/file003", b"changed")
            write(src / "d5/new", b"brand new file")
            inc = await repo.backup(src, name="t", kind="incremental")
            assert inc.bytes_read == len(b"changed") + len(b"brand new file")
            backend = repo._store.backend
            full_size = await backend.stat(f"generations/{full.id}")
            inc_size = await backend.stat(f"generations/{inc.id}")
            assert inc_size * 10 < full_size
            _h, meta, _t = await repo._store.read_manifest(inc.id)
            paths = [e["path"] for e in meta["entries"]]
            # The two files and the directory that gained an entry, nothing else.
            assert paths == ["d3/file003", "d5", "d5/new"]
            # Nothing changed: nothing read, an empty delta.
            again = await repo.backup(src, name="t", kind="incremental")
            assert again.bytes_read == 0
            _h, meta, _t = await repo._store.read_manifest(again.id)
            assert meta["entries"] == [] and meta["deleted"] == []
            # The complete table is what prune and verify see.
            _m, table = await repo._store.generation_chunks(again.id)
            assert len(table) // CHUNK_RECORD.size == again.chunks
            out = tmp_path / "out"
            await repo.restore(again.id, out)
            assert snapshot(out) == snapshot(src)

    run_asyncio(go())


def test_recently_changed_files_are_read_again(
    run_asyncio: Run, tmp_path: Path, repo_path: Path
) -> None:
    """Times within RACY_NS of a backup prove nothing: the next incremental re-reads."""
    src = tmp_path / "src"
    write(src / "fresh", b"just written")
    old = 1_000_000_000
    write(src / "old", b"old file")
    os.utime(src / "old", ns=(old, old))

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(src, name="t", kind="full")
            inc = await repo.backup(src, name="t", kind="incremental")
            # "old" has an old mtime but a fresh ctime, so both are read again.
            assert inc.bytes_read == len(b"just written") + len(b"old file")

    run_asyncio(go())


def test_stream_parent_makes_a_full(run_asyncio: Run, tmp_path: Path, repo_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f", b"data")
    stream = tmp_path / "stream.bin"
    stream.write_bytes(b"stream")

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(stream, name="n", kind="full")
            stats = await repo.backup(src, name="n", kind="incremental")
            assert stats.kind == "full" and stats.parent is None
            assert stats.note and "not a directory tree" in stats.note

    run_asyncio(go())


def test_socket_is_skipped_with_a_note(run_asyncio: Run, tmp_path: Path, repo_path: Path) -> None:
    import socket

    src = tmp_path / "src"
    write(src / "f", b"data")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(src / "sock"))

        async def go() -> None:
            async with await make_repo(repo_path) as repo:
                stats = await repo.backup(src, name="t", kind="full")
                assert stats.note and "sock" in stats.note
                await repo.restore(stats.id, tmp_path / "out")

        run_asyncio(go())
    finally:
        sock.close()
    assert sorted(os.listdir(tmp_path / "out")) == ["f"]


def test_file_vanishing_mid_walk_is_reported_or_fatal_when_strict(
    run_asyncio: Run, tmp_path: Path, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be read is never silently left out: it is left out of a partial
    backup that says so (`unreadable`, the note), or, with strict, fails the backup.
    (chmod 000 does not stop root, which runs CI; a file removed between the walk and its
    read does. tests/integration/test_safe_defaults.py drops to another user instead.)"""
    src = tmp_path / "src"
    write(src / "a", b"a")
    write(src / "b", b"b")
    scan = engine_tree.scan_tree

    def scan_then_remove(root: str, *args: Any) -> Any:
        found = scan(root, *args)
        os.unlink(src / "b")
        return found

    monkeypatch.setattr(engine_tree, "scan_tree", scan_then_remove)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises(SourceError, match="b vanished"):
                await repo.backup(src, name="t", kind="full", strict=True)
            assert await repo.generations() == []
            write(src / "b", b"b")
            stats = await repo.backup(src, name="t", kind="full")
            assert stats.unreadable == ("b",)
            assert stats.note is not None and "PARTIAL" in stats.note and "b" in stats.note
            assert [e["path"] for e in await repo.ls(stats.id)] == [".", "a"]

    run_asyncio(go())


def test_restore_target_rules(run_asyncio: Run, tmp_path: Path, repo_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f", b"data")
    busy = tmp_path / "busy"
    write(busy / "keep", b"mine")
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", kind="full")
            with pytest.raises(TargetError, match="not empty"):
                await repo.restore(stats.id, busy)
            assert (busy / "keep").read_bytes() == b"mine"
            with pytest.raises(TargetError, match="not a directory"):
                await repo.restore(stats.id, a_file)
            with pytest.raises(TargetError, match="directory tree"):
                await repo.restore(stats.id, open(os.devnull, "wb"))  # noqa: SIM115
            await repo.restore(stats.id, busy, overwrite=True)
            assert snapshot(busy) == snapshot(src)

    run_asyncio(go())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_damaged_chunk_names_the_file(run_asyncio: Run, tmp_path: Path, repo_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(5):
        write(src / f"f{i}", random.Random(i).randbytes(20_000))
    out = tmp_path / "out"

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", kind="full")
            store = repo._store
            entries, _table = await engine_tree.load_tree(store, stats.id)
            victim = next(e for e in entries if e["path"] == "f3")
            chunk_id, _n = next(CHUNK_RECORD.iter_unpack(victim["records"]))
            loc = store.index.get(chunk_id)
            assert loc is not None
            pack = repo_path / pack_name(store.index.packs[loc.pack_no].pack_id)
            os.chmod(pack, 0o600)
            with open(pack, "r+b") as f:
                f.seek(loc.offset + loc.stored_length // 2)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0x40]))
            with pytest.raises(IntegrityError, match="f3"):
                await repo.restore(stats.id, out)

    run_asyncio(go())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_restore_cancelled_leaves_nothing(
    run_asyncio: Run, tmp_path: Path, repo_path: Path
) -> None:
    src = tmp_path / "src"
    for i in range(30):
        write(src / f"f{i:02}", random.Random(i).randbytes(50_000))
    out = tmp_path / "out"

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", kind="full")
            started = asyncio.Event()

            def progress(_p: Any) -> None:
                started.set()

            task = asyncio.create_task(repo.restore(stats.id, out, progress=progress))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run_asyncio(go())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making device nodes needs root")
def test_device_nodes_roundtrip(run_asyncio: Run, tmp_path: Path, repo_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    try:
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("this container may not make device nodes")

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", kind="full")
            await repo.restore(stats.id, tmp_path / "out")

    run_asyncio(go())
    st = os.lstat(tmp_path / "out/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


# --- the pure format functions ---------------------------------------------------------------


def _e(path: str, kind: str = "dir", **extra: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"path": path, "type": kind, "mode": 0o755, "uid": 0, "gid": 0}
    e.update(mtime_ns=1, ctime_ns=1, size=0, ino=1, dev=1)
    e.update(extra)
    return e


def _file(path: str, data_id: bytes, size: int, digest: str = "0" * 64) -> dict[str, Any]:
    rec = CHUNK_RECORD.pack(data_id * 32, size) if size else b""
    return _e(path, "file", size=size, records=rec, digest=digest)


def test_entry_order_puts_contents_right_after_their_directory() -> None:
    paths = ["a-c", "a/b", "a", ".", "a/b/c", "b"]
    assert sorted(paths, key=sort_key) == [".", "a", "a/b", "a/b/c", "a-c", "b"]


def test_expand_applies_deletes_then_upserts() -> None:
    full = [_e("."), _e("d"), _file("d/x", b"\1", 10), _file("f", b"\2", 5)]
    meta0, lit0 = encode_tree(full, [], None)
    now = [_e("."), _file("d", b"\3", 7), _e("f"), _file("f/y", b"\2", 5)]
    changed, deleted = diff(full, now)
    assert deleted == ["d/x"]
    meta1, lit1 = encode_tree(changed, deleted, "parent-id")
    entries, table = expand([(meta0, lit0), (meta1, lit1)], "test")
    assert [(e["path"], e["type"]) for e in entries] == [
        (".", "dir"),
        ("d", "file"),
        ("f", "dir"),
        ("f/y", "file"),
    ]
    assert table == CHUNK_RECORD.pack(b"\3" * 32, 7) + CHUNK_RECORD.pack(b"\2" * 32, 5)


@pytest.mark.parametrize("bad", ["../up", "/abs", "a//b", "a/./b", "a/.."])
def test_unsafe_paths_are_rejected(bad: str) -> None:
    meta, lit = encode_tree([_e("."), _e(bad)], [], None)
    with pytest.raises(IntegrityError):
        expand([(meta, lit)], "test")


def test_inconsistent_trees_are_rejected() -> None:
    orphan = [_e("."), _file("nodir/f", b"\1", 1)]
    bad_size = [_e("."), {**_file("f", b"\1", 4), "size": 5}]
    bad_link = [_e("."), _e("h", "hardlink", target="missing")]
    for entries in (orphan, bad_size, bad_link):
        meta, lit = encode_tree(entries, [], None)
        with pytest.raises(IntegrityError):
            expand([(meta, lit)], "test")
    meta, lit = encode_tree([_e(".")], [], "p")
    with pytest.raises(IntegrityError, match="full"):
        expand([(meta, lit)], "test")


def test_backup_of_missing_root_is_a_source_error(
    run_asyncio: Run, tmp_path: Path, repo_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            assert isinstance(repo, Repository)
            with pytest.raises(SourceError):
                await asyncio.to_thread(engine_tree.scan_tree, str(tmp_path / "missing"))

    run_asyncio(go())
