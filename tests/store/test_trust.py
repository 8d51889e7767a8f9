"""The chain of trust (docs/FORMAT.md section 4) piece by piece: keyring copies, rollback,
key map acceptance rules, caps on what an authenticated object may decompress to or
expand into, damaged quarantine records, and the durability of new directories.

The attacker here is often a legitimate key holder (the store's own keys), to reach the
checks behind authentication: a decompression bomb or a delta blow-up must be refused even
when a real key vouches for it."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import PASSPHRASE, make_repo

import dedupe.backends.local as local
from dedupe import Repository
from dedupe.backends import LocalBackend
from dedupe.crypto import KdfParams, new_key, seal, sign
from dedupe.crypto.epochs import box_public_of, box_seal, new_box_secret
from dedupe.crypto.signing import KEYMAP_DOMAIN
from dedupe.errors import IntegrityError, RollbackDetected
from dedupe.format.index import INDEX_AAD, INDEX_MAGIC, PackRecord, encode_index
from dedupe.format.keymap import (
    INDEX,
    PACK,
    QUARANTINE,
    encode_unsigned,
    keymap_name,
)
from dedupe.format.manifest import CHUNK_RECORD, FRAME_RECORDS
from dedupe.hashing import object_id
from dedupe.store.keyring import (
    bump,
    check_and_record_serial,
    seen_serial,
    state_dir,
    write_keyring,
)
from dedupe.store.repository import decompress_capped

Run = Callable[..., Any]
# What a header needs besides what each test sets (docs/FORMAT.md section 8).
STATS = {"new_chunks": 0, "new_bytes": 0, "stored_bytes": 0, "seconds": 0.0, "source": {}}


async def _two_generations(repo: Repository) -> dict[str, bytes]:
    a = os.urandom(150_000)
    b = a[:70_000] + os.urandom(3000) + a[70_000:]
    ga = await repo.backup(io.BytesIO(a), name="db", kind="full")
    gb = await repo.backup(io.BytesIO(b), name="db")
    return {ga.id: a, gb.id: b}


async def _restores(repo: Repository, data: dict[str, bytes]) -> None:
    for gen_id, expected in data.items():
        out = io.BytesIO()
        await repo.restore(gen_id, out)
        assert out.getvalue() == expected


# --- keyring copies and rollback -----------------------------------------------------------


def test_a_damaged_keyring_copy_is_reported_not_fatal(run: Run, repo_path: Path) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
        copy2 = repo_path / "keyring" / "2"
        raw = bytearray(copy2.read_bytes())
        raw[raw.index(b'"serial"') + 10] ^= 1  # a flipped digit: the signature fails
        copy2.write_bytes(bytes(raw))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert any("keyring/2" in p and "signature" in p for p in repo.problems)
            await _restores(repo, data)
            report = await repo.verify()
            assert [(d.kind, d.name) for d in report.damaged] == [("keyring", "keyring/2")]
            # Prune copies the good one over it (the signed bytes, as they are).
            await repo.prune()
            assert (await repo.verify()).ok
        # Both copies damaged: nothing can be trusted, and the error says what to do.
        for name in ("1", "2"):
            (repo_path / "keyring" / name).write_bytes(b"{}")
        with pytest.raises(IntegrityError, match="keyring") as err:
            await Repository.open(repo_path, PASSPHRASE)
        assert err.value.hint and "keyring/1" in err.value.hint

    run(go())


def test_a_keyring_copy_left_behind_is_a_note_and_prune_heals_it(
    run_asyncio: Run, repo_path: Path
) -> None:
    """An interrupted key change (the first copy written, not the second) is in effect;
    verify notes the stale copy without calling it damage, and prune rewrites it."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            old = (repo_path / "keyring" / "2").read_bytes()
            await repo.keys.rotate()
            (repo_path / "keyring" / "2").write_bytes(old)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert (
                repo._store.keyring.serial
                == json.loads((repo_path / "keyring" / "1").read_bytes())["serial"]
            )
            report = await repo.verify()
            assert report.ok and len(report.notes) == 1 and "keyring/2" in report.notes[0]
            await repo.prune()
            assert (repo_path / "keyring" / "2").read_bytes() == (
                repo_path / "keyring" / "1"
            ).read_bytes()
            assert (await repo.verify()).notes == []

    run_asyncio(go())


def test_an_older_keyring_put_back_is_a_rollback(
    run_asyncio: Run, repo_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            saved = {n: (repo_path / "keyring" / n).read_bytes() for n in ("1", "2")}
            await repo.keys.rotate()
        for n, raw in saved.items():  # validly signed, one epoch older
            (repo_path / "keyring" / n).write_bytes(raw)
        with pytest.raises(RollbackDetected, match="serial"):
            await Repository.open(repo_path, PASSPHRASE)
        # A client that never saw the newer keyring cannot tell (FORMAT.md 4.3, 11).
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path / "another-client"))
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert repo._store.keyring.serial == json.loads(saved["1"])["serial"]

    run_asyncio(go())


def test_the_rollback_record_is_kept_where_the_spec_says(
    run_asyncio: Run,
    repo_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/FORMAT.md 4.3: the highest keyring serial a client has seen is kept in
    $DEDUPE_STATE_DIR, else $XDG_STATE_HOME/dedupe, else ~/.local/state/dedupe, as
    `<repository id>.json`: another release (or the same one, run by the same user) must
    find it there, or a keyring put back after an upgrade goes unnoticed."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    explicit = tmp_path / "state" / "dedupe"  # its parent does not exist yet either
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DEDUPE_STATE_DIR")
    for xdg_value, expected in (("", home / ".local/state/dedupe"), (str(xdg), xdg / "dedupe")):
        monkeypatch.setenv("XDG_STATE_HOME", xdg_value)
        assert state_dir() == expected
    monkeypatch.setenv("DEDUPE_STATE_DIR", str(explicit))
    assert state_dir() == explicit

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            ring = repo._store.keyring
            saved = {n: (repo_path / "keyring" / n).read_bytes() for n in ("1", "2")}
            await repo.keys.rotate()
            newest = repo._store.keyring.serial
        assert newest > ring.serial
        record = explicit / f"{ring.repository_id.hex()}.json"
        assert json.loads(record.read_text()) == {"keyring_serial": newest}
        assert [p.name for p in explicit.iterdir()] == [record.name]  # no temporary left
        assert seen_serial(ring.repository_id) == newest
        for n, raw in saved.items():
            (repo_path / "keyring" / n).write_bytes(raw)
        with pytest.raises(RollbackDetected, match=str(record)):
            check_and_record_serial(ring.repository_id, ring)
        check_and_record_serial(ring.repository_id, replace(ring, serial=newest + 5))
        assert seen_serial(ring.repository_id) == newest + 5
        # A client that cannot keep its record loses only this protection, and says so.
        blocked = tmp_path / "blocked"
        blocked.write_text("a file where the state directory's parent should be")
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(blocked / "dedupe"))
        with caplog.at_level(logging.WARNING, logger="dedupe"):
            check_and_record_serial(ring.repository_id, ring)
        assert "rollbacks go unnoticed" in caplog.text and str(blocked) in caplog.text

    run_asyncio(go())


def test_an_inconsistent_keyring_is_never_signed(run_asyncio: Run, repo_path: Path) -> None:
    """keyring_bytes: a keyring whose structure is wrong (no admin left, a current epoch
    that does not exist, a duplicate key) is refused before it is signed, so neither copy
    is replaced by one that would lock every key holder out."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            ring, admin_sign = store.keyring, store.holder.admin_sign
            assert admin_sign is not None
            copies = {n: (repo_path / "keyring" / n).read_bytes() for n in ("1", "2")}
            for bad in (
                replace(ring, keys=tuple(k for k in ring.keys if k.role != "admin")),
                replace(ring, current_epoch=ring.current_epoch + 1),
                replace(ring, keys=ring.keys + ring.keys[:1]),
            ):
                assert bad.problem() is not None
                with pytest.raises(ValueError, match="refusing to sign an inconsistent keyring"):
                    await write_keyring(
                        store.backend, bump(bad, "2026-12-06T00:00:00Z"), admin_sign
                    )
            assert {n: (repo_path / "keyring" / n).read_bytes() for n in copies} == copies
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert repo._store.keyring.serial == ring.serial
            assert repo.problems == []  # both copies alike: nothing behind, nothing to report

    run_asyncio(go())


# --- key maps ------------------------------------------------------------------------------


def test_key_map_acceptance_rules(run_asyncio: Run, repo_path: Path) -> None:
    """Each rule of docs/FORMAT.md 4.5, broken once: the key map is refused, by name and
    reason, and none of its entries is used."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await _two_generations(repo)
            reader = await repo.keys.add("r", role="reader", name="r", kdf=KdfParams.weakest())
            await repo.keys.rotate()
            store = repo._store
            keymaps = store.keymaps
            epoch = store.current_epoch.number
            holder = store.holder
            repo_id = store.repository_id
            # A harmless entry: an index object id nobody wrote.
            entry = keymaps.meta_entry(INDEX, os.urandom(32), new_key())

            def signed(unsigned: bytes, seed: bytes) -> bytes:
                return unsigned + sign(seed, KEYMAP_DOMAIN, repo_id + unsigned)

            good = signed(encode_unsigned(epoch, holder.key_id, [entry]), holder.sign_secret)
            assert keymaps.accept(keymap_name(epoch, object_id(good)), good)[1] == [entry]
            old = signed(encode_unsigned(epoch - 1, holder.key_id, [entry]), holder.sign_secret)
            stranger = signed(encode_unsigned(epoch, os.urandom(16), [entry]), holder.sign_secret)
            forged = signed(encode_unsigned(epoch, holder.key_id, [entry]), os.urandom(32))
            cases = [
                ("does not hash to its name", keymap_name(epoch, "00" * 32), good),
                ("filed under epoch", keymap_name(epoch + 1, object_id(good)), good),
                ("was retired", keymap_name(epoch - 1, object_id(old)), old),
                ("not in the keyring", keymap_name(epoch, object_id(stranger)), stranger),
                ("fails the signature", keymap_name(epoch, object_id(forged)), forged),
            ]
            for why, name, data in cases:
                with pytest.raises(IntegrityError, match=why):
                    keymaps.accept(name, data)
            reader_id = bytes.fromhex(reader.id)
            # A reader-signed pack entry: refused for its role (its signature is real).
            async with await Repository.open(repo_path, "r") as as_reader:
                r_holder = as_reader._store.holder
                assert r_holder.key_id == reader_id
                pack_entry = keymaps.pack_entry(os.urandom(32), new_key())
                data = signed(encode_unsigned(epoch, reader_id, [pack_entry]), r_holder.sign_secret)
                with pytest.raises(IntegrityError, match="reader key, which may not vouch"):
                    keymaps.accept(keymap_name(epoch, object_id(data)), data)
                q = keymaps.meta_entry(QUARANTINE, os.urandom(32), new_key())
                data = signed(encode_unsigned(epoch, reader_id, [q]), r_holder.sign_secret)
                assert keymaps.accept(keymap_name(epoch, object_id(data)), data)[1] == [q]

    run_asyncio(go())


# --- caps on authenticated content ---------------------------------------------------------


def test_an_entry_that_does_not_open_costs_no_other_entry_of_its_object(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A key holder may sign an entry for an object it did not write, with wraps that open
    to nothing (docs/FORMAT.md 4.5): KeyDirectory.meta_keys tries the other entries, and
    consolidate (rotation, prune) drops only that entry, whatever its place among the
    object's entries (load order follows concurrent reads), and keeps the real ones."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
            store = repo._store
            km = store.keymaps
            stranger = box_public_of(new_box_secret())
            forged = []
            for kind in (PACK, INDEX):
                for oid in sorted(km.ids(kind)):
                    e = km.all(kind, oid)[0].entry
                    if kind == PACK:
                        forged.append(replace(e, read_wrap=box_seal(stranger, new_key())))
                    else:
                        wrap = seal(new_key(), new_key(), b"not the meta wrap's aad")
                        forged.append(replace(e, meta_wrap=wrap))
            await km.write(forged)
            for kind in (PACK, INDEX):
                for oid in km.ids(kind):
                    found = km._by_kind[kind][oid]
                    assert len(found) == 2
                    found.insert(0, found.pop())  # the entry that opens nothing first
            await repo.keys.rotate()  # consolidates every entry into the new epoch
            assert any("its key map entry is dropped" in p for p in repo.problems)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert not repo._store.damaged_index_objects
            await _restores(repo, data)

    run_asyncio(go())


def test_a_forged_meta_entry_does_not_hide_an_index_object(
    run_asyncio: Run, repo_path: Path
) -> None:
    """KeyDirectory.meta_keys: an index object with a real entry and one whose meta wrap
    opens to nothing is read with the real one, not refused."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
            km = repo._store.keymaps
            forged = [
                replace(km.all(INDEX, oid)[0].entry, meta_wrap=seal(new_key(), new_key(), b"x"))
                for oid in sorted(km.ids(INDEX))
            ]
            await km.write(forged)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert not repo._store.damaged_index_objects
            await _restores(repo, data)

    run_asyncio(go())


def test_decompression_is_capped_by_the_recorded_size() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(50 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(IntegrityError, match="would decompress to 52428800 bytes"):
        decompress_capped(bomb, 1 << 20, "x")
    unknown = zstandard.ZstdCompressor(write_content_size=False).compress(b"abc")
    with pytest.raises(IntegrityError, match="does not record its size"):
        decompress_capped(unknown, 1 << 20, "x")
    assert decompress_capped(zstandard.ZstdCompressor().compress(b"abc"), 3, "x") == b"abc"


def test_an_authenticated_index_bomb_is_refused(run_asyncio: Run, repo_path: Path) -> None:
    """An index object a real key vouches for whose plaintext would be 200x its size."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
            store = repo._store
            key = new_key()
            plain = encode_index([PackRecord(bytes(32), 1)], bytes(48 * 200_000))
            sealed = seal(key, zstandard.ZstdCompressor(level=19).compress(plain), INDEX_AAD)
            blob = INDEX_MAGIC + sealed
            oid = object_id(blob)
            await store.keymaps.write([store.keymaps.meta_entry(INDEX, bytes.fromhex(oid), key)])
            await store.backend.put(f"index/{oid}", blob)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            await _restores(repo, data)
            assert any(oid in p and "would decompress" in p for p in repo.problems)
            report = await repo.verify()
            assert [(d.name, d.reason) for d in report.damaged] == [(f"index/{oid}", "malformed")]

    run_asyncio(go())


def test_a_table_frame_over_its_record_limit_is_refused(run_asyncio: Run, repo_path: Path) -> None:
    """Writers put at most FRAME_RECORDS records in a frame; a frame of a million records
    (a few KB compressed) is refused before it is decompressed."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            table = CHUNK_RECORD.pack(bytes(32), 1) * (FRAME_RECORDS * 64)
            header = {"name": "x", "kind": "full", "parent": None, "created": "t", **STATS}
            header |= {"size": len(table) // 36, "chunks": len(table) // 36}
            with store.manifest_writer() as writer:
                writer._seal_frame(table)  # one frame where a writer would make 64
                writer.records = len(table) // 36
                gen_id = await store.commit_manifest(
                    writer, header, {"type": "stream", "digest": "", "chunk_count": writer.records}
                )
            with pytest.raises(IntegrityError, match="frame 0 would decompress"):
                await store.read_manifest(gen_id)
            with pytest.raises(IntegrityError, match="frame 0 would decompress"):
                await repo.restore(gen_id, io.BytesIO())

    run_asyncio(go())


@pytest.mark.parametrize("path", ["restore", "verify"])
def test_delta_copies_cannot_blow_up_a_table(run_asyncio: Run, repo_path: Path, path: str) -> None:
    """An authenticated incremental whose ops copy its parent's table 10,000 times: the
    counts are checked against the header before a record is expanded, on the restore
    path (file to file) and on the verify/prune path (in memory)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(os.urandom(200_000)), name="db", kind="full")
            store = repo._store
            n_parent = full.chunks
            ops = [[0, 0, n_parent]] * 10_000
            header = {"name": "db", "kind": "incremental", "parent": full.id, "created": "t"}
            header |= STATS
            header |= {"size": 1, "chunks": n_parent}  # what the ops claim, 10,000x less
            meta = {"type": "stream", "digest": "", "chunk_count": 0}
            meta["delta"] = {"parent": full.id, "ops": ops}
            gen_id = await store.write_manifest(header, meta, b"")
            if path == "restore":
                with pytest.raises(IntegrityError, match="its header says"):
                    await repo.restore(gen_id, io.BytesIO())
            else:
                report = await repo.verify()
                (bad,) = report.damaged
                assert bad.name == f"generations/{gen_id}" and "header says" in bad.details[0]

    run_asyncio(go())


# --- quarantine records --------------------------------------------------------------------


def test_an_unreadable_quarantine_record_is_reported_and_only_prune_refuses(
    run_asyncio: Run, repo_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
            store = repo._store
            name = await store.write_quarantine([(os.urandom(32), os.urandom(32), "missing")])
            raw = bytearray((repo_path / name).read_bytes())
            raw[-1] ^= 1
            planted = f"quarantine/{object_id(bytes(raw))}"
            (repo_path / planted).write_bytes(bytes(raw))  # no key map vouches for it
            (repo_path / name).unlink()
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            again = await repo.backup(io.BytesIO(next(iter(data.values()))), name="db")
            assert again.chunks_new == 0  # the backup went on
            assert any(planted in p and "not authenticated" in p for p in repo.problems)
            report = await repo.verify()
            assert [(d.name, d.reason) for d in report.damaged] == [(planted, "not authenticated")]
            with pytest.raises(IntegrityError, match=planted):
                await repo.prune()
            (repo_path / planted).unlink()
            await repo.prune()
            await _restores(repo, data)

    run_asyncio(go())


# --- durability of new directories ---------------------------------------------------------


def test_a_new_directory_is_made_durable_in_its_parent(
    run_asyncio: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = local._fsync_dir

    def spy(path: str) -> None:
        synced.append(os.path.relpath(path, tmp_path / "r"))
        real(path)

    monkeypatch.setattr(local, "_fsync_dir", spy)

    async def go() -> None:
        backend = LocalBackend(tmp_path / "r")
        (tmp_path / "r").mkdir()
        await backend.put("packs/ab/abcd", b"x")
        # packs/ was created in the root, packs/ab/ in packs/: both parents were fsynced,
        # then the object's own directory after the rename.
        assert synced == [".", "packs", "packs/ab"]
        synced.clear()
        await backend.put("packs/ab/abce", b"y")
        assert synced == ["packs/ab"]

    run_asyncio(go())


def test_prune_clears_what_was_planted_instead_of_stopping(
    run_asyncio: Run, repo_path: Path
) -> None:
    """A manifest no key map vouches for: prune refuses to delete anything while it is
    there (on a keyring older than the repository's, real manifests look like that), and
    deletes it when told it was planted; names that are no object ids are ignored."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
            real = next(iter(data))
            planted = repo_path / "generations" / ("ab" * 32)
            planted.write_bytes((repo_path / "generations" / real).read_bytes()[:200])
            for odd in ("packs/zz/not-a-pack", "index/not-hex", "generations/not-hex"):
                (repo_path / odd).parent.mkdir(exist_ok=True)
                (repo_path / odd).write_bytes(b"x")
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert sorted(g.id for g in await repo.generations()) == sorted(data)
            files = sorted(p.name for p in repo_path.rglob("*") if p.is_file())
            with pytest.raises(IntegrityError, match=f"{planted.name}.*prune deletes nothing"):
                await repo.prune()
            assert sorted(p.name for p in repo_path.rglob("*") if p.is_file()) == files
            await repo.prune(delete_unauthenticated=True)
            assert not planted.exists()
            await _restores(repo, data)
            assert (await repo.verify(read_data=True)).ok

    run_asyncio(go())


def test_a_replaced_config_id_is_named_not_a_wrong_passphrase(
    run_asyncio: Run, repo_path: Path
) -> None:
    async def go() -> None:
        await (await make_repo(repo_path)).close()
        config = json.loads((repo_path / "config").read_bytes())
        config["id"] = os.urandom(32).hex()
        (repo_path / "config").write_text(json.dumps(config))
        with pytest.raises(IntegrityError, match="the config was replaced"):
            await Repository.open(repo_path, PASSPHRASE)

    run_asyncio(go())


def test_a_huge_planted_key_map_is_refused_unread(run_asyncio: Run, repo_path: Path) -> None:
    """A sparse 64 GiB file under keymaps/ (no disk, all zeros): read whole it would exhaust
    memory; its size alone refuses it."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = await _two_generations(repo)
        planted = repo_path / "keymaps" / "00000001" / ("cd" * 32)
        with open(planted, "wb") as f:
            f.truncate(64 << 30)
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            assert any("refused unread" in p and planted.name in p for p in repo.problems)
            await _restores(repo, data)

    run_asyncio(go())
