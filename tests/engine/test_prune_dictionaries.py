"""Prune and the vouched objects under dicts/ that can serve no reader (docs/FORMAT.md
section 16), on real repositories (a template made once per module, copied for each
test): an object larger than a dictionary can be whose bytes hash to its name (a writer's
junk), and a copy of a real dictionary object under a ref that is not its content's.

`prune --delete-unauthenticated` deletes them; a copy that is the only one is first stored
under its true name. Damage (an object that does not open, or whose bytes do not hash to
its name) and every dictionary a reader can use stay. Without the flag prune names those
its listing shows (`problems`), reads none, and leaves them.

The sampler thresholds are shrunk (as in tests/engine/test_page_dictionaries.py) so that a
small SQLite file trains a dictionary."""

from __future__ import annotations

import asyncio
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, make_repo
from engine.test_page_dictionaries import (
    built_with_small_sampler,
    make_db,
    private_copy,
    restored,
)

from dedupe import Repository
from dedupe.crypto import KdfParams, new_key
from dedupe.engine.prune import MAX_RANGE, PruneReport
from dedupe.errors import BackendError, IntegrityError
from dedupe.hashing import object_id
from dedupe.store.dictionaries import DICT_PREFIX, MAX_DICT_OBJECT, dict_name
from dedupe.store.repository import RepositoryStore

WRITER_PW = "prune dictionaries writer"
Run = Any


@dataclass(frozen=True)
class Template:
    root: Path
    db: Path  # "orders", backed up by the admin: its pages use `real`
    real: str  # dicts/<ref>/<id>
    gen: str


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("prune-dictionaries")
    db = make_db(base / "orders.db", 12000)

    async def build() -> Template:
        admin = await make_repo(base / "repo")
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=KdfParams.weakest())
            await admin.backup(db, name="orders", chunker="auto")
            (real,) = await admin._store.backend.list(DICT_PREFIX)
            gen = (await admin.generations("orders"))[-1].id
        finally:
            await admin.close()
        return Template(base, db, real, gen)

    return built_with_small_sampler(build)


@pytest.fixture
def repo(template: Template, tmp_path: Path) -> Path:
    """A private copy of the template repository."""
    return private_copy(template.root / "repo", tmp_path)


def elsewhere(name: str, ref: bytes = bytes(8)) -> str:
    """The name of dictionary object `name`'s id under another ref."""
    return dict_name(ref, name.rsplit("/", 1)[-1])


def copy(repo: Path, name: str, to: str) -> None:
    (repo / to).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / name, repo / to)


def move(repo: Path, name: str, to: str) -> None:
    (repo / to).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).rename(repo / to)


def dictionaries(repo: Path) -> dict[str, bytes]:
    """Every object under dicts/: its bytes, by name."""
    return {
        p.relative_to(repo).as_posix(): p.read_bytes()
        for p in sorted((repo / DICT_PREFIX).rglob("*"))
        if p.is_file()
    }


async def pruned(repo: Path, **kwargs: Any) -> tuple[PruneReport, list[str]]:
    """An admin's prune in a fresh handle: its report and the problems it named."""
    admin = await Repository.open(repo, PASSPHRASE)
    try:
        report = await asyncio.wait_for(admin.prune(**kwargs), 120)
        return report, admin.problems
    finally:
        await admin.close()


async def writer_vouches_for(repo: Path, junk: bytes, ref: bytes) -> str:
    """What a writer key can do: vouch for bytes of its own under dicts/ (key map entry
    first, as write_dictionary does), whatever they are. The object's name."""
    w1 = await Repository.open(repo, WRITER_PW)
    try:
        store = w1._store
        oid = object_id(junk)
        await store.keymaps.write([store.keymaps.dictionary_entry(bytes.fromhex(oid), new_key())])
        name = dict_name(ref, oid)
        await store.backend.put(name, junk)
        return name
    finally:
        await w1.close()


def test_a_vouched_object_larger_than_a_dictionary_can_be_is_deleted(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Case (a): one byte over the limit, and one over two of the ranges prune hashes in."""
    rnd = random.Random(1)

    async def main() -> None:
        big = [
            await writer_vouches_for(repo, rnd.randbytes(MAX_DICT_OBJECT + 1), bytes(range(8))),
            await writer_vouches_for(repo, rnd.randbytes(MAX_RANGE + 5), bytes(8)),
        ]
        report, problems = await pruned(repo, delete_unauthenticated=True)
        assert sorted(report.dictionaries_deleted) == sorted(big)
        for name in big:
            assert [p for p in problems if name in p and "deleted" in p], name
        assert report.dictionaries_moved == {}
        assert list(dictionaries(repo)) == [template.real]
        out = await restored(repo, template.gen, tmp_path / "out")
        assert out == template.db.read_bytes()

    run_asyncio(main())


def test_a_copy_under_a_wrong_ref_is_deleted_when_its_true_name_holds_it(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    """Case (b), the real object in place: the copy goes, the real one is not touched."""
    decoy = elsewhere(template.real)
    copy(repo, template.real, decoy)
    before = (repo / template.real).read_bytes()

    async def main() -> None:
        report, _problems = await pruned(repo, delete_unauthenticated=True)
        assert report.dictionaries_deleted == [decoy]
        assert report.dictionaries_moved == {}
        assert dictionaries(repo) == {template.real: before}

    run_asyncio(main())


def test_the_only_copy_under_a_wrong_ref_is_moved_to_its_true_name(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Case (b), the real object moved away by a storage attacker (to two wrong refs):
    one copy is stored under its true name, both wrong ones go, and a fresh handle
    restores the generation that uses it."""
    real = (repo / template.real).read_bytes()
    moved = [elsewhere(template.real), elsewhere(template.real, b"\xff" * 8)]
    copy(repo, template.real, moved[1])
    move(repo, template.real, moved[0])

    async def main() -> None:
        with pytest.raises(IntegrityError, match="dictionary"):  # its blobs need it
            await restored(repo, template.gen, tmp_path / "before")
        report, problems = await pruned(repo, delete_unauthenticated=True)
        assert report.dictionaries_moved == {moved[0]: template.real}
        assert [p for p in problems if f"{moved[0]} moved to {template.real}" in p]
        assert report.dictionaries_deleted == [moved[1]]
        assert dictionaries(repo) == {template.real: real}
        out = await restored(repo, template.gen, tmp_path / "out")
        assert out == template.db.read_bytes()

    run_asyncio(main())


def test_a_move_that_fails_keeps_the_only_copy(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """The copy is stored under its true name before it is deleted: when that store fails
    (a file where the true ref's directory should be), prune stops and the only copy is
    still there; the next prune, once the way is clear, finishes the move."""
    ref_dir = template.real.rsplit("/", 1)[0]
    moved = elsewhere(template.real)
    copy(repo, template.real, moved)
    shutil.rmtree(repo / ref_dir)
    (repo / ref_dir).write_bytes(b"in the way")

    async def main() -> None:
        with pytest.raises(BackendError, match=ref_dir):
            await pruned(repo, delete_unauthenticated=True)
        assert (repo / moved).exists()
        (repo / ref_dir).unlink()
        report, _problems = await pruned(repo, delete_unauthenticated=True)
        assert report.dictionaries_moved == {moved: template.real}
        out = await restored(repo, template.gen, tmp_path / "out")
        assert out == template.db.read_bytes()

    run_asyncio(main())


def test_a_damaged_true_copy_is_replaced_by_the_good_misplaced_one(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """The true name holds damaged bytes, a copy under a wrong ref the good ones: the id
    allows only those bytes under the true name, so they are stored there."""
    real = (repo / template.real).read_bytes()
    moved = elsewhere(template.real)
    copy(repo, template.real, moved)
    damaged = bytearray(real)
    damaged[len(damaged) // 2] ^= 1
    (repo / template.real).write_bytes(bytes(damaged))

    async def main() -> None:
        report, _problems = await pruned(repo, delete_unauthenticated=True)
        assert report.dictionaries_moved == {moved: template.real}
        assert dictionaries(repo) == {template.real: real}
        out = await restored(repo, template.gen, tmp_path / "out")
        assert out == template.db.read_bytes()

    run_asyncio(main())


def test_damage_is_never_deleted(run_asyncio: Run, template: Template, repo: Path) -> None:
    """A bit-flipped real dictionary (and a bit-flipped copy of it under a wrong ref), a
    real one grown past the limit (its bytes no longer hash to its name), and a writer's
    junk of exactly the limit (it does not open): each may be repaired, none is deleted."""
    real = (repo / template.real).read_bytes()
    flipped = bytearray(real)
    flipped[len(flipped) // 2] ^= 1
    (repo / template.real).write_bytes(bytes(flipped))
    flipped_copy = elsewhere(template.real)
    copy(repo, template.real, flipped_copy)
    grown = dict_name(bytes(range(8)), object_id(real))
    (repo / grown).parent.mkdir(parents=True)
    (repo / grown).write_bytes(real + bytes(MAX_DICT_OBJECT))

    async def main() -> None:
        junk = await writer_vouches_for(
            repo, random.Random(2).randbytes(MAX_DICT_OBJECT), b"\x01" * 8
        )
        before = dictionaries(repo)
        assert set(before) == {template.real, flipped_copy, grown, junk}
        report, _problems = await pruned(repo, delete_unauthenticated=True)
        assert report.dictionaries_deleted == [] and report.dictionaries_moved == {}
        assert dictionaries(repo) == before

    run_asyncio(main())


def test_a_live_dictionary_is_never_deleted(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """A clean repository, every pack rewritten: the dictionary its blobs need stays,
    byte for byte, and still serves them."""
    before = dictionaries(repo)

    async def main() -> None:
        report, problems = await pruned(repo, delete_unauthenticated=True, repack_threshold=0.0)
        assert report.dictionaries_deleted == [] and report.dictionaries_moved == {}
        assert not [p for p in problems if DICT_PREFIX in p]
        assert dictionaries(repo) == before
        out = await restored(repo, template.gen, tmp_path / "out")
        assert out == template.db.read_bytes()

    run_asyncio(main())


def reads_under(store: RepositoryStore, prefix: str) -> list[str]:
    """Record (without changing them) the reads of names under `prefix`."""
    seen: list[str] = []
    get, get_small = store.backend.get, store.backend.get_small

    async def spy_get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith(prefix):
            seen.append(name)
        return await get(name, offset, length)

    async def spy_get_small(name: str, limit: int) -> bytes:
        if name.startswith(prefix):
            seen.append(name)
        return await get_small(name, limit)

    store.backend.get = spy_get  # type: ignore[method-assign]
    store.backend.get_small = spy_get_small  # type: ignore[method-assign]
    return seen


def test_without_the_flag_prune_names_them_reads_none_and_leaves_them(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    """They make no prune unsafe (their entries are the keyring's word, as any object's),
    so prune runs; it names what its listing shows with the flag that removes it, reads
    none of them (a routine prune under the exclusive lock), and changes nothing under
    dicts/. A dry run with the flag says what it would do, and does nothing either."""
    decoy = elsewhere(template.real)
    copy(repo, template.real, decoy)

    async def main() -> None:
        big = await writer_vouches_for(
            repo, random.Random(3).randbytes(MAX_DICT_OBJECT + 1), bytes(range(8))
        )
        at_limit = await writer_vouches_for(
            repo, random.Random(4).randbytes(MAX_DICT_OBJECT), b"\x01" * 8
        )
        before = dictionaries(repo)
        admin = await Repository.open(repo, PASSPHRASE)
        try:
            reads = reads_under(admin._store, DICT_PREFIX)
            report = await asyncio.wait_for(admin.prune(), 120)
            problems = admin.problems
        finally:
            await admin.close()
        assert reads == []
        assert report.dictionaries_deleted == [] and report.dictionaries_moved == {}
        for name in (decoy, big):
            assert [p for p in problems if name in p and "--delete-unauthenticated" in p], name
        assert not [p for p in problems if at_limit in p]  # not too large: verify's to judge
        assert dictionaries(repo) == before
        report, _problems = await pruned(repo, delete_unauthenticated=True, dry_run=True)
        assert sorted(report.dictionaries_deleted) == sorted([decoy, big])
        assert dictionaries(repo) == before

    run_asyncio(main())
