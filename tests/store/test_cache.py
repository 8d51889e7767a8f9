"""The local object cache (dedupe/store/cache.py, docs/FORMAT.md 3.1): what it saves, and
that it never changes what a command sees: a damaged copy is fetched again, a copy of an
object the store no longer lists is never read, and a cache that cannot be written costs
only a warning. On a local directory (the cache asked for) and on S3 (its default)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import Backend, open_backend
from dedupe.backends.base import Buffer
from dedupe.crypto import new_key
from dedupe.errors import GenerationNotFound
from dedupe.format.keymap import keymap_name
from dedupe.hashing import object_id
from dedupe.store.cache import ObjectCache

CACHED = ("generations/", "index/", "keymaps/")


class Counting(Backend):
    """Another backend, with the reads it is asked for counted by kind of object."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.location = inner.location
        self.remote = inner.remote
        self.reads: Counter[str] = Counter()

    def _count(self, name: str) -> None:
        self.reads[name.split("/", 1)[0] + "/"] += 1

    async def put(self, name: str, data: Buffer) -> None:
        await self.inner.put(name, data)

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._count(name)
        return await self.inner.get(name, offset, length)

    async def stat(self, name: str) -> int:
        self._count(name)
        return await self.inner.stat(name)

    async def list(self, prefix: str) -> list[str]:
        return await self.inner.list(prefix)

    async def list_sized(self, prefix: str) -> dict[str, int]:
        return await self.inner.list_sized(prefix)

    async def delete(self, name: str) -> None:
        await self.inner.delete(name)

    async def create_new(self, name: str, data: Buffer) -> None:
        await self.inner.create_new(name, data)

    async def swap(self, name: str, data: Buffer, expected: bytes) -> None:
        await self.inner.swap(name, data, expected)

    async def delete_if(self, name: str, expected: bytes) -> None:
        await self.inner.delete_if(name, expected)

    async def close(self) -> None:
        await self.inner.close()

    def cached_kinds_read(self) -> dict[str, int]:
        return {k: n for k, n in self.reads.items() if k in CACHED}


async def _open(location: str, cache: Path | bool) -> tuple[Repository, Counting]:
    backend = Counting(open_backend(location))
    return await Repository.open(backend, PASSPHRASE, cache=cache), backend


async def _three_generations(location: str) -> list[str]:
    """A repository with three generations, written without a cache."""
    async with await make_repo(location) as repo:
        ids = []
        for i in range(3):
            data = os.urandom(50_000) + bytes(i)
            ids.append((await repo.backup(io.BytesIO(data), name=f"db{i % 2}")).id)
    return ids


def _cached_files(cache: Path) -> dict[str, Path]:
    """name -> file of every object in the cache (of its only repository and key)."""
    (holder,) = [d for d in cache.glob("*/*") if d.is_dir()]
    return {
        p.relative_to(holder).as_posix(): p
        for p in holder.rglob("*")
        if p.is_file() and not p.name.endswith(".tmp")
    }


def _holder_dir(cache: Path, repo: Repository) -> Path:
    return cache / repo.id / repo.key_id


def test_a_warm_cache_lists_generations_reading_no_object(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    """The first listing fetches key maps and headers and keeps them; the second, from
    another handle, reads none of them (only lists), and lists the same generations. A
    backup after it fetches no index object or key map written before."""
    cache = tmp_path / "cache"

    async def go() -> None:
        ids = await _three_generations(location)
        repo, counting = await _open(location, cache)
        async with repo:
            cold = [g.id for g in await repo.generations()]
            assert counting.reads["generations/"] >= 3 and counting.reads["keymaps/"] >= 3
        assert sorted(cold) == sorted(ids)
        files = _cached_files(cache)
        assert {f"generations/{i}" for i in ids} <= files.keys()

        repo, counting = await _open(location, cache)
        async with repo:
            assert [g.id for g in await repo.generations()] == cold
            assert counting.cached_kinds_read() == {}
            await repo.stats()  # loads the index: its objects were fetched by no one yet
            index_reads = counting.reads["index/"]
            assert index_reads == 3
        repo, counting = await _open(location, cache)
        async with repo:
            stats = await repo.backup(io.BytesIO(os.urandom(20_000)), name="db0")
            # (it reads its parent's manifest: the body is never cached)
            assert counting.reads["index/"] == counting.reads["keymaps/"] == 0
            counting.reads.clear()
            assert stats.id in [g.id for g in await repo.generations()]
            assert counting.cached_kinds_read() == {}  # its own objects were cached as written

    run_asyncio(go())


def test_what_another_client_wrote_is_listed_through_the_cache(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    async def go() -> None:
        await _three_generations(location)
        repo, _ = await _open(location, cache)
        async with repo:
            before = {g.id for g in await repo.generations()}
            async with await Repository.open(location, PASSPHRASE, cache=False) as other:
                new = (await other.backup(io.BytesIO(b"x" * 9000), name="db9")).id
            after = {g.id for g in await repo.generations()}
            assert after == before | {new}

    run_asyncio(go())


def test_a_damaged_cache_copy_is_fetched_again(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    """Every cached file damaged (one byte flipped, or cut short): the listing and a
    restore are what they were, nothing is reported, and the copies are intact again."""
    cache = tmp_path / "cache"

    async def go() -> None:
        ids = await _three_generations(location)
        repo, _ = await _open(location, cache)
        async with repo:
            expected = await repo.generations()
            await repo.stats()
        files = _cached_files(cache)
        assert any(n.startswith("index/") for n in files)
        good = {name: path.read_bytes() for name, path in files.items()}
        for i, path in enumerate(files.values()):
            data = bytearray(path.read_bytes())
            if i % 2:
                data[len(data) // 2] ^= 0x40
            else:
                del data[-1]
            path.write_bytes(bytes(data))
        repo, counting = await _open(location, cache)
        async with repo:
            assert await repo.generations() == expected
            out = io.BytesIO()
            await repo.restore(ids[0], out)
            assert out.getvalue()
            assert repo.problems == []
            assert counting.reads["keymaps/"] >= len([n for n in good if "keymaps/" in n])
        assert {n: p.read_bytes() for n, p in _cached_files(cache).items()} == good

    run_asyncio(go())


def test_a_cached_copy_of_a_forgotten_generation_is_never_read(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    """The cache keeps the authentic header of a generation that `forget` removed (put
    back by someone with write access to the cache, or left by a crash): it is neither
    listed nor resolvable by id, and the next listing deletes it."""
    cache = tmp_path / "cache"

    async def go() -> None:
        ids = await _three_generations(location)
        victim = ids[1]  # db1's only generation: nothing depends on it
        repo, _ = await _open(location, cache)
        async with repo:
            await repo.generations()
            copy = (_holder_dir(cache, repo) / "generations" / victim).read_bytes()
            await repo.forget(ids=[victim])
            listed = [g.id for g in await repo.generations()]
            assert victim not in listed
            assert not (_holder_dir(cache, repo) / "generations" / victim).exists()
            (_holder_dir(cache, repo) / "generations" / victim).write_bytes(copy)
        repo, _ = await _open(location, cache)
        async with repo:
            with pytest.raises(GenerationNotFound):  # stated first, then read from the cache
                await repo._store.read_manifest_header(victim)
            with pytest.raises(GenerationNotFound):
                await repo.resolve(victim)
            assert [g.id for g in await repo.generations()] == listed
            assert not (_holder_dir(cache, repo) / "generations" / victim).exists()

    run_asyncio(go())


def test_a_cache_that_cannot_be_written_costs_a_warning_only(
    run_asyncio: Any, repo_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache directory's place is taken by a file (what a full or read-only disk
    looks like to the writer, and what root cannot write through either)."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_bytes(b"")

    async def go() -> None:
        ids = await _three_generations(str(repo_path))
        with caplog.at_level(logging.WARNING, logger="dedupe"):
            repo, _ = await _open(str(repo_path), blocked / "cache")
            async with repo:
                assert sorted(g.id for g in await repo.generations()) == sorted(ids)
                await repo.backup(io.BytesIO(os.urandom(9000)), name="db5")
        warnings = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(warnings) == 1, warnings

    run_asyncio(go())


def test_local_repositories_are_not_cached_unless_asked(
    run_asyncio: Any, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "home" / ".cache" / "dedupe"  # made, parents and all, when needed
    monkeypatch.setenv("DEDUPE_CACHE_DIR", str(default))

    async def go() -> None:
        await _three_generations(str(repo_path))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await repo.generations()
        assert not default.exists()
        async with await Repository.open(repo_path, PASSPHRASE, cache=True) as repo:
            await repo.generations()
            assert (_holder_dir(default, repo) / "generations").is_dir()
            assert (default / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f59")

    run_asyncio(go())


def test_s3_repositories_are_cached_by_default(
    run_asyncio: Any, s3_location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "default-cache"
    monkeypatch.setenv("DEDUPE_CACHE_DIR", str(default))

    async def go() -> None:
        await _three_generations(s3_location)
        async with await Repository.open(s3_location, PASSPHRASE) as repo:
            await repo.generations()
            assert len(list((_holder_dir(default, repo) / "generations").iterdir())) == 3
        async with await Repository.open(s3_location, PASSPHRASE, cache=False) as repo:
            assert len(await repo.generations()) == 3

    run_asyncio(go())


def test_cli_cache_options(cli: Any, cli_env: dict[str, str], tmp_path: Path) -> None:
    assert cli("init", env=cli_env).returncode == 0
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(30_000))
    assert cli("backup", str(src), "--name", "db", env=cli_env).returncode == 0
    cache = tmp_path / "cli-cache"
    listed = cli("--cache-dir", str(cache), "generations", "--json", env=cli_env)
    assert listed.returncode == 0, listed.stderr
    assert any(cache.rglob("generations/*"))
    plain = cli("--no-cache", "generations", "--json", env=cli_env)
    assert plain.returncode == 0 and plain.stdout == listed.stdout
    both = cli("--no-cache", "--cache-dir", str(cache), "generations", env=cli_env)
    assert both.returncode == 2 and b"exclude each other" in both.stderr


def test_a_cached_key_map_skips_its_signature_only_under_this_holders_mac(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """A key map with a broken signature, in the repository and in the cache. With a MAC
    made under any key but this holder's (all that someone without the key file can
    make) it is fetched and refused, and reported; the cache copy is what the holder's own
    MAC would make only after the signature passed."""
    cache = tmp_path / "cache"

    async def go() -> None:
        await _three_generations(str(repo_path))
        name = sorted(p for p in (repo_path / "keymaps").rglob("*") if p.is_file())[0]
        forged = bytearray(name.read_bytes())
        forged[-1] ^= 1  # the last byte of the signature
        forged_name = keymap_name(1, object_id(bytes(forged)))
        (repo_path / forged_name).write_bytes(bytes(forged))
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            assert any(forged_name in p and "fails the signature" in p for p in repo.problems)
            holder = _holder_dir(cache, repo)
            assert not (holder / forged_name).exists()  # refused: never cached
            someone_else = ObjectCache(cache, bytes.fromhex(repo.id), os.urandom(16), new_key())
            copy = holder / forged_name
            copy.parent.mkdir(parents=True, exist_ok=True)
            size = struct.pack("<Q", len(forged))
            mac = someone_else._mac(forged_name, len(forged), forged)
            copy.write_bytes(bytes(forged) + size + mac)
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            assert any(forged_name in p and "fails the signature" in p for p in repo.problems)
            assert not copy.exists()  # the copy failed its MAC and was deleted

    run_asyncio(go())


def test_an_empty_file_under_a_forgotten_generations_name_brings_nothing_back(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    """Someone with write access to the store plants an empty object under the name of a
    generation that was forgotten (names are public): the cached copy of its header does
    not match the listed size, so the generation stays gone and the plant is reported."""
    cache = tmp_path / "cache"

    async def go() -> None:
        ids = await _three_generations(str(repo_path))
        victim = ids[1]
        repo, _ = await _open(str(repo_path), cache)
        async with repo:
            await repo.generations()
            copy = (_holder_dir(cache, repo) / "generations" / victim).read_bytes()
            await repo.forget(ids=[victim])
        (repo_path / "generations" / victim).write_bytes(b"")
        repo, _ = await _open(str(repo_path), cache)
        async with repo:
            (_holder_dir(cache, repo) / "generations" / victim).write_bytes(copy)
            listed = [g.id for g in await repo.generations()]
            assert victim not in listed and len(listed) == 2
            assert any(victim in p for p in repo.problems)

    run_asyncio(go())


def test_names_a_listing_should_not_hold_are_never_looked_up(
    run_asyncio: Any, s3_location: str, tmp_path: Path
) -> None:
    """An object store lists whatever keys were put: `..` components, overlong names."""
    cache = tmp_path / "cache"

    async def go() -> None:
        await _three_generations(s3_location)
        backend = open_backend(s3_location)
        hexid = "ab" * 32
        for name in (
            "keymaps/00000001/..",
            f"keymaps/00000001/../{hexid}",
            f"index/../{hexid}",
            f"generations/{'x' * 300}",
        ):
            await backend.put(name, b"planted")
        await backend.close()
        for _ in range(2):
            repo, _ = await _open(s3_location, cache)
            async with repo:
                assert len(await repo.generations()) == 3
                await repo.stats()

    run_asyncio(go())


class Hung(BaseException):
    """Raised by the test's alarm: no `except OSError` (or Exception) in the code swallows it."""


def test_odd_files_in_the_cache_are_skipped_never_followed_or_waited_on(
    run_asyncio: Any, repo_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A FIFO, an 8 GiB sparse file and a directory where cached files go, and the index
    folder a link to someone's documents: listing and stats work and do not block, the
    documents stay, and nothing the cache cannot use is read."""
    cache = tmp_path / "cache"
    documents = tmp_path / "documents"
    (documents / "sub").mkdir(parents=True)
    (documents / "sub" / ("ab" * 32)).write_bytes(b"keep me")
    (documents / "notes.txt").write_bytes(b"keep me too")

    async def go() -> None:
        await _three_generations(str(repo_path))
        repo, _ = await _open(str(repo_path), cache)
        async with repo:
            await repo.generations()
            await repo.stats()
        holder = next(p for p in cache.glob("*/*") if p.is_dir())
        headers = sorted((holder / "generations").iterdir())
        headers[0].unlink()
        os.mkfifo(headers[0])
        headers[1].unlink()
        headers[1].mkdir()
        keymap = sorted((holder / "keymaps").rglob("*"))[-1]
        with open(keymap, "r+b") as f:
            f.truncate(8 << 30)
        shutil.rmtree(holder / "index")
        (holder / "index").symlink_to(documents)

        def hung(_signum: int, _frame: Any) -> None:
            raise Hung("the cache blocked on a file it should have skipped")

        previous = signal.signal(signal.SIGALRM, hung)
        signal.alarm(30)  # a blocking open would hang here for good
        try:
            with caplog.at_level(logging.WARNING, logger="dedupe"):
                repo, _ = await _open(str(repo_path), cache)
                async with repo:
                    assert len(await repo.generations()) == 3
                    await repo.stats()
                    assert repo.problems == []
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert (documents / "sub" / ("ab" * 32)).read_bytes() == b"keep me"
        assert (documents / "notes.txt").read_bytes() == b"keep me too"
        assert keymap.stat().st_size < 1 << 20 or not keymap.exists()

    run_asyncio(go())


def test_an_index_object_no_key_map_vouches_for_is_not_cached(
    run_asyncio: Any, repo_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"

    async def go() -> None:
        await _three_generations(str(repo_path))
        planted = b"DDPIDX02" + os.urandom(100_000)
        name = f"index/{object_id(planted)}"
        (repo_path / name).write_bytes(planted)
        repo, _ = await _open(str(repo_path), cache)
        async with repo:
            await repo.stats()
            assert any(name in p for p in repo.problems)
            assert not (_holder_dir(cache, repo) / name).exists()
            assert len(list((_holder_dir(cache, repo) / "index").iterdir())) == 3

    run_asyncio(go())


def test_status_reads_each_drill_record_once_through_the_cache(
    run_asyncio: Any, location: str, tmp_path: Path
) -> None:
    """Drill records are immutable: a warm cache serves them (and keeps the ones this
    client writes), so a status that runs every few minutes fetches only the records
    others made since it last ran; what it serves is still authenticated (a status from
    the cache sees the same drills)."""
    cache = tmp_path / "cache"

    async def go() -> None:
        async with await make_repo(location) as repo:
            await repo.objectives.set("db", rpo=3600, rto=600)
            await repo.backup(io.BytesIO(os.urandom(30_000)), name="db")
            for _ in range(3):
                await repo.objectives.drill()
        repo, counting = await _open(location, cache)
        async with repo:
            cold = await repo.objectives.status()
            assert counting.reads["drills/"] >= 3
        assert sum(n.startswith("drills/") for n in _cached_files(cache)) == 3
        repo, counting = await _open(location, cache)
        async with repo:
            warm = await repo.objectives.status()
            assert counting.reads["drills/"] == 0
            await repo.objectives.drill()  # cached as it is written
            counting.reads.clear()
            later = await repo.objectives.status()
            assert counting.reads["drills/"] == 0
        assert warm.sources[0].last_drill == cold.sources[0].last_drill
        assert later.sources[0].last_drill != warm.sources[0].last_drill and later.ok

    run_asyncio(go())
