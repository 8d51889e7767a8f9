"""Mutation audit of dedupe/store/cache.py (issue 12): the rules by which a cached file is
taken (docs/FORMAT.md 3.1), each pinned on ObjectCache itself, so that a mutant that lets
a tampered, replayed, oversize or misnamed cache file through turns a test red. Each
test names the property and the mutant(s) it was shown red on (bench/README.md,
"Mutation testing")."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.crypto import new_key
from dedupe.format.keymap import keymap_name
from dedupe.hashing import object_id
from dedupe.store.cache import TRAILER_SIZE, ObjectCache, default_cache_root

REPO_ID = bytes(range(32))
KEY_ID = bytes(range(16))


def _cache(tmp_path: Path, mac_key: bytes | None = None) -> ObjectCache:
    return ObjectCache(tmp_path / "cache", REPO_ID, KEY_ID, mac_key or new_key())


def _object(size: int = 1000) -> tuple[str, bytes]:
    data = os.urandom(size)
    return f"index/{object_id(data)}", data


def _file(cache: ObjectCache, name: str) -> Path:
    return cache.directory / name


def test_a_copy_is_taken_only_for_the_size_the_store_lists_and_within_its_limit(
    tmp_path: Path,
) -> None:
    """A copy is returned for the size it was written with, up to and including `limit`
    bytes; asked for with another listed size (an object replaced in the store) or a
    smaller limit it is a miss, and the file is deleted."""
    cache = _cache(tmp_path)
    name, data = _object()
    cache.write(name, data, len(data))
    assert cache.read(name, len(data), len(data)) == data
    assert cache.read(name, len(data) + 1, 1 << 20) is None
    assert not _file(cache, name).exists()
    cache.write(name, data, len(data))
    assert cache.read(name, len(data), len(data) - 1) is None
    assert not _file(cache, name).exists()


def test_a_copy_under_another_holders_mac_is_never_taken(tmp_path: Path) -> None:
    """The same directory opened with another MAC key (what anyone without this holder's
    key file can make): the copy is a miss and is deleted, though its bytes hash to their
    name and its size is the listed one."""
    name, data = _object()
    _cache(tmp_path, new_key()).write(name, data, len(data))
    cache = _cache(tmp_path, new_key())
    assert cache.read(name, len(data), 1 << 20) is None
    assert not _file(cache, name).exists()


def test_the_mac_covers_the_name_and_the_size(tmp_path: Path) -> None:
    """An intact copy replayed under another kind's name (the same object id), or with
    its recorded size rewritten to what the store now lists, is a miss: the MAC binds the
    name and the size, not only the bytes."""
    cache = _cache(tmp_path)
    name, data = _object()
    cache.write(name, data, len(data))
    copy = _file(cache, name).read_bytes()
    replayed = f"generations/{name.split('/')[1]}"
    _file(cache, replayed).parent.mkdir(parents=True, exist_ok=True)
    _file(cache, replayed).write_bytes(copy)
    assert cache.read(replayed, len(data), 1 << 20) is None
    resized = copy[:-TRAILER_SIZE] + struct.pack("<Q", len(data) + 7) + copy[-32:]
    _file(cache, name).write_bytes(resized)
    assert cache.read(name, len(data) + 7, 1 << 20) is None
    assert cache.read(name, len(data), 1 << 20) is None


def test_a_copy_whose_bytes_do_not_hash_to_its_name_is_never_taken(tmp_path: Path) -> None:
    """A file with a good MAC (written by this holder) whose bytes are not the named
    object's: a miss, and deleted."""
    cache = _cache(tmp_path)
    name, _data = _object()
    other = os.urandom(1000)
    cache.write(name, other, len(other))
    assert _file(cache, name).exists()
    assert cache.read(name, len(other), 1 << 20) is None
    assert not _file(cache, name).exists()


def test_only_content_addressed_names_are_cached(tmp_path: Path) -> None:
    """Names of the exact cached forms are kept; anything else is neither written nor
    looked up, so a planted `../` name never reaches the file system."""
    cache = _cache(tmp_path)
    _name, data = _object()
    oid = object_id(data)
    for bad in (f"index/../{oid}", f"packs/{oid}", f"index/{oid}x", f"keymaps/1/{oid}"):
        cache.write(bad, data, len(data))
        assert cache.read(bad, len(data), 1 << 20) is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "CACHEDIR.TAG"]
    for good in (f"index/{oid}", f"generations/{oid}", f"keymaps/00000001/{oid}"):
        cache.write(good, data, len(data))
        assert cache.read(good, len(data), 1 << 20) == data


def test_a_cache_directory_that_is_a_link_or_someone_elses_is_not_used(
    tmp_path: Path,
) -> None:
    """The holder's directory a symbolic link to another place, or the repository's
    directory owned by another user: the cache gives up (nothing is written through the
    link or into the other user's directory, nothing is read from them).

    Property: the cache never follows a link out of its own directories, nor trusts a
    directory someone else can write (_usable)."""
    name, data = _object()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = _cache(tmp_path / "a")
    linked.directory.parent.mkdir(parents=True)
    linked.directory.symlink_to(elsewhere, target_is_directory=True)
    linked.write(name, data, len(data))
    assert list(elsewhere.iterdir()) == []
    (elsewhere / "index").mkdir()
    honest = ObjectCache(elsewhere.parent / "b", REPO_ID, KEY_ID, linked._mac_key)
    honest.write(name, data, len(data))
    os.replace(honest.directory / name, elsewhere / name)
    assert linked.read(name, len(data), 1 << 20) is None
    assert (elsewhere / name).exists()  # not even deleted: the cache was not used

    if os.geteuid() == 0:  # only root can make a directory of another user
        theirs = _cache(tmp_path / "c")
        theirs.directory.parent.mkdir(parents=True)
        os.chown(theirs.directory.parent, 4242, 4242)
        theirs.write(name, data, len(data))
        assert not theirs.directory.exists()
        assert theirs.read(name, len(data), 1 << 20) is None


def test_the_default_cache_directory_is_the_documented_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$DEDUPE_CACHE_DIR, else $XDG_CACHE_HOME/dedupe, else ~/.cache/dedupe (FORMAT.md
    3.1, OPERATIONS.md): the place an operator excludes from backups and clears.

    Not a safety property (the cache is MAC'd wherever it is), but a wrong place, or a
    crash computing it, is what every object-store user without DEDUPE_CACHE_DIR would
    meet at open. Killed: default_cache_root's 14 survivors (XDG_CACHE_HOME ignored or
    misspelt, the fallback's or the leaf's name changed, `/` replaced by `*`)."""
    monkeypatch.delenv("DEDUPE_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "xdg" / "dedupe"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert default_cache_root() == tmp_path / "home" / ".cache" / "dedupe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_root() == tmp_path / "home" / ".cache" / "dedupe"
    monkeypatch.setenv("DEDUPE_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_root() == tmp_path / "explicit"


def test_cache_directories_and_files_are_private_to_their_user(tmp_path: Path) -> None:
    """Under the usual umask, the directories the cache makes are 0700 and its files
    0600: another local user cannot list which generations, index objects and key maps a
    repository has, nor read their sealed bytes.

    Killed: _usable's os.mkdir and write's os.makedirs without their 0o700 mode or with
    0o701 (`449`), and the temporary file opened without 0o600 or with 0o601 (`385`)."""
    old = os.umask(0o022)
    try:
        cache = _cache(tmp_path)
        name, data = _object()
        cache.write(name, data, len(data))
    finally:
        os.umask(old)
    kind = _file(cache, name).parent
    for directory in (cache.root, cache.directory.parent, cache.directory, kind):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert stat.S_IMODE(_file(cache, name).stat().st_mode) == 0o600


def test_a_cache_file_that_is_a_link_is_removed_never_followed(tmp_path: Path) -> None:
    """A cached name that is a symbolic link to a file elsewhere (which holds the object's
    bytes, intact): a miss; the link goes, the file it points to stays.

    Killed: read's `_discard(path)` after a failed open given None (TypeError: the read
    crashed instead of missing)."""
    cache = _cache(tmp_path)
    name, data = _object()
    cache.write(name, data, len(data))
    target = tmp_path / "elsewhere"
    os.replace(_file(cache, name), target)
    _file(cache, name).symlink_to(target)
    assert cache.read(name, len(data), 1 << 20) is None
    assert not _file(cache, name).is_symlink()
    assert target.exists()


def _unkeyed_mac(name: str, size: int, data: bytes, key: bytes | None) -> bytes:
    """The cache's MAC layout (FORMAT.md 3.1) under a key anyone can use: none, or zeros."""
    mac = blake3.blake3(name.encode()) if key is None else blake3.blake3(name.encode(), key=key)
    mac.update(b"\0" + struct.pack("<Q", size))
    mac.update(data)
    return bytes(mac.digest())


def test_a_cached_key_map_is_trusted_only_under_a_mac_key_from_the_key_file(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """A key map with a broken signature is planted in the store and in the cache, its
    cache copy MAC'd the way the cache MACs, but with no key or an all-zero key (what
    anyone can compute). Opening with the cache still checks the signature: the key map
    is refused and reported, and the copy is deleted.

    Property: a cached key map skips its signature only under the holder's secret MAC
    key (authenticity). Killed: ObjectCache.of_holder passing None as the MAC key (the
    MAC became an unkeyed hash: the forged key map was taken unverified); it survived all
    of tests/store/test_cache.py."""
    cache = tmp_path / "cache"

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(30_000)), name="db")
        real = sorted(p for p in (repo_path / "keymaps").rglob("*") if p.is_file())[0]
        forged = bytearray(real.read_bytes())
        forged[-1] ^= 1  # the last byte of the signature
        name = keymap_name(1, object_id(bytes(forged)))
        (repo_path / name).write_bytes(bytes(forged))
        for key in (None, bytes(32)):
            async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
                holder = cache / repo.id / repo.key_id
                copy = holder / name
                copy.parent.mkdir(parents=True, exist_ok=True)
                size = struct.pack("<Q", len(forged))
                copy.write_bytes(
                    bytes(forged) + size + _unkeyed_mac(name, len(forged), bytes(forged), key)
                )
            async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
                assert any(name in p and "fails the signature" in p for p in repo.problems)
                assert not copy.exists()

    run_asyncio(go())


def test_an_entry_that_cannot_be_written_costs_that_entry_only(tmp_path: Path) -> None:
    """The kind's folder is taken by a file (what a crash of another tool or a stray copy
    leaves): writing an entry under it fails quietly, the cache goes on for the other
    kinds, and nothing is raised to the operation that wrote it.

    Property: the cache is never a cause of failure (cache.py docstring). Killed: the
    cleanup of the temporary file unguarded (`suppress(None)`: its NotADirectoryError
    escaped write())."""
    cache = _cache(tmp_path)
    name, data = _object()
    cache.write(name, data, len(data))  # makes the directories
    folder = _file(cache, name).parent
    _file(cache, name).unlink()
    folder.rmdir()
    folder.write_bytes(b"not a directory")
    cache.write(name, data, len(data))
    assert cache.read(name, len(data), 1 << 20) is None
    other = f"generations/{object_id(data)}"
    cache.write(other, data, len(data))
    assert cache.read(other, len(data), 1 << 20) == data


def test_a_linked_folder_in_the_cache_is_never_read_through_nor_deleted_in(
    run_asyncio: Any, tmp_path: Path
) -> None:
    """`<holder>/index` replaced by a link to another directory that holds a file named
    like a listed index object: the cache neither reads it nor deletes it (O_NOFOLLOW
    guards a path's last component only; the folders are checked too), and the
    repository works on without the cache's copy. Found by the mutation audit (issue 12)."""

    async def go() -> None:
        repo_path, cache, docs = tmp_path / "repo", tmp_path / "cache", tmp_path / "documents"
        docs.mkdir()
        data = os.urandom(50_000)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            await repo.stats()
            holder = cache / repo.id / repo.key_id
        (name,) = [p.name for p in (repo_path / "index").iterdir()]
        victim = docs / name
        victim.write_bytes(b"a user's file that happens to have this name")
        shutil.rmtree(holder / "index")
        (holder / "index").symlink_to(docs)
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            await repo.stats()
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == data
        assert victim.read_bytes() == b"a user's file that happens to have this name"

    run_asyncio(go())


def test_a_copy_that_fails_is_never_deleted_through_a_linked_folder(tmp_path: Path) -> None:
    """The deletion of a failed copy checks every folder on its path, whichever caller
    asks for it (the read's own check is the first line; this is the second)."""
    cache = ObjectCache(tmp_path / "cache", os.urandom(32), os.urandom(16), new_key())
    docs = tmp_path / "documents"
    docs.mkdir()
    name = "index/" + "ab" * 32
    victim = docs / name.split("/")[1]
    victim.write_bytes(b"not a cache entry")
    cache.directory.mkdir(parents=True)
    (cache.directory / "index").symlink_to(docs)
    cache._discard(str(cache.directory / name))
    assert victim.exists()
    assert cache.read(name, 17, 1 << 20) is None
    assert victim.exists()
