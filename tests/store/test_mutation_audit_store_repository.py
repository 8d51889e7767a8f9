"""Mutation audit of dedupe/store/repository.py (issue 12): tests that kill the surviving
mutants that changed a safety property. Each test names the property it pins and the
mutant(s) it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.crypto import new_key, seal
from dedupe.crypto.keyfile import MAX_KEY_FILE_BYTES
from dedupe.errors import IntegrityError, RollbackDetected
from dedupe.format.keymap import PACK
from dedupe.format.manifest import CHUNK_RECORD, MAX_TABLE_FRAME, frame_aad
from dedupe.store.repository import _first_frame, open_with_one

Run = Callable[..., Any]


def _key_file(repo_path: Path) -> Path:
    (only,) = (repo_path / "keys").iterdir()
    return only


def test_a_torn_key_file_under_the_holders_id_does_not_lock_the_holder_out(
    run_asyncio: Run, repo_path: Path
) -> None:
    """An interrupted `key add` (or anyone with write access) leaves a key file under a
    key id the keyring lists that is damaged or far too large, and it sorts before the
    real one: open skips it (it is named in no error) and opens with the real key file.

    Property: a key file that cannot be read or parsed is passed over, never the end of
    the search (_open_key_file). Killed: `damaged = None` (the first damaged file raised
    AttributeError) and `continue` -> `break` after a refused read (the oversize file ended
    the search: WrongPassphrase)."""

    async def go() -> None:
        data = os.urandom(40_000)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
        real = _key_file(repo_path)
        key_id = real.name.split("-", 1)[0]
        torn = repo_path / "keys" / f"{key_id}-00000000"
        assert torn.name < real.name
        for planted in (b'{"format": "dedupe-key", "vers', None):
            if planted is None:
                with open(torn, "wb") as f:
                    f.truncate(MAX_KEY_FILE_BYTES + 1)  # refused unread by get_small
            else:
                torn.write_bytes(planted)
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == data

    run_asyncio(go())


# --- which of an object's keys opens it ----------------------------------------------------


def test_an_object_opens_with_whichever_of_its_keys_is_real() -> None:
    """An object's key map entries can hold several distinct keys (a key holder may sign an
    entry for an object it did not write, docs/FORMAT.md 4.5): open_with_one opens it with
    the one that opens it, wherever it stands among the others, and refuses it when none
    does.

    Property: a forged entry costs no authentic object (no data loss). Killed:
    `keys[1:]` -> `keys[2:]` (the real key second of three was never tried) and the key
    that opened it replaced by None when opening for real."""
    real, aad = new_key(), b"an aad"
    sealed = seal(real, b"the object", aad)
    others = [new_key() for _ in range(3)]
    for keys in ([real], [others[0], real], [others[0], real, others[1]], [*others, real]):
        assert open_with_one(keys, sealed, aad, "object") == b"the object"
    with pytest.raises(IntegrityError):
        open_with_one(others, sealed, aad, "object")


def test_the_body_key_is_the_one_that_opens_the_first_frame() -> None:
    """_first_frame returns the key that opened frame 0 (the rest of the body is opened
    with it) and frame 0's payload, for the real key at any place among an object's keys;
    a table frame holds whole chunk records, a last (meta) frame need not.

    Property: as above, for a manifest body (a forged body entry costs no generation).
    Killed: every mutant of the loop over keys[1:] (13 of _first_frame's: the slice, the
    probe's arguments and aad, the frame number, `last` passed as None)."""
    real = new_key()
    table = os.urandom(3 * CHUNK_RECORD.size)
    sealed = seal(real, zstandard.ZstdCompressor().compress(table), frame_aad(0))
    others = [new_key() for _ in range(3)]
    for keys in ([real], [others[0], real], [others[0], real, others[1]], [*others, real]):
        assert _first_frame(keys, sealed, False, "generation") == (real, table)
    with pytest.raises(IntegrityError):
        _first_frame(others, sealed, False, "generation")
    # A body of one frame: that frame is the meta (JSON), not held to whole records.
    meta = b'{"chunk_count": 0}'
    sealed = seal(real, zstandard.ZstdCompressor().compress(meta), frame_aad(0))
    for keys in ([real], [others[0], real, others[1]]):
        assert _first_frame(keys, sealed, True, "generation") == (real, meta)


def test_a_pack_whose_first_entry_holds_a_wrong_key_is_read_with_the_right_one(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Every pack gets a second key map entry whose read wrap holds a random key (what a
    key holder may sign for a pack it did not write, docs/FORMAT.md 4.5), placed before
    the real entry. The entries disagree, so the pack's trailer decides which key is the
    pack's: the generation restores byte for byte.

    Property: a forged pack entry costs no authentic data (pack_key_of). Killed:
    `len(keys) > 1` -> `> 2` (two disagreeing keys were not checked against the trailer
    and the forged one, first, was used); it survived test_adversary's writer-entry test."""

    async def go() -> None:
        data = os.urandom(150_000)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
            store = repo._store
            km = store.keymaps
            await km.write([km.pack_entry(pid, new_key()) for pid in sorted(km.ids(PACK))])
            for pid in km.ids(PACK):
                found = km._by_kind[PACK][pid]
                assert len(found) == 2
                found.insert(0, found.pop())  # the entry that opens nothing first
            store._pack_keys.clear()
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


# --- a keyring changed under an open handle -----------------------------------------------


def test_an_open_handle_adopts_a_rotation_and_notices_a_rollback(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Another client rotates the keys while this handle is open: this handle's next
    backup adopts the new keyring (it writes under the new epoch, and both generations
    restore). Then the older keyring copies are put back: this handle's next listing
    raises RollbackDetected (the keyring is read again at every operation).

    Property: a keyring change seen by a live handle is checked against the rollback
    record and adopted (_reread_keyring). Killed: the serial comparison inverted (the
    rotation was not adopted, the rollback not noticed), check_and_record_serial called
    with None or without an argument, and the key directory reset with None or without
    its keyring (each a crash at the first operation after the rotation)."""

    async def go() -> None:
        a, b = os.urandom(60_000), os.urandom(60_000)
        async with await make_repo(repo_path) as repo:
            ga = await repo.backup(io.BytesIO(a), name="db")
            older = {n: (repo_path / "keyring" / n).read_bytes() for n in ("1", "2")}
            async with await Repository.open(repo_path, PASSPHRASE) as other:
                await other.keys.rotate()
                rotated = other._store.keyring.serial
            gb = await repo.backup(io.BytesIO(b), name="db", kind="full")
            store = repo._store
            assert store.keyring.serial == rotated
            assert store.current_epoch.number == 2
            for gen, data in ((ga, a), (gb, b)):
                out = io.BytesIO()
                await repo.restore(gen.id, out)
                assert out.getvalue() == data
            for n, raw in older.items():
                (repo_path / "keyring" / n).write_bytes(raw)
            with pytest.raises(RollbackDetected):
                await repo.generations()

    run_asyncio(go())


def test_a_generation_whose_header_is_longer_than_the_probe_read_lists_and_restores(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A generation with ~100 KB of tags: its sealed header is longer than the first read
    of a manifest (HEADER_PROBE, 64 KiB), so the prefix is read again up to the header's
    end. Another handle lists it with every tag and restores it.

    Property: an authentic generation with a large header stays readable (no data loss),
    and its prefix is still checked against its id. Killed: _prefix's second read made
    wrong (head None; the name or the offset dropped or None; offset 1 instead of 0)."""

    async def go() -> None:
        data = os.urandom(30_000)
        tags = [os.urandom(32).hex() for _ in range(1500)]
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(data), name="db", tags=tags)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            (listed,) = await repo.generations()
            assert listed.id == gen.id and sorted(listed.tags) == sorted(tags)
            header = await repo._store.read_manifest_header(gen.id)
            assert header["id"] == gen.id
            out = io.BytesIO()
            await repo.restore(gen.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


def test_a_cached_header_that_no_longer_opens_is_reported_and_the_rest_listed(
    run_asyncio: Run, repo_path: Path, tmp_path: Path
) -> None:
    """Two generations listed once through the cache (both headers cached), then the key
    map of the second is deleted from the store (hidden by someone with write access).
    With the warm cache the second one's cached header no longer authenticates: it is
    reported and left out, and the first is still listed and restores.

    Property: one generation that does not authenticate never hides the others, whether
    its header comes from the store or the cache. Killed: generation_headers recording
    None instead of the error for a cached header that fails to open (the listing
    crashed); it survived tests/store/test_cache.py."""
    cache = tmp_path / "cache"

    async def go() -> None:
        data = os.urandom(40_000)
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(io.BytesIO(data), name="a")
            before = set((repo_path / "keymaps").rglob("*"))
            second = await repo.backup(io.BytesIO(os.urandom(40_000)), name="b")
            (added,) = [p for p in set((repo_path / "keymaps").rglob("*")) - before if p.is_file()]
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            assert {g.id for g in await repo.generations()} == {first.id, second.id}
        added.unlink()
        async with await Repository.open(repo_path, PASSPHRASE, cache=cache) as repo:
            assert [g.id for g in await repo.generations()] == [first.id]
            assert any(second.id in p for p in repo.problems)
            out = io.BytesIO()
            await repo.restore(first.id, out)
            assert out.getvalue() == data

    run_asyncio(go())


def test_a_tree_generation_whose_meta_is_larger_than_a_table_frame_restores(
    run_asyncio: Run, repo_path: Path, tmp_path: Path
) -> None:
    """A directory of 8,000 small files: its generation's meta frame (the file entries)
    is larger than the cap of a table frame (FRAME_RECORDS records, ~576 KiB), and well
    under the meta frame's own cap. A new handle reads the manifest and restores every
    file.

    Property: each frame is capped by its own kind's limit (bounds that refuse bombs, not
    authentic generations). Killed: _open_frame capping the last (meta) frame at
    MAX_TABLE_FRAME (`MAX_META_FRAME if last and False ...`: the tree was unreadable)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8000):
        (src / f"file-{i:05d}-{'x' * 40}").write_bytes(b"%d" % i)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(src, name="tree", kind="full")
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            _header, meta, _table = await repo._store.read_manifest(gen.id)
            assert len(json.dumps(meta)) > MAX_TABLE_FRAME
            out = tmp_path / "out"
            await repo.restore(gen.id, out)
        assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
        assert (out / f"file-07999-{'x' * 40}").read_bytes() == b"7999"

    run_asyncio(go())
