"""Prune's native table of index entries (dedupe/store/_prunetable.pyx over
csrc/prunetable.c, used by dedupe/engine/prune.py) against the attackers of docs/FORMAT.md
section 11: someone with write access to the storage and no key, and a writer key holder
that writes authenticated index objects of any content (duplicate and crowded chunk ids,
ids sharing their leading bytes, pack numbers outside the object's pack table, lengths
and offsets that lie, packs listed by several objects with different records).

What prune must do (FORMAT.md 14.3): keep every chunk a generation references, in a pack
it keeps or writes; refuse with a DedupeError, changing nothing, when it cannot; take the
same decisions as the rules it had before the table (pure Python).

The findings of the review that wrote this file are fixed, and their tests assert the
fixed behaviour: an entry naming a pack outside its object's table and a quarantine
record naming a malformed chunk id are refused by name or skipped, not raised raw; a
writer's second entry for a chunk in the same pack is checked before it can replace the
real one; a pack's length is the storage's, not the first index object's.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo

import dedupe
from dedupe.errors import DedupeError, IntegrityError, MissingObject
from dedupe.format.index import ENTRY_RECORD
from dedupe.format.keymap import INDEX
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.hashing import object_id
from security.test_adversary import (
    Run,
    files_under,
    index_bytes,
    plant,
    plant_indexed_pack,
    random_bytes,
    restores,
    with_key,
)

KiB = 1024
Entry = tuple[bytes, int, int, int, int]  # chunk id, pack no, offset, stored, raw


# --- tools ------------------------------------------------------------------------------------


async def index_objects(store: Any, root: Path) -> list[tuple[str, list[Any], list[Entry]]]:
    """(name, pack table, entries) of every index object, as a writer opens them."""
    out = []
    for path in files_under(root, "index"):
        packs, recs = await store.open_index_object(f"index/{path.name}", path.read_bytes())
        out.append((path.name, packs, [tuple(e) for e in ENTRY_RECORD.iter_unpack(recs)]))
    return out


async def plant_index(
    store: Any,
    root: Path,
    packs: list[tuple[bytes, int]],
    entries: list[Entry],
    first: bool = True,
) -> str:
    """What a writer key can do: an authenticated index object of any content. With
    `first`, its name is ground until it sorts before every index object there (prune
    reads them in name order, so its entries are the earliest added)."""
    existing = [p.name for p in files_under(root, "index")]
    while True:
        ikey = os.urandom(32)
        data = index_bytes(ikey, packs, entries)
        iid = object_id(data)
        if not existing or not first or iid < min(existing):
            break
    await store.keymaps.write([store.keymaps.meta_entry(INDEX, bytes.fromhex(iid), ikey)])
    plant(root, f"index/{iid}", data)
    return iid


def snapshot(root: Path) -> dict[str, list[Path]]:
    return {top: files_under(root, top) for top in ("generations", "index", "packs")}


async def indexed_ids(store: Any, root: Path) -> set[bytes]:
    return {e[0] for _n, _p, ents in await index_objects(store, root) for e in ents}


async def one_backup(
    repo: dedupe.Repository, seed: int, size: int = 200 * KiB
) -> tuple[str, bytes]:
    content = random_bytes(size, seed)
    gen = await repo.backup(io.BytesIO(content), name="a", kind="full")
    return gen.id, content


# =============================================================================================
# Handled
# =============================================================================================


def test_crowded_duplicate_and_lying_listings_in_other_packs_are_checked_and_dropped(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """A writer indexes, in objects that sort before the real one: every real entry again
    (identical records, so the same copies are listed by several objects, with the real
    packs' lengths halved); a pack of its own holding garbage for every real chunk (fuller
    than the real packs, so it is preferred and must be checked); one real chunk id listed
    3000 times in that pack; and 3000 made-up ids sharing the leading 8 bytes of real ones.
    Prune checks and drops the garbage, keeps the real packs, and the generation restores
    and verifies. The report's numbers are those of the index before and after."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen_id, content = await one_backup(repo, 71)
            real_packs = {p.name for p in files_under(repo_path, "packs")}
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                store = writer._store
                objects = await index_objects(store, repo_path)
                live = {e[0]: e[4] for _n, _p, ents in objects for e in ents}
                for _n, packs, ents in objects:
                    await plant_index(
                        store, repo_path, [(p.pack_id, p.length) for p in packs], ents
                    )
                garbage = [(cid, os.urandom(2 * raw)) for cid, raw in live.items()]
                forged = await plant_indexed_pack(store, repo_path, garbage, claimed_raw=live)
                crowd_id = next(iter(live))
                rnd = random.Random(5)
                crowd = [(crowd_id, 0, rnd.randrange(1 << 20), 100, live[crowd_id])] * 3000
                lookalikes = [
                    (cid[:8] + os.urandom(24), 0, rnd.randrange(1 << 20), 50, 50)
                    for cid in rnd.choices(list(live), k=3000)
                ]
                await plant_index(store, repo_path, [(forged, 1 << 20)], crowd + lookalikes)
                ids_before = await indexed_ids(store, repo_path)

            report = await repo.prune()
            left = {p.name for p in files_under(repo_path, "packs")}
            assert real_packs <= left and forged.hex() not in left
            ids_after = await indexed_ids(repo._store, repo_path)
            assert ids_after == set(live)
            assert report.chunks_live == len(live)
            assert report.chunks_removed == len(ids_before) - len(ids_after)
            assert await restores(repo, gen_id, content)
            verified = await repo.verify(read_data=True)
            assert verified.ok, verified

    run_asyncio(go())


@pytest.mark.parametrize("data", [False, True])
def test_an_index_object_of_no_packs_and_no_entries(
    run_asyncio: Run[None], repo_path: Path, data: bool
) -> None:
    """A writer's authenticated index object with an empty pack table and no entries, in
    a repository with no data (the table has no packs at all) or with some: prune runs,
    replaces it, and what was backed up restores."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await one_backup(repo, 72) if data else None
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                name = await plant_index(writer._store, repo_path, [], [])
            report = await repo.prune()
            assert report.chunks_removed == 0
            if gen is not None:  # two index objects: both replaced by one
                assert not (repo_path / "index" / name).exists()
                assert len(files_under(repo_path, "index")) == 1
                assert await restores(repo, *gen)
                assert (await repo.verify(read_data=True)).ok

    run_asyncio(go())


@pytest.mark.parametrize("what", ["a pack", "the index object"])
def test_a_keyless_deletion_makes_prune_refuse_and_change_nothing(
    run_asyncio: Run[None], repo_path: Path, what: str
) -> None:
    """Write access and no key: the attacker deletes a pack holding live chunks (their
    entries are then no copies) or the only index object (the live chunks are in no
    index object at all). Prune refuses with MissingObject and deletes nothing."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await one_backup(repo, 73)
        victim = files_under(repo_path, "packs" if what == "a pack" else "index")[0]
        victim.unlink()
        before = snapshot(repo_path)
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            with pytest.raises(MissingObject, match="no copy in any existing pack"):
                await repo.prune()
        assert snapshot(repo_path) == before

    run_asyncio(go())


def _old_rules(
    entries: list[tuple[bytes, int, int, int, int, int]],
    packs: int,
    pack_ids: list[bytes],
    lengths: list[int],
    live: set[bytes],
    stale: set[int],
    unusable: set[tuple[bytes, int]],
) -> tuple[dict[bytes, tuple[Any, ...]], list[int], list[int], list[int]]:
    """The previous prune's rules (dedupe/engine/prune.py before the table) over
    (id, global pack, offset, stored, raw, seq) entries: (chosen copy per live id, live
    bytes per pack, used per pack, blobs per pack)."""
    copies: dict[bytes, list[tuple[Any, ...]]] = {}
    for e in entries:
        if (e[0], e[1]) not in unusable:
            copies.setdefault(e[0], []).append(e)
    live_in = [0] * packs
    for cid in live:
        seen: set[int] = set()
        for c in copies.get(cid, ()):
            if c[1] not in seen:
                seen.add(c[1])
                live_in[c[1]] += c[3]
    chosen = {
        cid: max(
            copies[cid],
            key=lambda c: (
                c[1] not in stale,
                live_in[c[1]] / max(1, lengths[c[1]]),
                pack_ids[c[1]],
            ),
        )
        for cid in live
        if cid in copies
    }
    used = [0] * packs
    for c in chosen.values():
        used[c[1]] += c[3]
    blobs = [len({e[0] for e in entries if e[1] == p}) for p in range(packs)]
    return chosen, live_in, used, blobs


def test_the_table_takes_the_old_decisions_on_extreme_entries() -> None:
    """Entries as a writer can make them, through the native table under the old rules:
    offsets, stored and raw lengths at the edges of u32 (sums past 2^32), pack lengths
    of 0, 1 and large (below 2^53), runs of hundreds of entries of one id over several
    packs, ids sharing 31 leading bytes, pack maps naming one global pack twice, tables
    of no entries. Live bytes, the choice, usage, moving and kept entries are the old
    rule's."""
    from dedupe.store._prunetable import NO_NUMBER, PruneTable

    rnd = random.Random(20261207)
    edges = [0, 1, 2, (1 << 31) - 1, 1 << 31, (1 << 32) - 2, (1 << 32) - 1]
    for _round in range(60):
        packs = rnd.randint(1, 5)
        pack_ids = sorted(os.urandom(32) for _ in range(packs))
        rnd.shuffle(pack_ids)
        prefix = os.urandom(rnd.choice([0, 4, 31]))
        pool = [prefix + os.urandom(32 - len(prefix)) for _ in range(rnd.randint(1, 12))]
        table = PruneTable(packs)
        entries: list[tuple[bytes, int, int, int, int, int]] = []
        for _obj in range(rnd.randint(0, 3)):
            pack_map = [rnd.randrange(packs) for _ in range(rnd.randint(1, 4))]
            ents = [
                (
                    pool[0] if rnd.random() < 0.4 else rnd.choice(pool),
                    rnd.randrange(len(pack_map)),
                    rnd.choice(edges),
                    rnd.choice(edges),
                    rnd.choice(edges),
                )
                for _ in range(rnd.randint(0, 300))
            ]
            table.add(b"".join(ENTRY_RECORD.pack(*e) for e in ents), pack_map)
            for cid, local, off, stored, raw in ents:
                entries.append((cid, pack_map[local], off, stored, raw, len(entries)))
        table.sort()
        unusable = {(e[0], e[1]) for e in entries if rnd.random() < 0.05}
        for cid, pack in unusable:
            table.set_unusable(cid, pack)
        live = {cid for cid in pool if rnd.random() < 0.6}
        absent = os.urandom(32)
        missing = table.mark_live(b"".join(CHUNK_RECORD.pack(c, 0) for c in [*live, absent]))
        listed = {e[0] for e in entries}
        assert set(missing[i : i + 32] for i in range(0, len(missing), 32)) == (
            (live - listed) | {absent}
        )
        lengths = [rnd.choice([0, 1, rnd.randrange(1 << 53)]) for _ in range(packs)]
        stale = {p for p in range(packs) if rnd.random() < 0.3}
        chosen, live_in, used, blobs = _old_rules(
            entries, packs, pack_ids, lengths, live & listed, stale, unusable
        )
        assert table.live_bytes() == live_in
        # prune hands the table its order of packs, taken exactly in Python
        order = sorted(
            range(packs),
            key=lambda p: (p not in stale, live_in[p] / max(1, lengths[p]), pack_ids[p]),
        )
        rank = [order.index(p) for p in range(packs)]
        no_copy, _first = table.choose(rank)
        assert no_copy == len((live & listed) - set(chosen))
        assert table.usage() == (used, blobs)
        moving_flags = bytes(rnd.random() < 0.5 for _ in range(packs))
        moving, total = table.moving(moving_flags)
        want = sorted(
            (c for c in chosen.values() if moving_flags[c[1]]), key=lambda c: (c[1], c[2], c[5])
        )
        assert list(ENTRY_RECORD.iter_unpack(moving)) == [c[:5] for c in want]
        assert total == sum(c[3] for c in want)
        numbers = [NO_NUMBER if moving_flags[p] else p for p in range(packs)]
        kept = []
        for cid in sorted(listed):
            if cid in live:
                c = chosen.get(cid)
                if c is not None and numbers[c[1]] != NO_NUMBER:
                    kept.append((cid, numbers[c[1]], *c[2:5]))
            else:
                for e in entries:
                    if e[0] == cid and (cid, e[1]) not in unusable and numbers[e[1]] != NO_NUMBER:
                        kept.append((cid, numbers[e[1]], *e[2:5]))
                        break
        assert list(ENTRY_RECORD.iter_unpack(table.kept(numbers))) == kept
        assert table.kept_count(numbers) == len(kept)


# =============================================================================================
# Findings of the review, fixed
# =============================================================================================


@pytest.mark.parametrize("table_size", [0, 1])
def test_a_writer_entry_naming_a_pack_outside_its_table_is_refused_by_name(
    run_asyncio: Run[None], repo_path: Path, table_size: int
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await one_backup(repo, 74)
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                (_n, packs, ents), *_ = await index_objects(writer._store, repo_path)
                cid, _no, off, stored, raw = ents[0]
                name = await plant_index(
                    writer._store,
                    repo_path,
                    [(p.pack_id, p.length) for p in packs[:table_size]],
                    [(cid, 5, off, stored, raw)],
                )
            before = snapshot(repo_path)
            with pytest.raises(IntegrityError, match=name):
                await repo.prune()
            assert snapshot(repo_path) == before
            assert await restores(repo, *gen)

    run_asyncio(go())


@pytest.mark.parametrize("chunk_id", [b"\xab", b"\x01" * 33])
def test_a_quarantine_record_naming_a_malformed_chunk_id_does_not_crash_prune(
    run_asyncio: Run[None], repo_path: Path, chunk_id: bytes
) -> None:
    """A reader key (or whoever holds one) writes a quarantine record naming a real pack
    and a chunk id of the wrong length. The pair names no copy: prune runs (it raised a
    raw ValueError from the table), and the generation restores."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await one_backup(repo, 75)
            async with await with_key(repo, repo_path, "reader", "r") as reader:
                (_n, packs, _e), *_ = await index_objects(reader._store, repo_path)
                await reader._store.write_quarantine(
                    [(chunk_id, packs[0].pack_id, "authentication failed")]
                )
            await repo.prune()
            assert await restores(repo, *gen)

    run_asyncio(go())


@pytest.mark.parametrize("lie", ["wrong offset", "zero stored bytes"])
def test_a_writer_entry_in_the_real_pack_never_replaces_the_real_one(
    run_asyncio: Run[None], repo_path: Path, lie: str
) -> None:
    """A writer lists every real chunk again in its real pack, in an index object that
    sorts first (its name is ground: prune reads index objects in name order): at an
    offset 7 bytes off, or with 0 stored bytes. After prune the real packs are still
    there and the generation restores."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await one_backup(repo, 76)
            real_packs = {p.name for p in files_under(repo_path, "packs")}
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                for _n, packs, ents in await index_objects(writer._store, repo_path):
                    lies = [
                        (cid, no, off + 7, stored, raw)
                        if lie == "wrong offset"
                        else (cid, no, off, 0, raw)
                        for cid, no, off, stored, raw in ents
                    ]
                    await plant_index(
                        writer._store, repo_path, [(p.pack_id, p.length) for p in packs], lies
                    )
            try:
                await repo.prune()
            except DedupeError:
                pass  # a refusal is fine: the data must still be there
            outcome = {
                "real packs kept": real_packs <= {p.name for p in files_under(repo_path, "packs")},
                "restores": await restores(repo, *gen),
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())


def test_a_writers_pack_length_is_not_laundered_into_prunes_index_object(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """A writer lists the real packs again, with their lengths halved, in an index object
    that sorts first (and lists their entries, unchanged). After prune, verify --read-data
    is clean and no quarantine record exists."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            gen = await one_backup(repo, 77)
            assert (await repo.verify(read_data=True)).ok
            async with await with_key(repo, repo_path, "writer", "w") as writer:
                for _n, packs, ents in await index_objects(writer._store, repo_path):
                    await plant_index(
                        writer._store,
                        repo_path,
                        [(p.pack_id, p.length // 2) for p in packs],
                        ents,
                    )
            await repo.prune()
            assert await restores(repo, *gen)
            verified = await repo.verify(read_data=True)
            outcome = {
                "verify clean": verified.ok,
                "no quarantine": not files_under(repo_path, "quarantine"),
            }
            assert outcome == dict.fromkeys(outcome, True), outcome

    run_asyncio(go())
