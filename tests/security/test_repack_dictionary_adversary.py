"""Prune's repack with compression dictionaries (dedupe/engine/prune.py `_repack`: each
repacked blob is compressed again with the dictionary it named, a new pack is finished
early rather than name a fifth; BlobCodec.open_as_stored and csrc/blobcodec.c's `how`)
against the attackers of docs/FORMAT.md section 11, on real repositories (a template made
once per module, copied for each test):

- (A) a **storage attacker**: write access to the repository's files, no key;
- (B) a **writer key holder**: its own dictionaries, key map entries and packs (blobs of
  its choice, naming any ref), plus (A).

What must hold (FORMAT.md 14.3 and 16): a repack never writes a pack a reader refuses
(blobs naming more than MAX_REFS_PER_CALL dictionaries, or a dictionary no reader can
load), never changes a restored byte, compresses a chunk again only with the dictionary
its own blob named, and refuses, deleting nothing, when it cannot open what it moves.

Several tests are also mutant killers for the commit's checks: each docstring names the
check whose removal (or mutation) it turns red. The one finding (a repack into many
small packs) is fixed; its test is the first below."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard
from conftest import make_repo
from engine.test_page_dictionaries import (
    built_with_small_sampler,
    make_db,
    pack_plaintexts,
    private_copy,
)

from dedupe.crypto import KdfParams, new_key
from dedupe.engine import prune as prune_module
from dedupe.errors import DedupeError, IntegrityError
from dedupe.format.pack import COMPRESSION_NONE, COMPRESSION_ZSTD, COMPRESSION_ZSTD_DICT
from dedupe.hashing import ChunkHasher
from dedupe.store import blobs as blobs_module
from dedupe.store.blobs import (
    MAX_REFS_PER_CALL,
    NATIVE_AVAILABLE,
    BlobCodec,
    Dictionary,
    PyFramedBatch,
    seal_batch,
)
from dedupe.store.dictionaries import DICT_PREFIX, dict_name
from security.test_dictionary_adversary import seal_and_index, write_raw_dictionary
from security.test_dictionary_budget_adversary import (
    budget,
    closed,
    opened,
    ref_of,
    restored,
    short_load_wait,  # noqa: F401 (autouse fixture: active in this module by being here)
    small_sampler,  # noqa: F401 (autouse fixture)
)

WRITER_PW = "repack dictionary adversary writer"
WEAK = KdfParams.weakest()
SOURCES = 6
# Packs of a repack that finish full: each takes the end of one batch (an old 64 KiB
# pack's range of one dictionary) and the start of the next.
TARGET = 128 << 10
Run = Callable[[Awaitable[Any]], Any]
native_only = pytest.mark.skipif(not NATIVE_AVAILABLE, reason="the native kernels are not built")


# --- the template repository ------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    root: Path
    dbs: list[Path]  # src0 .. src5, backed up by the admin, each training its own dictionary
    dicts: list[str]  # dicts/<ref>/<id> of src0 .. src5


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("repack-dictionary-template")
    dbs = [make_db(base / f"src{i}.db", 24000, seed=40 + i) for i in range(SOURCES)]

    async def build() -> Template:
        admin = await make_repo(base / "repo")
        try:
            await admin.keys.add(WRITER_PW, role="writer", name="w1", kdf=WEAK)
            names: list[str] = []
            for i, db in enumerate(dbs):
                await admin.backup(db, name=f"src{i}", chunker="auto")
                now = sorted(await admin._store.backend.list(DICT_PREFIX))
                (new,) = set(now) - set(names)
                names.append(new)
        finally:
            await closed(admin)
        return Template(base, dbs, names)

    return built_with_small_sampler(build)


@pytest.fixture
def repo(template: Template, tmp_path: Path) -> Path:
    """A private copy of the template repository."""
    return private_copy(template.root / "repo", tmp_path)


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    pack: str
    size: int  # the pack's length
    chunk: bytes
    kind: int  # compression byte
    ref: bytes | None  # the dictionary it names


async def blobs_of(location: Path) -> list[Blob]:
    """Every blob of every pack, as the admin opens them through the trailers."""
    repo = await opened(location)
    try:
        found = await pack_plaintexts(repo)
    finally:
        await closed(repo)
    sizes = {p.name: p.stat().st_size for p in (location / "packs").rglob("*") if p.is_file()}
    return [
        Blob(
            name,
            sizes[name.rsplit("/", 1)[-1]],
            cid,
            plain[0],
            bytes(plain[1:9]) if plain[0] == COMPRESSION_ZSTD_DICT else None,
        )
        for name, _key, cid, _blob, _raw, plain in found
    ]


def refs_by_pack(blobs: list[Blob]) -> dict[str, set[bytes]]:
    out: dict[str, set[bytes]] = {}
    for b in blobs:
        named = out.setdefault(b.pack, set())
        if b.ref is not None:
            named.add(b.ref)
    return out


def ref_of_chunk(blobs: list[Blob]) -> dict[bytes, bytes | None]:
    return {b.chunk: b.ref for b in blobs}


async def reencrypted(location: Path, pack_size: int | None = None) -> None:
    """`key rotate --reencrypt` by the admin: every pack is repacked."""
    admin = await opened(location)
    try:
        if pack_size is not None:
            admin._store.pack_size = pack_size
        await asyncio.wait_for(admin.keys.rotate(reencrypt=True), 120)
    finally:
        await closed(admin)


async def pruned(location: Path, **kwargs: Any) -> Any:
    admin = await opened(location)
    try:
        return await asyncio.wait_for(admin.prune(**kwargs), 120)
    finally:
        await closed(admin)


async def forgotten(location: Path, *names: str) -> None:
    admin = await opened(location)
    try:
        ids = [g.id for name in names for g in await admin.generations(name)]
        await admin.forget(ids=ids)
    finally:
        await closed(admin)


async def every_source_restores(
    location: Path, template: Template, out: Path, which: Any = None
) -> None:
    for i in which if which is not None else range(SOURCES):
        got = await restored(location, f"src{i}@latest", out / f"src{i}")
        assert got == template.dbs[i].read_bytes(), f"src{i}"


async def verify_clean(location: Path) -> None:
    admin = await opened(location)
    try:
        report = await asyncio.wait_for(admin.verify(read_data=True, quarantine=False), 120)
    finally:
        await closed(admin)
    assert report.ok, report


def files(location: Path) -> dict[str, bytes]:
    """Every object under packs/, index/ and dicts/, by path, with its bytes."""
    out = {}
    for top in ("packs", "index", "dicts", "generations"):
        for p in (location / top).rglob("*"):
            if p.is_file():
                out[str(p.relative_to(location))] = p.read_bytes()
    return out


def early_packs_short_of_four(blobs: list[Blob], target: int) -> list[tuple[int, int]]:
    """(size, refs named) of the packs shorter than `target` whose blobs name fewer than
    MAX_REFS_PER_CALL dictionaries. A pack is shorter than its target only when the repack
    finished it early (a fifth dictionary came) or it is the last one written."""
    sizes = {b.pack: b.size for b in blobs}
    return sorted(
        (sizes[p], len(r))
        for p, r in refs_by_pack(blobs).items()
        if sizes[p] < target and len(r) < MAX_REFS_PER_CALL
    )


# =============================================================================================
# Findings, fixed (each test states what SHOULD hold; it failed before the fix)
# =============================================================================================


# Was FINDING (low, efficiency; no attacker needed, a writer key can make it worse):
# _repack fed its PackWriter the sparse packs in pack-id order, so the batches of more
# than four sources interleaved and a pack was finished early at nearly every fifth
# dictionary: six sources' 14 MB repacked with a 64 MiB target became 11 to 16 packs of
# about 1 MB in four runs, where two would do. Fixed: the packs are read in pack-number
# order, in which one backup's packs (one dictionary) come together.
def test_more_than_four_sources_repack_into_as_few_packs_as_the_rule_allows(
    run_asyncio: Run, template: Template, repo: Path
) -> None:
    """Six dictionaries need at least two packs (four and two); a repack into packs large
    enough for everything should write no more than that."""

    async def main() -> None:
        await reencrypted(repo, pack_size=64 << 20)
        by_pack = refs_by_pack(await blobs_of(repo))
        assert len(by_pack) <= -(-SOURCES // MAX_REFS_PER_CALL), sorted(
            len(r) for r in by_pack.values()
        )

    run_asyncio(main())


# =============================================================================================
# What a repack must do with dictionaries (guards; each also kills mutants of the commit)
# =============================================================================================


def test_every_repacked_blob_names_the_dictionary_its_old_blob_named(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Re-encryption repacks every pack into packs of the test size (many finished on the
    way): chunk by chunk, a blob that named dictionary R names R again and one that named
    none names none; no pack names more than four; every source restores byte for byte in
    a fresh handle and verify --read-data is clean. Kills: framing without the dictionary
    (the old behaviour), the kernel's `how` not passed or not recorded (h[0] = 0), the ref
    copied from the wrong offset (which the fallback then silently drops)."""

    async def main() -> None:
        before = await blobs_of(repo)
        was = ref_of_chunk(before)
        assert sum(r is not None for r in was.values()) > 1000
        assert {r for r in was.values() if r} == {ref_of(n) for n in template.dicts}
        await reencrypted(repo)
        after = await blobs_of(repo)
        assert not {b.pack for b in after} & {b.pack for b in before}  # all rewritten
        assert ref_of_chunk(after) == was
        assert max(len(r) for r in refs_by_pack(after).values()) <= MAX_REFS_PER_CALL
        await every_source_restores(repo, template, tmp_path)
        await verify_clean(repo)

    run_asyncio(main())


def test_the_pure_twin_repacks_with_the_dictionary_too(
    run_asyncio: Run,
    template: Template,
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same through the pure-Python twin (an install without the kernels): prune's
    BlobCodec.open_as_stored loops over BlobCodec._open_as_stored, whose ref must be the
    one the blob names. Kills: the twin handing out None (or another slice) as the ref."""
    monkeypatch.setattr(blobs_module, "NATIVE_AVAILABLE", False)

    async def main() -> None:
        was = ref_of_chunk(await blobs_of(repo))
        admin = await opened(repo)
        try:
            assert not admin._store.codec.native
            await asyncio.wait_for(admin.keys.rotate(reencrypt=True), 120)
        finally:
            await closed(admin)
        assert ref_of_chunk(await blobs_of(repo)) == was
        await every_source_restores(repo, template, tmp_path, which=[0, 5])

    run_asyncio(main())


def test_four_dictionaries_never_split_a_pack(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Four sources left (two forgotten), repacked into packs large enough for all of
    them: four dictionaries are within what a reader takes, so the repack writes ONE pack
    naming the four. Kills: finishing a pack early whenever it already names four (the
    `ref not in refs_in_pack` condition dropped), which splits every such repack."""

    async def main() -> None:
        await forgotten(repo, "src4", "src5")
        await reencrypted(repo, pack_size=64 << 20)
        after = await blobs_of(repo)
        by_pack = refs_by_pack(after)
        assert len(by_pack) == 1, sorted(len(r) for r in by_pack.values())
        assert set().union(*by_pack.values()) == {ref_of(n) for n in template.dicts[:4]}
        await every_source_restores(repo, template, tmp_path, which=range(4))

    run_asyncio(main())


def test_a_pack_is_finished_early_only_for_a_fifth_dictionary(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """Six sources repacked into small packs (TARGET: most finish full, each holding the
    end of one batch and the start of the next): the repack's count of the refs in the
    pack being filled must start again with each pack finished. Then a pack shorter than
    its target names four dictionaries, but for the last one written. Kills: dropping the
    reset after a pack finished in packer.add (`if finished: refs_in_pack = set()`), or
    doing it only when several finished: the stale refs finish packs early for a
    'fifth' that is not there (each a short pack naming one or two)."""

    async def main() -> None:
        await reencrypted(repo, pack_size=TARGET)
        after = await blobs_of(repo)
        assert max(len(r) for r in refs_by_pack(after).values()) <= MAX_REFS_PER_CALL
        short = early_packs_short_of_four(after, TARGET)
        assert len(short) <= 1, short
        await every_source_restores(repo, template, tmp_path, which=[1, 4])

    run_asyncio(main())


def test_a_dictionary_the_codec_dropped_meanwhile_is_not_counted(
    run_asyncio: Run,
    template: Template,
    repo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first re-encryption into large packs mixes four sources per pack; the second runs
    with a codec that keeps one dictionary (DICT_BUDGET: a repository with more than it
    holds) and reads one pack at a time: after each range is opened only the dictionary
    loaded last is still held, and the chunks of the others are compressed without one
    (FORMAT.md 16: 'when the one that opened it is still held'). Those must not count
    against the pack's four: a pack finished early names four. Kills: dropping the
    fallback (a ref the codec no longer holds kept as the batch's ref), which frames
    without it yet finishes packs early for it. Everything still restores."""

    async def main() -> None:
        await reencrypted(repo, pack_size=64 << 20)
        mixed_blobs = await blobs_of(repo)
        mixed = refs_by_pack(mixed_blobs)
        assert max(len(r) for r in mixed.values()) == MAX_REFS_PER_CALL
        budget(monkeypatch, 1)
        monkeypatch.setattr(prune_module, "READ_CONCURRENCY", 1)
        await reencrypted(repo, pack_size=64 << 20)
        after = await blobs_of(repo)
        # The scenario: chunks whose dictionary was dropped were framed without one.
        was, now = ref_of_chunk(mixed_blobs), ref_of_chunk(after)
        assert sum(was[c] is not None and now[c] is None for c in was) > 100
        assert all(now[c] in (was[c], None) for c in was)  # never another dictionary
        short = early_packs_short_of_four(after, 64 << 20)
        assert len(short) <= 1, short  # the last one written
        await every_source_restores(repo, template, tmp_path)

    run_asyncio(main())


# --- the codec: what open_as_stored and the kernel's `how` promise ------------------------------

HASHER = ChunkHasher(bytes(range(32)))
PAGE = 4096


def raw_dictionaries(n: int, size: int = 32 * 1024, seed: int = 300) -> list[Dictionary]:
    """n raw-content dictionaries (random bytes): a piece of one compresses to a few bytes
    with it and not at all without."""
    out = []
    for i in range(n):
        data = random.Random(seed + i).randbytes(size)
        out.append(Dictionary(HASHER.chunk_id(data)[:8], data))
    return out


def sealed(
    pieces: Sequence[tuple[bytes, Dictionary | None]], key: bytes
) -> tuple[bytes, list[tuple[bytes, int, int, int]]]:
    """Each chunk framed (with its dictionary, or none) and sealed, back to back as in a
    pack: (the bytes, the items open calls take)."""
    framer = BlobCodec(3, HASHER, native=False)
    data, items = bytearray(), []
    for chunk, d in pieces:
        batch = framer.frame([chunk], HASHER.chunk_ids([chunk]), d)
        dst = bytearray(len(chunk) + 64)
        records = bytearray()
        end = seal_batch(key, batch, dst, 0, len(dst), records)
        cid = HASHER.chunk_id(chunk)
        items.append((cid, len(data), end, len(chunk)))
        data += dst[:end]
    return bytes(data), items


@pytest.mark.parametrize(
    "native",
    [pytest.param(True, marks=native_only, id="native"), pytest.param(False, id="python")],
)
def test_open_as_stored_refuses_a_fifth_dictionary_in_one_call(native: bool) -> None:
    """Prune's repack opens a range's blobs with open_as_stored: blobs naming more than
    MAX_REFS_PER_CALL dictionaries are refused (FORMAT.md 16; a writer could otherwise
    make every blob of its pack cost prune a dictionary load), through the kernel and
    through the twin, whose blob-by-blob loop must count as one call. With four it opens
    and names each blob's ref (None for one without). Kills: the twin's loop without
    one_pack(); the kernel path reading a ref for a blob of another compression byte."""
    key = new_key()
    dicts = raw_dictionaries(MAX_REFS_PER_CALL + 1)
    pieces = [(d.data[j * 512 : j * 512 + PAGE], d) for j in range(2) for d in dicts]
    data, items = sealed(pieces, key)
    loads: list[bytes] = []

    def loader(ref: bytes) -> Dictionary:
        loads.append(ref)
        return {d.ref: d for d in dicts}[ref]

    codec = BlobCodec(3, HASHER, native=native)
    codec.loader = loader
    with pytest.raises(IntegrityError, match="after 4 others"):
        codec.open_as_stored(key, data, 0, items)
    assert len(loads) == MAX_REFS_PER_CALL
    # Four dictionaries and a blob without one (None: not the zero bytes the kernel
    # leaves for it) open in one call.
    plain = b"0123456789abcdef" * (PAGE // 16)
    data2, extra = sealed([(plain, None)], key)
    four = [it for it, (_c, d) in zip(items, pieces, strict=True) if d is not dicts[-1]]
    four.append((extra[0][0], len(data), extra[0][2], extra[0][3]))
    codec = BlobCodec(3, HASHER, native=native)
    codec.loader = loader
    chunks, refs = codec.open_as_stored(key, data + data2, 0, four)
    want = [(c, d.ref) for c, d in pieces if d is not dicts[-1]] + [(plain, None)]
    assert [(bytes(c), r) for c, r in zip(chunks, refs, strict=True)] == want


@native_only
def test_the_kernel_records_how_each_blob_was_stored() -> None:
    """open_into's `how` (csrc/blobcodec.c, HOW_BYTES per blob): the compression byte, then
    the ref for byte 2 and zero bytes otherwise, whatever the buffer held; a buffer of
    any other length is refused before the kernel writes a byte (a shorter one would be
    written past its end). Kills: the memset of a blob without a dictionary, recording
    only dictionary blobs, the length check removed or loosened to `<`."""
    from dedupe.store import _blobcodec

    key = new_key()
    (d,) = raw_dictionaries(1)
    raw_chunk = random.Random(5).randbytes(PAGE)  # incompressible: stored as is
    zstd_chunk = b"0123456789abcdef" * (PAGE // 16)
    dict_chunk = d.data[100 : 100 + PAGE]
    data, items = sealed([(raw_chunk, None), (zstd_chunk, None), (dict_chunk, d)], key)
    codec = BlobCodec(3, HASHER, native=True)
    codec.add_dictionary(d)
    step = _blobcodec.HOW_BYTES
    assert step == 9
    how = bytearray(b"\xee" * (step * len(items)))
    out = codec._kernel().open_into(key, HASHER.id_key, data, list(items), 0, codec._dicts[2], how)
    assert bytes(memoryview(out)) == raw_chunk + zstd_chunk + dict_chunk
    assert bytes(how) == (
        bytes([COMPRESSION_NONE])
        + bytes(8)
        + bytes([COMPRESSION_ZSTD])
        + bytes(8)
        + bytes([COMPRESSION_ZSTD_DICT])
        + d.ref
    )
    for wrong in (step * len(items) - 1, step * len(items) + 1, 0):
        canary = bytearray(b"\xee" * wrong)
        with pytest.raises(ValueError, match="how"):
            codec._kernel().open_into(
                key, HASHER.id_key, data, list(items), 0, codec._dicts[2], canary
            )
        assert canary == b"\xee" * wrong


# =============================================================================================
# (A) the storage attacker
# =============================================================================================


async def new_versions(
    location: Path, template: Template, tmp_path: Path, which: list[int], version: int = 2
) -> dict[int, bytes]:
    """A new full of each source in `which` (rows added: most pages change), then the old
    generations forgotten: their packs are sparse, and a prune at threshold 0 repacks them.
    Returns the new contents."""
    admin = await opened(location)
    try:
        contents = {}
        old = []
        for i in which:
            db = tmp_path / f"src{i}-v{version}.db"
            shutil.copyfile(template.dbs[i], db)
            make_db(db, 3000, seed=90 + 10 * version + i, start=10**6)
            old += [g.id for g in await admin.generations(f"src{i}")]
            await admin.backup(db, name=f"src{i}", chunker="auto", kind="full")
            contents[i] = db.read_bytes()
        await admin.forget(ids=old)
    finally:
        await closed(admin)
    return contents


def hide(location: Path, name: str, where: Path) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    (location / name).rename(where)


def test_a_dictionary_hidden_or_damaged_during_a_repack_costs_nothing(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """(A) hides, then damages, the dictionary of a source whose sparse packs prune is to
    repack: the repack cannot open their blobs, so prune refuses before it deletes or
    writes an index object (nothing under packs/ or index/ it read is gone, nothing is
    recompressed without the dictionary: the chunks cannot be opened). Put back, the
    prune runs, and the chunks keep their dictionary. Guards (a) and (d): the repack runs
    before every delete, whatever the dictionary path does."""

    async def main() -> None:
        new = await new_versions(repo, template, tmp_path, [0])
        was = ref_of_chunk(await blobs_of(repo))
        target = template.dicts[0]
        good = (repo / target).read_bytes()
        for attack in ("hidden", "damaged"):
            if attack == "hidden":
                hide(repo, target, tmp_path / "aside" / "dict")
            else:
                (repo / target).parent.mkdir(parents=True, exist_ok=True)
                (repo / target).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
            before = files(repo)
            with pytest.raises(DedupeError, match="dictionary"):
                await pruned(repo, repack_threshold=0.0)
            after = files(repo)
            lost = [n for n in before if n not in after and not n.startswith("dicts/")]
            assert lost == [], lost
            assert all(after[n] == before[n] for n in before if n in after)
        (repo / target).write_bytes(good)
        report = await pruned(repo, repack_threshold=0.0)
        assert report.packs_repacked > 0
        now = ref_of_chunk(await blobs_of(repo))
        assert all(now[c] == was[c] for c in now)
        got = await restored(repo, "src0@latest", tmp_path / "out0")
        assert got == new[0]
        await every_source_restores(repo, template, tmp_path, which=[1, 2])

    run_asyncio(main())


def test_dictionary_objects_moved_between_refs_never_reframe_a_chunk(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """(A) copies the object of source 1's dictionary under source 0's ref (beside the
    real one), and of source 0's under source 1's: no reader uses a copy whose content is
    not its ref's, so the repack opens with the real ones and frames every chunk with the
    dictionary its own blob named, never the decoy (c); the bytes restore (b). Then (A)
    replaces source 0's only object by the decoy: prune refuses, changing nothing."""

    async def main() -> None:
        new = await new_versions(repo, template, tmp_path, [0, 1])
        was = ref_of_chunk(await blobs_of(repo))
        d0, d1 = template.dicts[0], template.dicts[1]
        id0, id1 = d0.rsplit("/", 1)[-1], d1.rsplit("/", 1)[-1]
        decoy0, decoy1 = dict_name(ref_of(d0), id1), dict_name(ref_of(d1), id0)
        shutil.copyfile(repo / d1, repo / decoy0)
        shutil.copyfile(repo / d0, repo / decoy1)
        report = await pruned(repo, repack_threshold=0.0)
        assert report.packs_repacked > 0
        now = ref_of_chunk(await blobs_of(repo))
        assert now == {c: was[c] for c in now}
        assert (await restored(repo, "src0@latest", tmp_path / "a")) == new[0]
        assert (await restored(repo, "src1@latest", tmp_path / "b")) == new[1]
        # The real object of source 0 gone, only the decoy under its ref: refused.
        (repo / d0).unlink()
        await new_versions(repo, template, tmp_path, [0], version=3)
        before = files(repo)
        with pytest.raises(DedupeError, match="dictionary"):
            await pruned(repo, repack_threshold=0.0)
        assert files(repo) == before
        assert (await restored(repo, "src1@latest", tmp_path / "c")) == new[1]

    run_asyncio(main())


# =============================================================================================
# (B) a writer key holder
# =============================================================================================


def test_a_writers_pack_naming_five_dictionaries_stops_prune_before_it_deletes(
    run_asyncio: Run, template: Template, repo: Path, tmp_path: Path
) -> None:
    """(B) stores five dictionaries of its own and a pack whose blobs cycle through all
    five (good blobs: each opens to its chunk), with one blob no generation needs (the
    pack is sparse), then backs up a file of exactly those blocks (fixed:4096), which
    dedupes onto its pack: its chunks are live. Prune's repack opens the pack's range with
    open_as_stored, which refuses a fifth dictionary in one call, so prune fails, and
    fails before it deletes or replaces anything: no pack or index object of the admin's
    is gone, and every source restores. (Before the commit the repack refused it too;
    the guard is that the dictionary path did not move the refusal after a delete.)"""

    async def main() -> None:
        contents = [random.Random(700 + i).randbytes(32 * 1024) for i in range(5)]
        w1 = await opened(repo, WRITER_PW)
        try:
            store = w1._store
            made = [await write_raw_dictionary(store, c) for c in contents]
            pieces = [(i, j) for j in range(3) for i in range(5)]
            ids, blobs, raws = [], [], []
            for i, j in pieces:
                chunk = contents[i][j * 512 : j * 512 + PAGE]
                ids.append(store.hasher.chunk_id(chunk))
                frame = zstandard.ZstdCompressor(
                    level=1,
                    dict_data=zstandard.ZstdCompressionDict(
                        contents[i], dict_type=zstandard.DICT_TYPE_RAWCONTENT
                    ),
                    write_dict_id=False,
                ).compress(chunk)
                blobs.append(b"\x02" + made[i][1] + frame)
                raws.append(len(chunk))
            await seal_and_index(store, PyFramedBatch(ids, blobs, raws))
            live = pieces[:-1]  # the last piece is in no generation: the pack is sparse
            src = tmp_path / "blocks"
            src.write_bytes(b"".join(contents[i][j * 512 : j * 512 + PAGE] for i, j in live))
            await w1.backup(src, name="w1blocks", chunker="fixed:4096")
        finally:
            await closed(w1)
        before = files(repo)
        with pytest.raises(IntegrityError, match="after 4 others"):
            await pruned(repo, repack_threshold=0.0)
        after = files(repo)
        assert [n for n in before if n not in after] == []
        await every_source_restores(repo, template, tmp_path, which=[0, 3])

    run_asyncio(main())
