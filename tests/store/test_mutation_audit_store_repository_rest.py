"""Mutation audit of dedupe/store/repository.py, the rest (issue 12): heal_keyring, create,
spill_manifest, generation_chunks and the small helpers. Each test names the property
it pins and the mutant(s) it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import io
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.crypto import KdfParams
from dedupe.crypto.keyfile import key_file_info
from dedupe.errors import IntegrityError
from dedupe.format.manifest import CHUNK_RECORD, FRAME_RECORDS
from dedupe.store.keyring import keyring_bytes
from dedupe.store.repository import utc_now

Run = Callable[..., Any]
COPIES = ("1", "2")
R = CHUNK_RECORD.size
# A stream generation's header, as test_manifests writes them.
HEADER = {
    "name": "db",
    "kind": "full",
    "parent": None,
    "created": "x",
    "size": 0,
    "chunks": 0,
    **{"new_chunks": 0, "new_bytes": 0, "stored_bytes": 0, "seconds": 0.0, "source": {}},
}


class CountingPuts(LocalBackend):
    """Counts the objects written."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    async def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self.puts.append(name)
        await super().put(name, data)


def _copies(repo_path: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for n in COPIES:
        path = repo_path / "keyring" / n
        out[n] = path.read_bytes() if path.exists() else None
    return out


# --- heal_keyring ---------------------------------------------------------------------------


def test_heal_copies_the_verified_newest_keyring_over_every_other_copy(
    run_asyncio: Run, repo_path: Path
) -> None:
    """After a rotation one copy is put back to the older keyring (an interrupted key
    change), damaged, deleted, or replaced by a forged copy of a higher serial whose
    signature fails; in either slot. heal_keyring writes the verified newest copy's bytes
    over it, says so, leaves the good copy as it is, and writes nothing when both copies
    already agree.

    Property: heal only ever spreads the newest copy that passes its admin signature,
    and repairs whatever the other copy is (a stale or broken copy left is one failure
    away from a keyring nobody can read). Killed: heal_keyring_20 (`continue` -> `break`
    after a copy that fails: a damaged or forged first copy stopped the search and was
    never healed); and the return value (heal_keyring_31, _32, _40, _41: `healed`
    None, or True/False from the start or after a write; no caller reads it today)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            older = _copies(repo_path)["1"]
            await repo.keys.rotate()
        newest = _copies(repo_path)["1"]
        assert older is not None and newest is not None and older != newest
        record = json.loads(newest)
        record["serial"] += 10  # a higher serial under the old signature: forged
        forged = json.dumps(record).encode()
        for bad in (older, b"{ damaged", None, forged):
            for slot in COPIES:
                path = repo_path / "keyring" / slot
                if bad is None:
                    path.unlink()
                else:
                    path.write_bytes(bad)
                backend = CountingPuts(repo_path)
                async with await Repository.open(backend, PASSPHRASE) as repo:
                    store = repo._store
                    backend.puts.clear()
                    assert await store.heal_keyring() is True
                    assert backend.puts == [f"keyring/{slot}"]
                    assert _copies(repo_path) == {"1": newest, "2": newest}
                    backend.puts.clear()
                    assert await store.heal_keyring() is False
                    assert backend.puts == []

    run_asyncio(go())


def test_heal_never_writes_an_older_keyring_from_a_handle_that_holds_one(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A handle opened before another client rotated the keys still holds the older
    keyring. One copy is then put back to that older keyring (in either slot). This
    handle's heal_keyring leaves both copies as they are: the newest verified copy is
    not the keyring it holds, so the keyring changed under it.

    Property: heal never rolls the keyring back (a rollback would restore a removed
    key's grants and epochs), and does nothing on a keyring it does not hold. Killed:
    heal_keyring_26 and _30 (`best is None or ...` -> `and`; `return False` -> `True`: the
    guard against a keyring changed under the handle undone, harmless while the newest
    copy is what gets written) and, applied by hand (mutmut has no such operator), `>`
    -> `<` in the choice of the best copy (the oldest was chosen, matched the handle's
    older serial, and was written over the newer copy)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(20_000)), name="db")
        for slot in COPIES:
            async with await Repository.open(repo_path, PASSPHRASE) as stale:
                older = _copies(repo_path)["1"]
                held = stale._store.keyring.serial
                async with await Repository.open(repo_path, PASSPHRASE) as other:
                    await other.keys.rotate()
                newest = _copies(repo_path)["1"]
                assert older is not None and newest is not None and older != newest
                (repo_path / "keyring" / slot).write_bytes(older)
                before = _copies(repo_path)
                assert stale._store.keyring.serial == held
                assert await stale._store.heal_keyring() is False
                assert _copies(repo_path) == before
            # Heal as prune would, from a fresh handle: the newest goes everywhere.
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                assert await repo._store.heal_keyring() is True
            assert _copies(repo_path) == {"1": newest, "2": newest}

    run_asyncio(go())


def test_heal_spreads_the_keyring_in_effect_over_another_of_the_same_serial(
    run_asyncio: Run, repo_path: Path
) -> None:
    """Two admin-signed keyrings of one serial (what two admins racing past the lock
    would leave: here they differ in their time only), in either order: every reader
    takes the first copy among the newest (read_keyring), and heal writes that one over
    the other, never the other way round.

    Property: heal never changes which keyring is in effect. Killed: heal_keyring_23
    (`ring.serial > best[0]` -> `>=`: the last copy among equals won, and was written
    over the one in effect); also red: create_35, _42, _56, _70 (a first keyring with
    null timestamps, which do not survive a decode and re-encode)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            ring, sign = store.keyring, store.holder.admin_sign
            assert sign is not None
            other = keyring_bytes(replace(ring, updated="2001-01-01T00:00:00.000000Z"), sign)
        original = _copies(repo_path)["1"]
        assert original is not None and other != original
        for first, second in ((original, other), (other, original)):
            (repo_path / "keyring" / "1").write_bytes(first)
            (repo_path / "keyring" / "2").write_bytes(second)
            async with await Repository.open(repo_path, PASSPHRASE) as repo:
                assert keyring_bytes(repo._store.keyring, sign) == first
                assert await repo._store.heal_keyring() is True
            assert _copies(repo_path) == {"1": first, "2": first}

    run_asyncio(go())


# --- create ---------------------------------------------------------------------------------


def test_a_new_repository_keeps_the_kdf_cost_asked_for_and_uses_its_cache_at_once(
    run_asyncio: Run, repo_path: Path, tmp_path: Path
) -> None:
    """A repository created with a KDF cost other than the default and an object cache:
    its one key file records that cost (and the key's name, "default"), and the handle
    init returns already keeps what it writes in the cache.

    Property: the passphrase's protection is what the caller chose (a cost silently
    replaced by the default is a weaker, or just another, key file than asked for).
    Killed: create_118 and create_123 (kdf passed as None, or left out: the default
    cost); also create_117, _124, _125 (the key's name) and create_159, _165, _167,
    _169 (the init handle without its cache, or a crash making it: liveness only)."""
    asked = KdfParams(opslimit=KdfParams.weakest().opslimit + 1, memlimit=8 * 1024 * 1024)
    assert asked != KdfParams()
    cache = tmp_path / "cache"

    async def go() -> None:
        async with await make_repo(repo_path, kdf=asked, cache=cache) as repo:
            await repo.backup(io.BytesIO(os.urandom(20_000)), name="db")
        (key_file,) = (repo_path / "keys").iterdir()
        info = key_file_info(key_file.read_bytes())
        assert info.kdf == asked and info.name == "default"
        assert any(p.is_file() for p in cache.rglob("*"))

    run_asyncio(go())


# --- spill_manifest -------------------------------------------------------------------------


def _records(n: int) -> bytes:
    rng = random.Random(n)
    return b"".join(
        CHUNK_RECORD.pack(rng.randbytes(32), rng.randrange(1, 1 << 20)) for _ in range(n)
    )


@pytest.mark.parametrize("piece", [4093, 1 << 20])
def test_a_manifest_of_many_frames_spills_whatever_pieces_it_is_read_in(
    run_asyncio: Run, repo_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """A generation whose chunk table takes three frames (and the meta a fourth), read by
    spill_manifest in pieces of 4,093 bytes (frames end inside pieces and span hundreds
    of them) and of the default 1 MiB: the records written to the sink are the table
    read_manifest gives, in order, with their count and the meta.

    Property: an authentic generation, however large and however it is read, restores
    (spill_manifest is what a restore and an incremental backup read). Killed:
    spill_manifest_68 (`frame_no += 1` -> `= 1`: the third frame was opened as the
    second, refused), _82 (`records +=` -> `=`: only the last table frame counted, the
    table refused as not matching its count), _33 and _34 (a frame not yet whole was
    opened, or ended the read returning nothing)."""
    monkeypatch.setattr("dedupe.store.repository.SPILL_PIECE", piece)
    n = 2 * FRAME_RECORDS + 7232
    table = _records(n)
    meta = {"type": "stream", "digest": "ab" * 32, "chunk_count": n}

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            gen_id = await store.write_manifest(HEADER, meta, table)
            header, got_meta, _ = await store.read_manifest(gen_id)
            sink = io.BytesIO()
            assert await store.spill_manifest(gen_id, sink) == (header, got_meta, n)
            assert got_meta == meta and sink.getvalue() == table

    run_asyncio(go())


# --- generation_chunks ----------------------------------------------------------------------


def test_generation_chunks_refuses_a_delta_that_copies_past_its_header_count(
    run_asyncio: Run, repo_path: Path
) -> None:
    """An authenticated incremental (what any writer can sign) whose ops copy its
    parent's whole table 10,000 times while its header claims the parent's count:
    generation_chunks, which replication, listing, diff and verify's fallback use,
    refuses it against the header's count before expanding it, and still expands the
    full it is based on.

    Property: a small authenticated manifest cannot make a reader build a table
    thousands of times its declared size (memory exhaustion; what test_trust pins on
    the restore and verify paths). Killed: generation_chunks_29, _34 and _35 (the
    header's count not passed to apply_delta, or passed in place of the name: the
    expansion unbounded)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(os.urandom(200_000)), name="db", kind="full")
            store = repo._store
            n_parent = full.chunks
            header = dict(HEADER, kind="incremental", parent=full.id, size=1, chunks=n_parent)
            ops = [[0, 0, n_parent]] * 10_000
            meta = {"type": "stream", "digest": "", "chunk_count": 0}
            meta["delta"] = {"parent": full.id, "ops": ops}
            gen_id = await store.write_manifest(header, meta, b"")
            with pytest.raises(IntegrityError, match="its header says"):
                await store.generation_chunks(gen_id)
            _meta, table = await store.generation_chunks(full.id)
            assert len(table) == n_parent * R

    run_asyncio(go())


# --- small helpers --------------------------------------------------------------------------


def test_timestamps_are_utc_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the process in a time zone far from UTC (UTC-10, no daylight saving),
    utc_now() still gives the UTC time, in the format every record uses (its `Z`
    promises UTC: forget's calendar rules and drill dates compare these).

    Property: the times recorded in manifests, keyrings and drill records are UTC.
    Killed: x_utc_now_2 (`datetime.now(UTC)` -> `datetime.now(None)`: local time
    labelled UTC)."""
    monkeypatch.setenv("TZ", "HST10")  # POSIX form: no tz database needed
    time.tzset()
    try:
        stamp = datetime.strptime(utc_now(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs(stamp - datetime.now(UTC)) < timedelta(minutes=5)
    finally:
        monkeypatch.undo()
        time.tzset()
