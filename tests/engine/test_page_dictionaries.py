"""Compression dictionaries of page blobs (docs/FORMAT.md section 16), end to end through
the API on a real repository: a backup of a SQLite file trains one from its first new
pages and compresses the rest with it; the next backup of the name reuses it; a restore
in a fresh handle loads it when a blob names it; and every way a dictionary can be
missing, damaged, planted or misnamed is a clear error or is ignored, never wrong bytes.

The sampler's thresholds are shrunk (a few hundred pages instead of 8,192) so that small
databases exercise the mid-stream switch; nothing else is changed."""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import PASSPHRASE, make_repo

from dedupe import Repository
from dedupe.crypto import KdfParams, open_sealed
from dedupe.errors import DedupeError, IntegrityError
from dedupe.format.keymap import DICTIONARY
from dedupe.format.pack import FOOTER_SIZE, TRAILER_AAD, decode_footer, decode_trailer_items
from dedupe.store import dictionaries
from dedupe.store.dictionaries import DICT_PREFIX, dict_name, parse_dict_name

WRITER_PW = "writer passphrase"
WEAK = KdfParams.weakest()
T = TypeVar("T")


def shrink_sampler(mp: pytest.MonkeyPatch) -> None:
    """Train after 96 samples (384 pages), on at least 1 MiB of new pages."""
    mp.setattr(dictionaries, "SAMPLES", 96)
    mp.setattr(dictionaries, "MIN_SAMPLE_BYTES", 256 << 10)


@pytest.fixture(autouse=True)
def small_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    shrink_sampler(monkeypatch)


def built_with_small_sampler(build: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """What `build()` makes with the sampler shrunk: for module-scoped template fixtures,
    which the function-scoped monkeypatch does not reach."""
    with pytest.MonkeyPatch.context() as mp:
        shrink_sampler(mp)
        return asyncio.run(build())


def private_copy(template_repo: Path, tmp_path: Path) -> Path:
    """A copy of a module's template repository for one test to change."""
    dest = tmp_path / "repo"
    shutil.copytree(template_repo, dest, symlinks=True)
    return dest


def make_db(path: Path, rows: int, seed: int = 1, start: int = 0) -> Path:
    """A SQLite database of realistic pages: rows of names, emails, amounts and text."""
    rnd = random.Random(seed)
    words = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(3, 9)))
        for _ in range(400)
    ]
    db = sqlite3.connect(path)
    db.execute(
        "create table if not exists orders (id integer primary key, customer text,"
        " email text, amount real, status text, note text)"
    )
    db.executemany(
        "insert into orders values (?, ?, ?, ?, ?, ?)",
        [
            (
                start + i,
                f"{rnd.choice(words).title()} {rnd.choice(words).title()}",
                f"{rnd.choice(words)}.{rnd.choice(words)}@example.com",
                round(rnd.uniform(1, 5000), 2),
                rnd.choice(["paid", "shipped", "pending", "refunded"]),
                " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 30))),
            )
            for i in range(rows)
        ],
    )
    db.commit()
    db.close()
    return path


async def pack_plaintexts(repo: Repository) -> list[tuple[str, bytes, bytes, bytes, int, bytes]]:
    """(pack name, pack key, chunk id, sealed blob, raw length, blob plaintext) of every
    blob in the repository's packs, through their trailers (admin: opens every pack)."""
    store = repo._store
    found = []
    for name in await store.backend.list("packs/"):
        pack_id = bytes.fromhex(name.rsplit("/", 1)[-1])
        data = await store.backend.get(name)
        key = await store.pack_key_of(pack_id)
        length = decode_footer(len(data), data[-FOOTER_SIZE:], name)
        trailer = open_sealed(key, data[-FOOTER_SIZE - length : -FOOTER_SIZE], TRAILER_AAD, name)
        for cid, offset, stored, raw in decode_trailer_items(bytes(trailer), name):
            blob = data[offset : offset + stored]
            found.append((name, key, cid, blob, raw, bytes(open_sealed(key, blob, cid, name))))
    return found


async def pack_blobs(repo: Repository) -> list[tuple[bytes, bytes, bytes, int, int]]:
    """(pack key, chunk id, sealed blob, raw length, compression byte) of every blob."""
    return [
        (key, cid, blob, raw, plain[0])
        for _name, key, cid, blob, raw, plain in await pack_plaintexts(repo)
    ]


async def blob_kinds(repo: Repository) -> dict[int, int]:
    """How many blobs of each compression byte the repository's packs hold (admin)."""
    kinds: dict[int, int] = {}
    for *_blob, kind in await pack_blobs(repo):
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


async def dictionary_names(repo: Repository) -> list[str]:
    return sorted(await repo._store.backend.list(DICT_PREFIX))


async def restored(location: Path, spec: str, out: Path, passphrase: str = PASSPHRASE) -> bytes:
    """Restore in a fresh handle: its codec has loaded no dictionary."""
    repo = await Repository.open(location, passphrase)
    try:
        await repo.restore(spec, out)
    finally:
        await repo.close()
    return out.read_bytes()


async def verified(location: Path, **kwargs: Any) -> Any:
    """verify's report, from a fresh handle."""
    repo = await Repository.open(location, PASSPHRASE)
    try:
        return await repo.verify(**kwargs)
    finally:
        await repo.close()


def test_a_page_file_trains_a_dictionary_and_restores_through_it(
    run: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "day1.db", 40000)

    async def main() -> None:
        repo = await make_repo(repo_path)
        try:
            stats = await repo.backup(db, name="orders", chunker="auto")
            gens = await repo.generations("orders")
            names = await dictionary_names(repo)
            kinds = await blob_kinds(repo)
        finally:
            await repo.close()
        assert len(names) == 1
        ref, dict_id = parse_dict_name(names[0]) or (b"", "")
        assert gens[-1].dictionary == dict_id
        # The first pages went before the dictionary was ready; the rest use it.
        assert kinds.get(2, 0) > stats.chunks_new // 2
        assert kinds.get(1, 0) > 0
        assert await restored(repo_path, "orders@latest", tmp_path / "out.db") == db.read_bytes()

    run(main())


def test_the_next_backup_of_the_name_reuses_the_dictionary(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        repo = await make_repo(repo_path)
        try:
            await repo.backup(db, name="orders", chunker="auto")
            first = await dictionary_names(repo)
            make_db(db, 3000, seed=2, start=100000)  # day 2: new pages at the end
            await repo.backup(db, name="orders", kind="incremental", chunker="auto")
            gens = await repo.generations("orders")
            assert await dictionary_names(repo) == first
            assert gens[0].dictionary == gens[1].dictionary is not None
        finally:
            await repo.close()
        assert await restored(repo_path, "orders@latest", tmp_path / "out") == db.read_bytes()

    run_asyncio(main())


def test_fastcdc_streams_small_sources_and_the_off_switch_train_none(
    run_asyncio: Any, tmp_path: Path, repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_db(tmp_path / "db", 12000)
    small = make_db(tmp_path / "small", 200)

    async def main() -> None:
        repo = await make_repo(repo_path)
        try:
            await repo.backup(db, name="dump", chunker="fastcdc")
            await repo.backup(small, name="small", chunker="auto")
            await repo.backup(db, name="dry", chunker="auto", dry_run=True)
            monkeypatch.setenv("DEDUPE_DICTIONARIES", "Off")
            await repo.backup(db, name="off", chunker="auto")
            monkeypatch.setenv("DEDUPE_DICTIONARIES", "1")
            assert await dictionary_names(repo) == []
            assert all(g.dictionary is None for g in await repo.generations())
            assert 2 not in await blob_kinds(repo)
        finally:
            await repo.close()

    run_asyncio(main())


def test_writers_train_their_own_and_readers_open_all(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "db", 12000)
    other = make_db(tmp_path / "other", 12000, seed=7)

    async def main() -> None:
        admin = await make_repo(repo_path)
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=WEAK)
            await admin.keys.add(WRITER_PW + "2", role="writer", name="w2", kdf=WEAK)
        finally:
            await admin.close()
        w1 = await Repository.open(repo_path, WRITER_PW)
        try:
            await w1.backup(db, name="a", chunker="auto")
            await w1.backup(db, name="a", chunker="auto", kind="incremental")
            gens = await w1.generations("a")
            assert gens[0].dictionary == gens[1].dictionary is not None
        finally:
            await w1.close()
        # Another writer cannot open w1's dictionary: it trains its own for the name.
        w2 = await Repository.open(repo_path, WRITER_PW + "2")
        try:
            await w2.backup(other, name="a", chunker="auto")
            gens = await w2.generations("a")
            assert gens[-1].dictionary not in (None, gens[0].dictionary)
            assert len(await dictionary_names(w2)) == 2
        finally:
            await w2.close()
        assert await restored(repo_path, "a@latest", tmp_path / "o1") == other.read_bytes()
        first = (await (await Repository.open(repo_path, PASSPHRASE)).generations("a"))[0]
        assert await restored(repo_path, first.id, tmp_path / "o2") == db.read_bytes()

    run_asyncio(main())


async def _one_dictionary_repo(db: Path, repo_path: Path) -> tuple[str, str]:
    repo = await make_repo(repo_path)
    try:
        await repo.backup(db, name="orders", chunker="auto")
        (name,) = await dictionary_names(repo)
        return name, (await repo.generations("orders"))[-1].id
    finally:
        await repo.close()


def test_a_missing_dictionary_is_a_clear_error_and_damage_verify_reports(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        name, _gen = await _one_dictionary_repo(db, repo_path)
        (repo_path / name).unlink()
        with pytest.raises(IntegrityError, match="dictionary"):
            await restored(repo_path, "orders@latest", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        report = await verified(repo_path, read_data=True, quarantine=False)
        assert not report.ok
        details = " ".join(" ".join(d.details) for d in report.damaged)
        assert "no usable compression dictionary" in details

    run_asyncio(main())


def test_a_damaged_dictionary_is_reported_and_never_used(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        name, _gen = await _one_dictionary_repo(db, repo_path)
        path = repo_path / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
        report = await verified(repo_path)
        assert [(d.kind, d.name) for d in report.damaged] == [("dictionary", name)]
        with pytest.raises(IntegrityError, match="dictionary"):
            await restored(repo_path, "orders@latest", tmp_path / "out")

    run_asyncio(main())


def test_a_planted_dictionary_is_ignored_reported_and_pruned_only_when_told(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    """Someone with write access and no keys copies a real dictionary object to a new
    name under the same ref (its id then does not hash... so they re-seal nothing: a
    byte-identical copy under another id), and plants random bytes under another ref."""
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        name, _gen = await _one_dictionary_repo(db, repo_path)
        ref, _dict_id = parse_dict_name(name) or (b"", "")
        fake = b"DDPDICT1" + random.Random(3).randbytes(4000)
        from dedupe.hashing import object_id

        planted = dict_name(ref, object_id(fake))
        (repo_path / planted).parent.mkdir(parents=True, exist_ok=True)
        (repo_path / planted).write_bytes(fake)
        # The real one still serves every blob.
        assert await restored(repo_path, "orders@latest", tmp_path / "o") == db.read_bytes()
        repo = await Repository.open(repo_path, PASSPHRASE)
        try:
            report = await repo.verify()
            assert [(d.kind, d.name) for d in report.damaged] == [("dictionary", planted)]
            with pytest.raises(IntegrityError, match="no key map"):
                await repo.prune()
            assert (repo_path / planted).exists()
            await repo.prune(delete_unauthenticated=True)
            assert not (repo_path / planted).exists()
            assert (repo_path / name).exists()
        finally:
            await repo.close()
        # With the real one gone, the planted one is no substitute.
        (repo_path / name).unlink()
        (repo_path / planted).write_bytes(fake)
        with pytest.raises(IntegrityError, match="not authenticated|no usable"):
            await restored(repo_path, "orders@latest", tmp_path / "o2")

    run_asyncio(main())


def test_a_dictionary_under_another_ref_is_refused(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    """The ref in the name must be the content's: a real, authenticated dictionary
    object moved under another ref opens, but is not taken for that ref."""
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        name, _gen = await _one_dictionary_repo(db, repo_path)
        ref, dict_id = parse_dict_name(name) or (b"", "")
        moved = dict_name(bytes(8), dict_id)
        (repo_path / moved).parent.mkdir(parents=True, exist_ok=True)
        (repo_path / name).rename(repo_path / moved)
        with pytest.raises(IntegrityError, match="dictionary"):
            await restored(repo_path, "orders@latest", tmp_path / "out")
        report = await verified(repo_path)
        assert ("dictionary", moved) in [(d.kind, d.name) for d in report.damaged]

    run_asyncio(main())


def test_prune_keeps_dictionaries_and_reencrypt_reseals_them(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    db = make_db(tmp_path / "db", 12000)

    async def main() -> None:
        name, gen = await _one_dictionary_repo(db, repo_path)
        repo = await Repository.open(repo_path, PASSPHRASE)
        try:
            await repo.prune(repack_threshold=0.0)
            assert await dictionary_names(repo) == [name]
            await repo.keys.rotate(reencrypt=True)
            (after,) = await dictionary_names(repo)
            assert after != name and after.split("/")[1] == name.split("/")[1]  # same ref
            found = repo._store.keymaps.get(DICTIONARY, bytes.fromhex(after.rsplit("/")[-1]))
            assert found is not None and found.entry.born == repo._store.keyring.current_epoch
        finally:
            await repo.close()
        assert await restored(repo_path, gen, tmp_path / "out") == db.read_bytes()

    run_asyncio(main())


async def refs_per_pack(repo: Repository) -> dict[str, set[bytes]]:
    """The dictionary refs the blobs of each pack name (admin: opens every blob)."""
    refs: dict[str, set[bytes]] = {}
    for name, *_blob, plain in await pack_plaintexts(repo):
        named = refs.setdefault(name, set())
        if plain[0] == 2:
            named.add(plain[1:9])
    return refs


def test_a_repack_compresses_pages_again_with_their_dictionary(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    """Re-encryption repacks every pack: each page blob names its dictionary again, and
    the packs take no more room than before (they took ~5% more when a repack compressed
    them without one)."""
    db = make_db(tmp_path / "db", 30000)

    async def main() -> None:
        _name, gen = await _one_dictionary_repo(db, repo_path)
        repo = await Repository.open(repo_path, PASSPHRASE)
        try:
            kinds = await blob_kinds(repo)
            assert kinds.get(2, 0) > 500  # page blobs compressed with the dictionary
            size = sum((await repo._store.backend.list_sized("packs/")).values())
            await repo.keys.rotate(reencrypt=True)
            assert await blob_kinds(repo) == kinds
            assert sum((await repo._store.backend.list_sized("packs/")).values()) <= size
        finally:
            await repo.close()
        assert await restored(repo_path, gen, tmp_path / "out") == db.read_bytes()

    run_asyncio(main())


def test_a_repacked_pack_names_at_most_four_dictionaries(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    """Six sources, six dictionaries, their packs repacked together: a reader refuses a
    pack whose blobs name more than four (FORMAT.md 16), so the repack finishes a pack
    early rather than take a fifth. Every generation restores in a fresh handle."""
    dbs = [make_db(tmp_path / f"db{i}", 20000, seed=i) for i in range(6)]

    async def main() -> None:
        repo = await make_repo(repo_path)
        try:
            for i, db in enumerate(dbs):
                await repo.backup(db, name=f"src{i}", chunker="auto")
            assert len(await dictionary_names(repo)) == 6
            before = await refs_per_pack(repo)
            assert max(len(refs) for refs in before.values()) == 1  # a backup's pack: one
            # New packs large enough to take every source's blobs, were it not for the limit
            repo._store.pack_size = 64 << 20
            await repo.keys.rotate(reencrypt=True)
            after = await refs_per_pack(repo)
            assert set(after).isdisjoint(before)  # every pack was rewritten
            assert len(set().union(*after.values())) == 6
            assert max(len(refs) for refs in after.values()) == 4  # mixed, never past four
            gens = {g.name: g.id for g in await repo.generations()}
        finally:
            await repo.close()
        for i, db in enumerate(dbs):
            out = tmp_path / f"out{i}"
            assert await restored(repo_path, gens[f"src{i}"], out) == db.read_bytes()

    run_asyncio(main())


def test_a_writer_cannot_vouch_for_a_dictionary_as_another_key(
    run_asyncio: Any, tmp_path: Path, repo_path: Path
) -> None:
    """A writer's dictionary entry must name the writer itself as its author (as its
    generation entries do): a key map that says otherwise is refused."""
    from dataclasses import replace

    async def main() -> None:
        admin = await make_repo(repo_path)
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w", kdf=WEAK)
        finally:
            await admin.close()
        w = await Repository.open(repo_path, WRITER_PW)
        try:
            store = w._store
            entry = store.keymaps.dictionary_entry(bytes(32), bytes(32))
            assert entry.self_key == store.holder.key_id
            forged = replace(entry, self_key=bytes(range(16)))
            await store.keymaps.write([forged])
        finally:
            await w.close()
        repo = await Repository.open(repo_path, PASSPHRASE)
        try:
            assert repo._store.keymaps.get(DICTIONARY, bytes(32)) is None
            assert any("without naming itself" in p for p in repo._store.problems)
        finally:
            await repo.close()

    run_asyncio(main())


def test_dedupe_error_tree_holds_dictionary_needed() -> None:
    from dedupe.errors import DictionaryNeeded

    e = DictionaryNeeded(bytes(32), bytes(8))
    assert isinstance(e, IntegrityError) and isinstance(e, DedupeError)
    assert e.ref == bytes(8) and "0000000000000000" in str(e)
