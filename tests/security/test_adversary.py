"""Adversary review (docs/FORMAT.md sections 4 and 11): attacks that test_forgery.py and
test_keys.py do not try.

Three attackers, as in the brief of the review:

- **write access to the repository, no key**: it replays validly signed objects (an older
  keyring), hides objects for a moment, plants files of odd types and names;
- **a writer key** (its own secrets: `writer._store.holder`, `writer._store.epochs`): it
  signs key maps of kinds 1-3, as its role allows, but about objects it did not write, and
  makes generations whose headers and trees it chooses;
- **a reader key**: it writes quarantine records, as its role allows.

Written by a helper acting as an adversary against format version 2. It found thirteen
attacks the product accepted; ten are fixed and their tests assert the secure outcome
(a writer's garbage copies no longer make prune delete good ones, nor its entries
replace another object's key, nor its future-dated generation become another key's
parent; an old keyring on a fresh client, or key maps hidden during a prune, no longer
make prune delete real data; names from the repository are escaped on the terminal;
FIFOs, symbolic links and false quarantine records are handled).

Tests still marked `xfail(strict=True)` are limitations docs/FORMAT.md section 11 states:
each asserts the secure outcome, which fails (`raises=AssertionError`: on that assertion,
not on a crash of the set-up). Should one be fixed, its test XPASSes, which strict mode
reports as a failure: remove the marker then.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import random
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import blake3
import pytest
import zstandard
from conftest import PASSPHRASE, make_repo, manifest_header
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt

import dedupe
from dedupe.chunking import Chunker
from dedupe.crypto import KdfParams, box_seal
from dedupe.engine.tree import scan_tree
from dedupe.errors import (
    BackendError,
    DedupeError,
    IntegrityError,
    RepositoryLocked,
    RollbackDetected,
)
from dedupe.format.keymap import GENERATION, INDEX, PACK, QUARANTINE, KeyMapEntry
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import encode_tree
from dedupe.store import keymaps as keymaps_module
from dedupe.store.keymaps import KeyDirectory
from dedupe.store.quarantine import encode_quarantine

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
KiB = 1024
FAR_FUTURE = "2099-01-01T00:00:00.000000Z"


def accepted(reason: str) -> pytest.MarkDecorator:
    """An attack the product accepts today (see the module docstring)."""
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


# --- tools ------------------------------------------------------------------------------------


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def aead(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(24)
    return nonce + crypto_aead_xchacha20poly1305_ietf_encrypt(plain, aad, nonce, key)


def plant(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def pack_bytes(key: bytes, blobs: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[Any, ...]]]:
    """A version 2 pack (FORMAT.md section 6) of (chunk id, content) blobs stored raw under
    `key`, and its entries (chunk id, offset, stored length, raw length)."""
    data = b"DDPACK02"
    entries = []
    for chunk_id, content in blobs:
        sealed = aead(key, b"\x00" + content, chunk_id)
        entries.append((chunk_id, len(data), len(sealed), len(content)))
        data += sealed
    trailer_plain = struct.pack("<I", len(entries)) + b"".join(
        struct.pack("<32sIII", *e) for e in entries
    )
    trailer = aead(key, trailer_plain, b"dedupe-pack-trailer v2")
    return data + trailer + struct.pack("<I8s", len(trailer), b"DDPKEND2"), entries


async def plant_indexed_pack(
    store: Any,
    repo_path: Path,
    blobs: list[tuple[bytes, bytes]],
    claimed_raw: dict[bytes, int] | None = None,
    pack_key_entry: bool = True,
    cut_to: int | None = None,
) -> bytes:
    """What a writer key can do: a pack of `blobs` (chunk id, content) under a fresh key,
    an index object listing them (with `claimed_raw` lengths, else the true ones), both
    authenticated by a key map of the writer's (the pack's entry left out without
    `pack_key_entry`; the pack cut to its first `cut_to` bytes, if given). Returns the
    pack id."""
    key, ikey = os.urandom(32), os.urandom(32)
    pdata, entries = pack_bytes(key, blobs)
    pid = bytes.fromhex(b3(pdata))
    claimed = claimed_raw or {}
    idata = index_bytes(
        ikey,
        [(pid, len(pdata))],
        [(cid, 0, off, stored, claimed.get(cid, n)) for cid, off, stored, n in entries],
    )
    iid = bytes.fromhex(b3(idata))
    km = store.keymaps
    entries_signed = [km.meta_entry(INDEX, iid, ikey)]
    if pack_key_entry:
        entries_signed.append(km.pack_entry(pid, key))
    await km.write(entries_signed)
    plant(repo_path, pack_path(pid), pdata if cut_to is None else pdata[:cut_to])
    plant(repo_path, f"index/{iid.hex()}", idata)
    return pid


@dataclass
class Victim:
    """A full generation of random content, and what a writer key sees of it."""

    gen_id: str
    content: bytes
    real_packs: set[str]
    writer_store: Any
    chunks: dict[bytes, int]  # chunk id -> raw length, from the index objects


@contextlib.asynccontextmanager
async def a_backup_and_a_writer(
    repo: dedupe.Repository, repo_path: Path, size: int, seed: int
) -> AsyncIterator[Victim]:
    content = random_bytes(size, seed)
    gen = await repo.backup(io.BytesIO(content), name="a", kind="full")
    real_packs = {p.name for p in files_under(repo_path, "packs")}
    async with await with_key(repo, repo_path, "writer", "w") as writer:
        store = writer._store
        chunks = {cid: raw for cid, _p, raw in await index_chunks(store, repo_path)}
        yield Victim(gen.id, content, real_packs, store, chunks)


def index_bytes(
    key: bytes, packs: list[tuple[bytes, int]], entries: list[tuple[bytes, int, int, int, int]]
) -> bytes:
    """A version 2 index object (FORMAT.md section 7) under `key`."""
    plain = struct.pack("<Q", len(packs)) + b"".join(struct.pack("<32sQ", *p) for p in packs)
    plain += struct.pack("<Q", len(entries)) + b"".join(
        struct.pack("<32sIIII", *e) for e in entries
    )
    return b"DDPIDX02" + aead(key, zstandard.ZstdCompressor().compress(plain), b"dedupe-index v2")


def pack_path(pack_id: bytes) -> str:
    return f"packs/{pack_id.hex()[:2]}/{pack_id.hex()}"


def files_under(root: Path, top: str) -> list[Path]:
    return sorted(p for p in (root / top).rglob("*") if p.is_file())


async def with_key(repo: dedupe.Repository, root: Path, role: str, name: str) -> dedupe.Repository:
    """A new key holder of `role`, opened with its own passphrase."""
    await repo.keys.add(f"{name} pw", role=role, name=name, kdf=KdfParams.weakest())
    return await dedupe.Repository.open(root, f"{name} pw")


async def restores(repo: dedupe.Repository, gen_id: str, data: bytes) -> bool:
    """Whether generation `gen_id` restores to exactly `data`."""
    buf = io.BytesIO()
    try:
        await repo.restore(gen_id, buf)
    except DedupeError:
        return False
    return buf.getvalue() == data


async def index_chunks(store: Any, root: Path) -> list[tuple[bytes, bytes, int]]:
    """(chunk id, pack id, raw length) of every entry of every index object: what a writer
    (or reader) opens with the meta secret (FORMAT.md 4.4)."""
    out = []
    for path in files_under(root, "index"):
        name = f"index/{path.name}"
        packs, records = await store.open_index_object(name, path.read_bytes())
        for cid, pack_no, _off, _stored, raw in struct.iter_unpack("<32sIIII", records):
            out.append((cid, packs[pack_no].pack_id, raw))
    return out


def header(name: str, **fields: Any) -> dict[str, Any]:
    """A manifest header as a malicious writer fills it in (the store adds version, body)."""
    return manifest_header(name, **{"created": FAR_FUTURE, **fields})


# =============================================================================================
# ACCEPTED: a writer key
# =============================================================================================


def test_a_writer_entry_with_a_self_wrap_takes_over_another_keys_generation(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """The writer opens the admin's header key (meta_wrap, as its role allows), and signs a
    generation entry for the admin's generation: the real header key, but a body key of its
    own (read_wrap and self_wrap). Every reader now opens the body with the wrong key; the
    admin's natural response (remove the writer, rotate) makes the loss permanent."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = random_bytes(60 * KiB, 1)
            g = await repo.backup(io.BytesIO(data), name="a", kind="full")
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                km = store.keymaps
                oid = bytes.fromhex(g.id)
                (header_key,) = km.meta_keys(km.all(GENERATION, oid), "the admin's header")
                mine = os.urandom(32)
                c = km.current
                await km.write(
                    [
                        KeyMapEntry(
                            GENERATION,
                            oid,
                            c.number,
                            read_wrap=c.wrap_read(mine),
                            meta_wrap=c.wrap_meta(header_key, GENERATION, oid),
                            self_key=store.holder.key_id,
                            self_wrap=box_seal(store.holder.box_public, mine),
                        )
                    ]
                )
        outcome = {}
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            outcome["listed"] = g.id in [x.id for x in await repo.generations()]
            outcome["restores"] = await restores(repo, g.id, data)
            await repo.keys.remove("w")
            await repo.keys.rotate()
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            outcome["restores after remove + rotate"] = await restores(repo, g.id, data)
        assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


@pytest.mark.parametrize("kind", ["pack", "index object"])
def test_a_writer_entry_for_another_keys_object_replaces_its_key(
    run_asyncio: Run[None], repo_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = random_bytes(100 * KiB, 2)
            g = await repo.backup(io.BytesIO(data), name="a", kind="full")
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                km = writer._store.keymaps
                if kind == "pack":
                    poison = [km.pack_entry(pid, os.urandom(32)) for pid in km.ids(PACK)]
                else:
                    poison = [km.meta_entry(INDEX, oid, os.urandom(32)) for oid in km.ids(INDEX)]
                (poison_name,) = await km.write(poison)

        # The order in which key maps load is the backend's listing order and thread
        # timing; fix it so that the writer's key map loads first.
        original = KeyDirectory.names

        async def writer_first(self: KeyDirectory, every_epoch: bool = False) -> list[str]:
            return sorted(await original(self, every_epoch), key=lambda n: n != poison_name)

        outcome = {}
        with monkeypatch.context() as m:
            m.setattr(KeyDirectory, "names", writer_first)
            m.setattr(keymaps_module, "LOAD_CONCURRENCY", 1)
            async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
                outcome["restores"] = await restores(repo, g.id, data)
                await repo.keys.remove("w")
                await repo.keys.rotate()
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            outcome["restores after remove + rotate"] = await restores(repo, g.id, data)
        assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


def test_a_writers_index_entries_make_prune_delete_everyone_elses_packs(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """The writer reads every chunk id and raw length from the index objects (meta), and
    stores a pack of its own, under its own key map, holding for each a blob of garbage
    sealed with the chunk id as associated data (larger than the real one, so its pack has
    the larger live fraction), with an index object listing them. Structure verify is
    clean; the admin's next prune deletes the real packs."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            data = {}
            for i, name in enumerate(["a", "b"]):
                content = random_bytes(120 * KiB, 10 + i)
                data[(await repo.backup(io.BytesIO(content), name=name, kind="full")).id] = content
            real_packs = {p.name for p in files_under(repo_path, "packs")}
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                chunks = {cid: raw for cid, _p, raw in await index_chunks(store, repo_path)}
                garbage = [(cid, os.urandom(2 * raw)) for cid, raw in chunks.items()]
                await plant_indexed_pack(store, repo_path, garbage, claimed_raw=chunks)

            await repo.prune()
            outcome = {
                "real packs kept": real_packs <= {p.name for p in files_under(repo_path, "packs")}
            }
            for gen_id, content in data.items():
                outcome[f"{gen_id[:12]} restores"] = await restores(repo, gen_id, content)
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


@pytest.mark.parametrize("flaw", ["no key map entry", "cut short"])
def test_a_preferred_copy_that_cannot_be_checked_is_dropped_not_fatal(
    run_asyncio: Run[None], repo_path: Path, flaw: str
) -> None:
    """The writer's fuller pack is indexed, but no key map gives its key, or the pack is
    cut short: prune cannot check the copies it would prefer, drops them as bad, keeps
    the real ones, and finishes."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            async with a_backup_and_a_writer(repo, repo_path, 120 * KiB, 22) as v:
                garbage = [(cid, os.urandom(2 * raw)) for cid, raw in v.chunks.items()]
                await plant_indexed_pack(
                    v.writer_store,
                    repo_path,
                    garbage,
                    claimed_raw=v.chunks,
                    pack_key_entry=flaw != "no key map entry",
                    cut_to=100 if flaw == "cut short" else None,
                )
            await repo.prune()
            assert v.real_packs <= {p.name for p in files_under(repo_path, "packs")}
            assert await restores(repo, v.gen_id, v.content)

    run_asyncio(go())


@pytest.mark.parametrize("flaw", ["no key map entry", "cut short"])
def test_one_pack_that_cannot_be_checked_does_not_spare_the_others_their_check(
    run_asyncio: Run[None], tmp_path: Path, flaw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two forged packs, each preferred for half of the chunks: one cannot be checked (no
    key map entry, or cut short), the other holds garbage. Both must be checked and dropped in
    the same round, whichever comes first; a check that gave up on the rest after the
    first unusable pack would keep the other's garbage unchecked (restore then fails).
    Which pack comes first depends on set order, so eight fresh repositories are tried:
    the code under test passes every one. The unusable pack has dead blobs between its
    copies and ranges are not read through gaps here, so each copy is a range of its own:
    a failed read must not spare the pack's later ranges either."""
    import dedupe.engine.prune as prune_module

    monkeypatch.setattr(prune_module, "COALESCE_GAP", 0)

    async def attempt(repo_path: Path, seed: int) -> bool:
        async with await make_repo(repo_path) as repo:
            async with a_backup_and_a_writer(repo, repo_path, 160 * KiB, 30 + seed) as v:
                chunks = sorted(v.chunks.items())
                for half, unusable in ((chunks[0::2], True), (chunks[1::2], False)):
                    garbage = [(cid, os.urandom(2 * raw)) for cid, raw in half]
                    if unusable:  # a dead blob after each copy
                        garbage = [b for g in garbage for b in (g, (os.urandom(32), b"dead"))]
                    await plant_indexed_pack(
                        v.writer_store,
                        repo_path,
                        garbage,
                        claimed_raw=dict(half),
                        pack_key_entry=not (unusable and flaw == "no key map entry"),
                        cut_to=100 if unusable and flaw == "cut short" else None,
                    )
            await repo.prune()
            return await restores(repo, v.gen_id, v.content)

    async def go() -> None:
        results = [await attempt(tmp_path / f"repo-{seed}", seed) for seed in range(8)]
        assert all(results), results

    run_asyncio(go())


def test_a_forged_copy_prune_did_not_choose_never_replaces_the_good_one(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """As above, but the writer's pack is mostly dead bytes, so the real copies have the
    larger live fraction and are chosen first. Prune checks them, finds them good, keeps
    them and deletes the writer's pack. (A check that wrongly failed a good copy would drop
    it, fall back to the forged copy, which, left alone, is not checked again, and delete
    the real packs: pinned here.)"""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            async with a_backup_and_a_writer(repo, repo_path, 120 * KiB, 21) as v:
                dead = (os.urandom(32), os.urandom(8 * sum(v.chunks.values())))
                garbage = [(cid, os.urandom(raw)) for cid, raw in v.chunks.items()] + [dead]
                pid = await plant_indexed_pack(v.writer_store, repo_path, garbage)
            await repo.prune()
            left = {p.name for p in files_under(repo_path, "packs")}
            assert v.real_packs <= left and pid.hex() not in left
            assert await restores(repo, v.gen_id, v.content)

    run_asyncio(go())


@accepted(
    "FORMAT.md 11, writer row: a backup dedupes against any indexed copy, so a writer that "
    "knows (or guesses) content another key will back up can index garbage under its chunk "
    "ids; the later backup stores nothing and does not restore until verify --read-data "
    "quarantines the copy and a full stores the chunk again"
)
def test_a_writer_poisons_deduplication_of_a_later_backup_by_another_key(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            future = random_bytes(150 * KiB, 3)  # e.g. a file the attacker mailed the victim
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                chunker = Chunker(store.chunker_params, store.gear)
                pieces = chunker.feed(future) + chunker.finish()
                chunks = [(store.hasher.chunk_id(p), len(p)) for p in pieces]
                key, ikey = os.urandom(32), os.urandom(32)
                pdata, entries = pack_bytes(key, [(cid, os.urandom(raw)) for cid, raw in chunks])
                pid = bytes.fromhex(b3(pdata))
                idata = index_bytes(ikey, [(pid, len(pdata))], [(e[0], 0, *e[1:]) for e in entries])
                iid = bytes.fromhex(b3(idata))
                km = store.keymaps
                await km.write([km.pack_entry(pid, key), km.meta_entry(INDEX, iid, ikey)])
                plant(repo_path, pack_path(pid), pdata)
                plant(repo_path, f"index/{iid.hex()}", idata)

            stats = await repo.backup(io.BytesIO(future), name="mail", kind="full")
            outcome = {
                "the backup stored its chunks": stats.chunks_new == stats.chunks,
                "it restores": await restores(repo, stats.id, future),
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


@pytest.mark.parametrize("victim", ["admin", "another writer"])
def test_a_writers_tree_generation_substitutes_file_contents_in_the_next_incremental(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, victim: str
) -> None:
    """The attacker writer can lstat the victim's source (another backup job on the same
    host). It stores content of its own of the same length, and a tree generation of the
    victim's name whose entries mirror lstat with its records and digest. The victim's next
    incremental of that directory reads nothing and restores the attacker's bytes."""

    async def go() -> None:
        src = tmp_path / "src"
        src.mkdir()
        real = random_bytes(20 * KiB, 4)
        (src / "authorized_keys").write_bytes(real)
        async with await make_repo(repo_path) as admin:
            victim_repo = admin
            if victim == "another writer":
                victim_repo = await with_key(admin, repo_path, "writer", "victim")
            await victim_repo.backup(src, name="home", kind="full")
            async with await with_key(admin, repo_path, "writer", "attacker") as attacker:
                store = attacker._store
                evil = (b"ssh-ed25519 AAAA attacker\n" * 1000)[: len(real)]
                scratch = await attacker.backup(io.BytesIO(evil), name="scratch", kind="full")
                _h, _meta, table = await store.read_manifest(scratch.id)
                entries, _skipped = scan_tree(str(src))
                digest = store.hasher.stream_digest()
                digest.update(evil)
                for e in entries:
                    if e["type"] == "file":
                        e["records"], e["digest"] = table, digest.hexdigest()
                meta, literal = encode_tree(entries, [], None)
                fields = {
                    "source": {"type": "tree", "label": str(src)},
                    "size": len(evil),
                    "chunks": len(table) // CHUNK_RECORD.size,
                }
                with store.manifest_writer() as mw:
                    mw.add(literal)
                    gen_id = mw.finish(header("home", **fields), meta)
                    entry = store.keymaps.generation_entry(
                        bytes.fromhex(gen_id), mw.header_key, mw.body_key
                    )
                    if victim == "another writer":
                        v = victim_repo._store.holder  # public facts: key id, box public key
                        entry = replace(
                            entry,
                            self_key=v.key_id,
                            self_wrap=box_seal(v.box_public, mw.body_key),
                        )
                    await store.keymaps.write([entry])
                    await store.backend.put_stream(f"generations/{gen_id}", mw.parts())

            stats = await victim_repo.backup(src, name="home", kind="incremental")
            out = tmp_path / "out"
            await admin.restore(stats.id, out)
            if victim_repo is not admin:
                await victim_repo.close()
            outcome = {
                "parent is not the attacker's": stats.parent != gen_id,
                "restores the real bytes": (out / "authorized_keys").read_bytes() == real,
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


@pytest.mark.parametrize(
    "name",
    ["[/bold]", "\x1b]0;owned\x07\x1b[2J", "keyless"],
    ids=["writer: rich markup", "writer: control characters", "keyless: a planted file name"],
)
def test_names_from_the_repository_reach_the_terminal_raw(
    run_asyncio: Run[None],
    repo_path: Path,
    cli: Callable[..., Any],
    cli_env: dict[str, str],
    name: str,
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(random_bytes(8 * KiB, 5)), name="a", kind="full")
            if name == "keyless":  # a planted file's name, no key at all
                plant(repo_path, "keymaps/00000001/\x1b]0;owned\x07\x1b[2J", b"x")
                return
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                meta = {"type": "stream", "digest": "0" * 64, "chunk_count": 0, "delta": None}
                await store.write_manifest(header(name), meta, b"")

    run_asyncio(go())
    r = cli("generations", env=cli_env)
    outcome = {
        "exit 0": r.returncode == 0,
        "no traceback": b"Traceback" not in r.stderr,
        "no ESC on stdout": b"\x1b" not in r.stdout,
        "no ESC on stderr": b"\x1b" not in r.stderr,
    }
    assert outcome == dict.fromkeys(outcome, True), (outcome, r.stdout[-300:], r.stderr[-300:])


# =============================================================================================
# ACCEPTED: write access to the repository, no key
# =============================================================================================


@pytest.mark.parametrize("change", ["key rotate", "key add"])
def test_an_older_keyring_on_a_fresh_client_lets_prune_destroy_the_repository(
    run_asyncio: Run[None],
    repo_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    """The attacker copied keyring/1 when it could read the repository (it is public), and
    puts it back in both copies. The admin then prunes from a new machine (a container, a
    restore host, a cron job with another $HOME): its client has no serial on record."""

    async def go() -> None:
        data: dict[str, bytes] = {}
        async with await make_repo(repo_path) as repo:
            a = random_bytes(60 * KiB, 6)
            data[(await repo.backup(io.BytesIO(a), name="a", kind="full")).id] = a
            old = {c: (repo_path / c).read_bytes() for c in ("keyring/1", "keyring/2")}
            if change == "key rotate":
                await repo.keys.rotate()
                b = random_bytes(60 * KiB, 7)
                data[(await repo.backup(io.BytesIO(b), name="b", kind="full")).id] = b
            else:
                async with await with_key(repo, repo_path, "writer", "w") as writer:
                    w = random_bytes(60 * KiB, 8)
                    data[(await writer.backup(io.BytesIO(w), name="w", kind="full")).id] = w
            new = {c: (repo_path / c).read_bytes() for c in old}
            key_files = sorted(p.name for p in (repo_path / "keys").iterdir())
        for copy, raw in old.items():
            (repo_path / copy).write_bytes(raw)

        home = os.environ["DEDUPE_STATE_DIR"]
        monkeypatch.setenv("DEDUPE_STATE_DIR", str(tmp_path / "new-machine"))
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            try:
                await repo.prune()
            except DedupeError:
                pass  # refusing is the secure outcome

        # The admin finds out, puts the newer keyring back, and opens from its own machine.
        monkeypatch.setenv("DEDUPE_STATE_DIR", home)
        for copy, raw in new.items():
            (repo_path / copy).write_bytes(raw)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            outcome = {
                "key files kept": sorted(p.name for p in (repo_path / "keys").iterdir())
                == key_files
            }
            for gen_id, content in data.items():
                outcome[f"{gen_id[:12]} restores"] = await restores(repo, gen_id, content)
        assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


def test_a_key_map_hidden_during_prune_makes_prune_delete_what_it_vouched_for(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    """The attacker renames the key maps away while the admin's prune runs and puts them
    back afterwards: nothing it did is a deletion, and nothing it touched is lost."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            content = random_bytes(100 * KiB, 16)
            g = await repo.backup(io.BytesIO(content), name="a", kind="full")
        (tmp_path / "aside").mkdir()
        hidden = {p: tmp_path / "aside" / p.name for p in files_under(repo_path, "keymaps")}
        for p, h in hidden.items():
            p.rename(h)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert not (await repo.verify()).ok  # verify sees the damage
            try:
                await repo.prune()
            except DedupeError:
                pass  # refusing is the secure outcome
        for p, h in hidden.items():
            h.rename(p)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            assert await restores(repo, g.id, content), "prune deleted the generation's data"

    run_asyncio(go())


def test_a_deleted_lock_makes_the_backup_refuse_to_commit(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """The keyless attacker deletes a running backup's lock file just before the admin's
    scheduled prune: prune takes the exclusive lock and deletes the backup's packs (not
    indexed yet). The backup, going on, confirms its lock before the commit (a
    compare-and-swap that finds it gone, dedupe.store.locks) and refuses: no generation
    that does not restore is ever reported."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            content = random_bytes(600 * KiB, 15)
            gate = asyncio.Event()

            async def source() -> Any:
                yield content[: 400 * KiB]
                await gate.wait()
                yield content[400 * KiB :]

            task = asyncio.create_task(repo.backup(source(), name="a", kind="full"))
            for _ in range(200):  # until the first packs are written
                await asyncio.sleep(0.05)
                if len(files_under(repo_path, "packs")) >= 3:
                    break
            assert len(files_under(repo_path, "packs")) >= 3
            for lock in files_under(repo_path, "locks"):
                lock.unlink()  # the attack: one small, unauthenticated file
            async with await dedupe.Repository.open(repo_path, PASSPHRASE) as admin:
                await admin.prune()
            gate.set()
            with pytest.raises(RepositoryLocked, match="removed or replaced by someone else"):
                await task
            assert files_under(repo_path, "generations") == []
            assert files_under(repo_path, "locks") == []  # not brought back either

    run_asyncio(go())


@pytest.mark.parametrize("who", ["keyless: a pack hidden during verify", "reader key"])
def test_a_false_quarantine_record_blocks_prune_while_verify_is_clean(
    run_asyncio: Run[None], repo_path: Path, who: str
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            content = random_bytes(120 * KiB, 9)
            g = await repo.backup(io.BytesIO(content), name="a", kind="full")
            if who.startswith("keyless"):
                hidden = []
                for p in files_under(repo_path, "packs"):
                    hidden.append((p, p.with_name(".hidden-" + p.name)))
                    p.rename(hidden[-1][1])
                assert not (await repo.verify()).ok  # the outage is noticed: fine
                for p, h in hidden:
                    h.rename(p)
            else:
                async with await with_key(repo, repo_path, "reader", "r") as reader:
                    pairs = await index_chunks(reader._store, repo_path)
                    await reader._store.write_quarantine(
                        [(cid, pid, "authentication failed") for cid, pid, _raw in pairs]
                    )
            assert await restores(repo, g.id, content)
            report = await repo.verify(read_data=True)
            try:
                await repo.prune()
                pruned = True
            except DedupeError:
                pruned = False
            assert pruned or not report.ok, (report.ok, pruned)

    run_asyncio(go())


@accepted(
    "FORMAT.md 11: a deleted (or moved) manifest is not reported by verify; its key map "
    "entry still names it, but a crashed backup leaves such an entry too"
)
@pytest.mark.parametrize("how", ["deleted", "moved into generations/x/"])
def test_a_generation_removed_by_the_attacker_is_reported_by_verify(
    run_asyncio: Run[None], repo_path: Path, how: str
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            g = await repo.backup(io.BytesIO(random_bytes(40 * KiB, 11)), name="a", kind="full")
            path = repo_path / "generations" / g.id
            if how == "deleted":
                path.unlink()
            else:
                (path.parent / "x").mkdir()
                path.rename(path.parent / "x" / g.id)
            report = await repo.verify(read_data=True)
            await repo.generations()
            outcome = {
                "verify is not ok": not report.ok,
                "a problem names it": any(g.id in p for p in repo.problems)
                or any(g.id in d.name for d in report.damaged),
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


def test_a_fifo_planted_under_keymaps_does_not_hang_open(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path):
            pass
        fifo = repo_path / "keymaps" / "00000001" / ("0" * 64)
        fifo.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(fifo)
        finished = True
        try:
            repo = await asyncio.wait_for(dedupe.Repository.open(repo_path, PASSPHRASE), 5)
            await repo.close()
        except DedupeError:
            pass  # refused: fine
        except TimeoutError:
            finished = False
            try:  # let the worker thread blocked in open(2) go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:
                assert e.errno == errno.ENXIO
        assert finished, "opening the repository hung on a planted FIFO"

    run_asyncio(go())


def test_symlinked_pack_directories_are_not_followed(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path
) -> None:
    async def go() -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        async with await make_repo(repo_path) as repo:
            (repo_path / "packs").mkdir(exist_ok=True)
            for i in range(256):
                os.symlink(outside, repo_path / "packs" / f"{i:02x}")
            with pytest.raises(BackendError, match="symbolic link: refusing to write"):
                await repo.backup(io.BytesIO(random_bytes(60 * KiB, 12)), name="a", kind="full")
            report = await repo.verify(read_data=True)
            outcome = {
                "nothing written outside the repository": not any(outside.iterdir()),
                "verify and prune agree": report.ok == await _prunes(repo),
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


async def _prunes(repo: dedupe.Repository) -> bool:
    try:
        await repo.prune(dry_run=True)
    except DedupeError:
        return False
    return True


# =============================================================================================
# REFUSED, not covered elsewhere
# =============================================================================================


def _tree_entry(path: str, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": path,
        "type": kind,
        "mode": 0o755,
        "uid": 0,
        "gid": 0,
        "mtime_ns": 0,
        "ctime_ns": 0,
        "size": 0,
        "ino": 0,
        "dev": 0,
        **extra,
    }


async def _writer_tree(
    store: Any, entries: list[dict[str, Any]], deleted: list[str], parent: str | None
) -> str:
    meta, literal = encode_tree(entries, deleted, parent)
    fields = {
        "source": {"type": "tree", "label": "/x"},
        "kind": "incremental" if parent else "full",
        "parent": parent,
    }
    return str(await store.write_manifest(header("t", **fields), meta, literal))


@pytest.mark.parametrize(
    "attempt", ["symlink as a parent", "directory turned symlink by a delta", "hardlink up"]
)
def test_a_writers_tree_cannot_make_restore_write_outside_its_target(
    run_asyncio: Run[None], repo_path: Path, tmp_path: Path, attempt: str
) -> None:
    """Writers may add tree generations with any entries (FORMAT.md 11); restore must still
    write nothing outside its target: no entry below a symlink, no link out of the tree."""

    async def go() -> None:
        outside = tmp_path / "outside"
        outside.mkdir()
        async with await make_repo(repo_path) as repo:
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                root = _tree_entry(".", "dir")
                if attempt == "symlink as a parent":
                    gen = await _writer_tree(
                        store,
                        [
                            root,
                            _tree_entry("s", "symlink", target=str(outside)),
                            _tree_entry("s/planted", "symlink", target="/etc/passwd"),
                            _tree_entry("s/pipe", "fifo"),
                        ],
                        [],
                        None,
                    )
                    why = "is not inside a directory"
                elif attempt == "directory turned symlink by a delta":
                    full = await _writer_tree(
                        store,
                        [root, _tree_entry("s", "dir"), _tree_entry("s/pipe", "fifo")],
                        [],
                        None,
                    )
                    gen = await _writer_tree(
                        store, [_tree_entry("s", "symlink", target=str(outside))], [], full
                    )
                    why = "is not inside a directory"
                else:
                    gen = await _writer_tree(
                        store,
                        [root, _tree_entry("h", "hardlink", target="../outside/x")],
                        [],
                        None,
                    )
                    why = "points to no earlier entry"
            with pytest.raises(IntegrityError, match=why):
                await repo.restore(gen, tmp_path / "target")
            assert list(outside.iterdir()) == []
            assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "repo"]

    run_asyncio(go())


def test_an_older_keyring_in_one_copy_and_damage_to_the_other_is_a_rollback(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """Beyond test_forgery's two old copies: one old copy, the other damaged, so that the
    old one is the only copy that verifies. This client saw the newer serial: refused."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            old = (repo_path / "keyring/1").read_bytes()
            await repo.keys.rotate()
        (repo_path / "keyring/1").write_bytes(old)
        damaged = json.loads((repo_path / "keyring/2").read_bytes())
        damaged["serial"] += 1000  # its signature no longer verifies
        (repo_path / "keyring/2").write_bytes(json.dumps(damaged).encode())
        with pytest.raises(RollbackDetected, match="an older copy was put back"):
            await dedupe.Repository.open(repo_path, PASSPHRASE)

    run_asyncio(go())


def test_a_reader_key_map_mixing_a_pack_entry_with_a_quarantine_entry_is_refused_whole(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """A reader may vouch for quarantine records only (FORMAT.md 4.4). A key map that holds
    one allowed entry and one forbidden one is refused whole: its quarantine record is not
    honoured either (the next backup of the same bytes stores nothing new)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            content = random_bytes(60 * KiB, 13)
            await repo.backup(io.BytesIO(content), name="a", kind="full")
            async with await with_key(repo, repo_path, "reader", "r") as reader:
                store = reader._store
                pairs = await index_chunks(store, repo_path)
                km = store.keymaps
                qkey = os.urandom(32)
                record = encode_quarantine(
                    qkey, FAR_FUTURE, [(c, p, "authentication failed") for c, p, _r in pairs]
                )
                qid = bytes.fromhex(b3(record))
                data = km.encode(
                    km.current.number,
                    [km.meta_entry(QUARANTINE, qid, qkey), km.pack_entry(os.urandom(32), qkey)],
                    store.holder,
                )
                name = f"keymaps/{km.current.number:08d}/{b3(data)}"
                plant(repo_path, name, data)
                plant(repo_path, f"quarantine/{qid.hex()}", record)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            stats = await repo.backup(io.BytesIO(content), name="a2", kind="full")
            assert stats.chunks_new == 0
            assert any(name in p and "may not vouch for a pack" in p for p in repo.problems)

    run_asyncio(go())
