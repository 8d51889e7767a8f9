"""Faults at every step of the commands that delete or rewrite: prune, forget, key rotate,
key remove (issue 12, "faults at every step").

Each command is first run once on a copy of a template repository through a backend that
counts its calls (reads, listings, writes, conditional writes, deletes). Then, on a fresh
copy each time, call n fails (a BackendError, as a lost connection or a full disk would
give) for every n, or, for reads of manifests and index objects, returns the object with
one bit flipped. Whatever the command did before the fault, afterwards:

- it failed with a DedupeError (a message, never a traceback) or completed;
- every generation that must survive it restores byte for byte, and `verify --read-data`
  passes: nothing was deleted that the command could not prove unreferenced;
- the same command, run again without faults, completes, and the repository is whole.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, SMALL_PACK

from dedupe import Repository
from dedupe.backends.base import Buffer
from dedupe.backends.local import LocalBackend
from dedupe.crypto import KdfParams
from dedupe.errors import BackendError, DedupeError
from dedupe.store.locks import remove_locks

WEAK = KdfParams.weakest()
READER_PW = "reader passphrase"
MAX_TRIALS = 70  # per command and fault kind: every call up to this, else an even stride


class FaultyBackend(LocalBackend):
    """Counts every call; call number `fail_at` (1-based) raises BackendError, or, with
    `damage`, a read of a manifest or index object returns it with one bit flipped."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.calls = 0
        self.fail_at: int | None = None
        self.damage = False
        self.hit: str | None = None
        self.reads_of_metadata = 0

    def _call(self, what: str) -> bool:
        """Count a call; raise if it is the one to fail; say whether to damage it."""
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at and not self.damage:
            self.hit = what
            raise BackendError(f"injected failure at call {self.calls}: {what}")
        return False

    def _damaged_read(self, name: str, data: bytes) -> bytes:
        if name.startswith(("generations/", "index/")):
            self.reads_of_metadata += 1
            if self.damage and self.reads_of_metadata == self.fail_at and data:
                self.hit = f"damaged read of {name}"
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0x10
                return bytes(flipped)
        return data

    async def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._call(f"get {name}")
        return self._damaged_read(name, await super().get(name, offset, length))

    async def read_into(self, name: str, offset: int, into: memoryview) -> None:
        self._call(f"read_into {name}")
        await super().read_into(name, offset, into)

    async def list(self, prefix: str) -> list[str]:
        self._call(f"list {prefix}")
        return await super().list(prefix)

    async def stat(self, name: str) -> int:
        self._call(f"stat {name}")
        return await super().stat(name)

    async def put(self, name: str, data: Buffer) -> None:
        self._call(f"put {name}")
        await super().put(name, data)

    async def put_stream(self, name: str, parts: Iterable[Buffer]) -> None:
        self._call(f"put_stream {name}")
        await super().put_stream(name, parts)

    async def delete(self, name: str) -> None:
        self._call(f"delete {name}")
        await super().delete(name)

    async def create_new(self, name: str, data: Buffer) -> None:
        self._call(f"create_new {name}")
        await super().create_new(name, data)

    async def swap(self, name: str, data: Buffer, expected: bytes) -> None:
        self._call(f"swap {name}")
        await super().swap(name, data, expected)

    async def delete_if(self, name: str, expected: bytes) -> None:
        self._call(f"delete_if {name}")
        await super().delete_if(name, expected)


async def _restored(repo: Repository, gen_id: str) -> bytes:
    out = io.BytesIO()
    await repo.restore(gen_id, out)
    return out.getvalue()


async def _check_whole(root: Path, must: dict[str, bytes], may: dict[str, bytes]) -> None:
    """`must` generations are listed and restore exactly; of `may`, those listed restore
    exactly; verify --read-data passes."""
    async with await Repository.open(root, PASSPHRASE) as repo:
        listed = {g.id for g in await repo.generations()}
        assert set(must) <= listed, f"lost {set(must) - listed}"
        assert listed <= set(must) | set(may), f"unexpected {listed - set(must) - set(may)}"
        for gen_id in listed:
            assert await _restored(repo, gen_id) == {**may, **must}[gen_id]
        report = await repo.verify(read_data=True)
        assert report.ok, report.to_dict()


async def _template(root: Path) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Fulls and an incremental of two names, small packs, a reader key; then one name's
    generations forgotten, so that prune has packs to delete and packs to repack.
    Returns (generations that stay, the generation a forget will remove)."""
    rnd = os.urandom
    async with await Repository.init(root, PASSPHRASE, pack_size=SMALL_PACK, kdf=WEAK) as repo:
        a = rnd(400_000)
        a2 = a[:200_000] + rnd(150_000) + a[250_000:]
        b = rnd(300_000) + a[:100_000]
        c = rnd(250_000)
        stays: dict[str, bytes] = {}
        stays[(await repo.backup(io.BytesIO(a), name="a", kind="full")).id] = a
        stays[(await repo.backup(io.BytesIO(a2), name="a", kind="incremental")).id] = a2
        gone = (await repo.backup(io.BytesIO(b), name="b", kind="full")).id
        await repo.forget(ids=[gone])
        cid = (await repo.backup(io.BytesIO(c), name="c", kind="full")).id
        await repo.keys.add(READER_PW, role="reader", name="r", kdf=WEAK)
    return stays, {cid: c}


async def _forget_if_listed(repo: Repository, gone: str) -> Any:
    """`forget` of one generation, as a retention policy would run it: nothing to do once
    it is gone (a re-run after a fault that came after the deletion)."""
    if gone in {g.id for g in await repo.generations()}:
        return await repo.forget(ids=[gone])
    return None


async def _remove_if_listed(repo: Repository, name: str) -> Any:
    """`key remove` of the reader key, nothing to do once it is gone."""
    if any(k.name == name for k in await repo.keys.list()):
        return await repo.keys.remove(name)
    return None


# Each command, given the repository and the id of the generation forget removes.
COMMANDS: dict[str, Callable[[Repository, str], Awaitable[Any]]] = {
    "prune": lambda repo, _gone: repo.prune(repack_threshold=0.0),
    "forget": lambda repo, gone: _forget_if_listed(repo, gone),
    "key rotate": lambda repo, _gone: repo.keys.rotate(),
    "key rotate --reencrypt": lambda repo, _gone: repo.keys.rotate(reencrypt=True),
    "key remove": lambda repo, _gone: _remove_if_listed(repo, "r"),
}


def _trials(total: int) -> list[int]:
    if total <= MAX_TRIALS:
        return list(range(1, total + 1))
    stride = total / MAX_TRIALS
    picked = {1, total} | {1 + int(i * stride) for i in range(MAX_TRIALS)}
    return sorted(picked)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_fault_at_any_call_loses_nothing(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "template"
    stays, other = asyncio.run(_template(template))
    gone = next(iter(other))
    command_of = COMMANDS[command]

    async def run(repo: Repository) -> Any:
        return await command_of(repo, gone)

    # What must survive the command: everything, but the generation forget removes.
    must = stays if command == "forget" else {**stays, **other}
    may = other if command == "forget" else {}

    def fresh(n: int) -> Path:
        root = tmp_path / f"trial-{n}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)
        state = tmp_path / f"state-{n}"  # the keyring serials this "client" saw
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(state))
        return root

    async def attempt(root: Path, fail_at: int | None, damage: bool) -> FaultyBackend:
        backend = FaultyBackend(root)
        async with await Repository.open(backend, PASSPHRASE) as repo:
            backend.calls, backend.reads_of_metadata = 0, 0
            backend.fail_at, backend.damage = fail_at, damage
            try:
                await run(repo)
            except DedupeError:
                pass  # a clear failure is fine; a traceback (any other exception) is not
            backend.fail_at = None
        return backend

    # 1. how many calls, and how many metadata reads, the command makes
    counted = asyncio.run(attempt(fresh(0), None, False))
    total, reads = counted.calls, counted.reads_of_metadata
    assert total > 0
    tried = 0
    for damage, count in ((False, total), (True, reads)):
        for n in _trials(count):
            root = fresh(n)

            async def one(root: Path = root, n: int = n, damage: bool = damage) -> None:
                faulty = await attempt(root, n, damage)
                where = f"{command}: {'damaged read' if damage else 'call'} {n}: {faulty.hit}"
                if (faulty.hit or "").startswith("delete locks/"):
                    # Its release failed: the lock stays until this process exits (it
                    # names a live pid of this host). A real process would exit now.
                    await remove_locks(LocalBackend(root), all_locks=True)
                try:
                    await _check_whole(root, must, may)
                    async with await Repository.open(root, PASSPHRASE) as repo:
                        await run(repo)  # the same command again, without faults
                    await _check_whole(root, must, may)
                except AssertionError as e:
                    raise AssertionError(f"{where}: {e}") from None
                except DedupeError as e:
                    raise AssertionError(f"{where}: {type(e).__name__}: {e}") from None

            asyncio.run(one())
            shutil.rmtree(root)
            tried += 1
    print(f"\n{command}: {total} backend calls, {reads} metadata reads; {tried} faults injected")
