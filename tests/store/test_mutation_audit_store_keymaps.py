"""Mutation audit of dedupe/store/keymaps.py (issue 12): tests that kill the surviving
mutants that changed a safety property of KeyDirectory. Each test names the property it
pins and the mutant(s) it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.crypto import KdfParams, new_key
from dedupe.crypto.epochs import box_public_of, box_seal, new_box_secret
from dedupe.errors import IntegrityError
from dedupe.format.keymap import GENERATION, PACK

Run = Callable[..., Any]


def test_a_lookup_that_misses_after_a_rotation_elsewhere_adopts_it_and_finds_the_object(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A handle is open when another client rotates the keys and then backs up: the new
    generation's key map is filed under the new epoch, which this handle's keyring does
    not list. Reading that generation's header through this handle (no operation-level
    keyring refresh in between) misses, lists the key maps again, misses again, reads
    the keyring again, adopts the rotation and finds the generation.

    Property: an authentic object written under a rotation this handle has not seen is
    found, not refused as unauthenticated (KeyDirectory.find; what verify would report
    as planted, and prune --delete-unauthenticated would delete). Killed: find_14 and
    find_15 (the keyring never read again after a second miss) and find_16 to find_20
    (the lookup after adopting it made with None, or without the kind or the id); also
    red: find_12 and _13 (the keyring read again after a hit too), and in
    repository.py RepositoryStore.__init___53 (the store never hands the directory its
    way to read the keyring again)."""

    async def go() -> None:
        data = os.urandom(30_000)
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(30_000)), name="db")
        async with await Repository.open(repo_path, PASSPHRASE) as this:
            store = this._store
            assert store.keyring.current_epoch == 1
            async with await Repository.open(repo_path, PASSPHRASE) as other:
                await other.keys.rotate()
                gen = await other.backup(io.BytesIO(data), name="later", kind="full")
            header = await store.read_manifest_header(gen.id)
            assert header["name"] == "later"
            assert store.keyring.current_epoch == 2
            (found,) = store.keymaps.all(GENERATION, bytes.fromhex(gen.id))
            assert found.epoch == 2
            out = io.BytesIO()
            await this.restore(gen.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


def test_an_entry_whose_read_wrap_opens_nothing_costs_no_object_its_real_entry_opens(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Every pack and every generation gets a second key map entry whose read wrap is
    sealed to a stranger's key (what any key holder may sign for an object it did not
    write, docs/FORMAT.md 4.5), placed before the real entry. A fresh handle (no data
    key cached) restores every generation byte for byte: read_keys notes the entry that
    does not open and uses the other.

    Property: a forged entry costs no authentic data (KeyDirectory.read_keys). Killed:
    read_keys_2 (the list of errors made None: the failing entry crashed the read of
    every pack and body it was added to), read_keys_39 and read_keys_40 (`not keys and
    errors` -> `or` / `keys and`: the forged entry's error raised although the real
    entry's key had opened)."""

    async def go() -> None:
        data = {}
        async with await make_repo(repo_path) as repo:
            for name in ("a", "b"):
                raw = os.urandom(120_000)
                data[(await repo.backup(io.BytesIO(raw), name=name)).id] = raw
            km = repo._store.keymaps
            stranger = box_public_of(new_box_secret())
            forged = [
                replace(km.all(kind, oid)[0].entry, read_wrap=box_seal(stranger, new_key()))
                for kind in (PACK, GENERATION)
                for oid in sorted(km.ids(kind))
            ]
            await km.write(forged)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            km = repo._store.keymaps
            for kind in (PACK, GENERATION):
                for oid in km.ids(kind):
                    found = km._by_kind[kind][oid]
                    assert len(found) == 2
                    found.sort(key=lambda f: f.entry not in forged)  # the forged one first
                    assert found[0].entry in forged
            for gen_id, raw in data.items():
                out = io.BytesIO()
                await repo.restore(gen_id, out)
                assert out.getvalue() == raw

    run_asyncio(go())


def test_a_writer_opens_its_own_generation_whatever_entry_comes_first(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Writer w1 backs up a generation; writer w2 signs an entry for it too (any key
    holder may; a writer's generation entry names the writer as its author, so w2's
    names w2, with a self-wrap of a key of its own). With w2's entry first, w1 still
    reads the generation's body (which it needs for its incrementals): it skips the
    entries whose self-wrap is not its own and opens its own.

    Property: another key's entry costs a writer none of its own generations
    (KeyDirectory.read_keys, the writer's path). Killed: read_keys_20 (`continue` ->
    `break` after an entry that is not the writer's: KeyNotAvailable, "another key
    wrote it"); also red: generation_entry_7, _18, _25 (the writer's self-wrap not
    written: it could not open its own generations at all, so its incrementals could
    not chain)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            for who in ("w1", "w2"):
                await repo.keys.add(who, role="writer", name=who, kdf=KdfParams.weakest())
        raw = os.urandom(60_000)
        async with await Repository.open(repo_path, "w1") as w1:
            gen = await w1.backup(io.BytesIO(raw), name="db", kind="full")
            w1_id = w1._store.holder.key_id
            _h, _m, table = await w1._store.read_manifest(gen.id)
        gen_id = bytes.fromhex(gen.id)
        async with await Repository.open(repo_path, "w2") as w2:
            km = w2._store.keymaps
            await km.write([km.generation_entry(gen_id, new_key(), new_key())])
            w2_id = w2._store.holder.key_id
        async with await Repository.open(repo_path, "w1") as w1:
            km = w1._store.keymaps
            found = km._by_kind[GENERATION][gen_id]
            assert km.authors(gen_id) == {w1_id, w2_id}
            found.sort(key=lambda f: f.entry.self_key == w1_id)  # w2's entry first
            assert found[0].entry.self_key == w2_id
            header, _meta, got = await w1._store.read_manifest(gen.id)
            assert header["id"] == gen.id and got == table

    run_asyncio(go())


class SortedListing(LocalBackend):
    """Lists names in sorted order (a directory's own order is the file system's)."""

    async def list(self, prefix: str) -> list[str]:
        return sorted(await super().list(prefix))


def _keyring(repo_path: Path) -> dict[str, bytes]:
    return {n: (repo_path / "keyring" / n).read_bytes() for n in ("1", "2")}


def _put_keyring(repo_path: Path, copies: dict[str, bytes]) -> None:
    for n, raw in copies.items():
        (repo_path / "keyring" / n).write_bytes(raw)


def _keymaps(repo_path: Path) -> set[str]:
    return {
        p.relative_to(repo_path).as_posix()
        for p in (repo_path / "keymaps").rglob("*")
        if p.is_file()
    }


async def _restores(repo_path: Path, data: dict[str, bytes]) -> None:
    async with await Repository.open(repo_path, PASSPHRASE) as repo:
        for gen_id, raw in data.items():
            out = io.BytesIO()
            await repo.restore(gen_id, out)
            assert out.getvalue() == raw


@pytest.mark.parametrize("newer", ["epoch", "key"])
def test_a_keyring_older_than_the_repository_never_consolidates_away_newer_key_maps(
    run_asyncio: Run, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, newer: str
) -> None:
    """The keyring is put back to an older copy (validly signed), which a client that
    never saw the newer one cannot tell (FORMAT.md 4.3, 11). What it lacks: a key epoch
    (the keys were rotated since: every key map is now of epoch 2), or a key (a writer
    added since has backed up: its key map is signed by a key the old keyring does not
    list). That client backs up (a key map of epoch 1 that it accepts, listed first),
    then tries to rotate, which consolidates and deletes every key map it read: it
    refuses, naming the key maps of the epoch or key it does not know, and deletes none.
    With the newest keyring put back, every generation written before restores.

    Property: refused_for_newer_keys lists every key map a rolled-back keyring refuses
    for an unknown epoch or signer, so that rotate, key remove and repair delete nothing
    on its word (data loss otherwise: the deleted key maps were the only ones). Killed:
    refused_for_newer_keys_4 (only the active epochs' key maps listed), _5 (`name in
    loaded` -> `not in`: nothing unloaded was looked at), _6 (`continue` -> `break` at
    the first loaded key map) and _30 (`or` -> `and` between the two reasons: a key map
    of an unknown signer not counted)."""

    async def go() -> None:
        data = {}
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(raw := os.urandom(40_000)), name="db")
            data[gen.id] = raw
            older = _keyring(repo_path)
            if newer == "epoch":
                await repo.keys.rotate()
            else:
                await repo.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
        if newer == "key":
            async with await Repository.open(repo_path, "w") as writer:
                gen = await writer.backup(io.BytesIO(raw := os.urandom(40_000)), name="w")
                data[gen.id] = raw
        newest = _keyring(repo_path)
        _put_keyring(repo_path, older)
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path / "a-client-that-never-saw-it"))
        async with await Repository.open(SortedListing(repo_path), PASSPHRASE) as stale:
            assert stale._store.keyring.current_epoch == 1
            await stale.backup(io.BytesIO(os.urandom(40_000)), name="stale")
            before = _keymaps(repo_path)
            assert min(before).startswith("keymaps/00000001/")  # one it accepts is listed first
            with pytest.raises(IntegrityError, match="this keyring does not know"):
                await stale.keys.rotate()
            assert _keymaps(repo_path) == before
        _put_keyring(repo_path, newest)
        await _restores(repo_path, data)

    run_asyncio(go())


def test_a_cached_key_map_refused_now_is_reported_not_fatal(
    run_asyncio: Run, repo_path: Path, tmp_path: Path
) -> None:
    """An admin's handle accepted (and cached) a writer's key map; the writer is then
    removed, and its key map is still listed (as between a removal's keyring write and
    its consolidation's deletes). Opening with the warm cache, the cached key map is
    checked against the keyring again: refused ("not in the keyring"), reported, and
    the open goes on; what the removal consolidated restores.

    Property: a key map that fails a check is refused and reported, never fatal, on the
    cache's path as on the store's (liveness). Killed: _accept_all_10 (the refusal
    appended as None: the open crashed with a TypeError); also red: write_36 to _38
    (a key map this holder wrote cached with None for its name, bytes or size)."""
    cache = tmp_path / "cache"

    async def go() -> None:
        async with await make_repo(repo_path, cache=cache) as repo:
            await repo.keys.add("w", role="writer", name="w", kdf=KdfParams.weakest())
        raw = os.urandom(30_000)
        async with await Repository.open(repo_path, "w") as writer:
            gen = await writer.backup(io.BytesIO(raw), name="db", kind="full")
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            before = {p: p.read_bytes() for p in (repo_path / "keymaps").rglob("*") if p.is_file()}
            await repo.keys.remove("w")
        for path, data in before.items():
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)  # the writer's key map, not deleted yet
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            assert any("which is not in the keyring" in p for p in repo.problems)
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == raw

    run_asyncio(go())


def test_a_consolidation_that_rewrites_a_key_map_byte_for_byte_keeps_it(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Prune consolidates the key maps; a second prune with nothing changed writes the
    very same key maps again (same entries in the same order, same signer: the same
    bytes, so the same names), then deletes the key maps it read but did not write.
    Every generation still restores from a fresh handle, and the key maps are those of
    the first prune.

    Property: consolidation never deletes a key map it has just written (all the keys
    of the repository would go: data loss). Killed: write_42 (write returning None in
    place of each name: the second prune deleted every key map)."""

    async def go() -> None:
        data = {}
        async with await make_repo(repo_path) as repo:
            for name in ("a", "b"):
                raw = os.urandom(60_000)
                data[(await repo.backup(io.BytesIO(raw), name=name)).id] = raw
            await repo.prune()
            first = _keymaps(repo_path)
            await repo.prune()
            assert _keymaps(repo_path) == first
        await _restores(repo_path, data)

    run_asyncio(go())
