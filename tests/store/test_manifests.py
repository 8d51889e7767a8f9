"""Generation manifests in frames (docs/FORMAT.md section 8): written from a spill without
holding the table, read back exactly, and every way of cutting or mixing frames refused."""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import blake3
import pytest
import zstandard
from conftest import make_repo

import dedupe.store.repository as repository
from dedupe.crypto import new_key, seal
from dedupe.engine import run_backup
from dedupe.errors import IntegrityError, ScratchError, TruncatedObject, UnsupportedFormat
from dedupe.format.delta import PackedOps
from dedupe.format.keymap import GENERATION, KeyMapEntry
from dedupe.format.manifest import (
    CHUNK_RECORD,
    FRAME_LENGTH,
    FRAME_RECORDS,
    HEADER_AAD,
    RawJSON,
    encode_meta,
    encode_prefix,
    header_span,
    split_frames,
)
from dedupe.hashing import object_id
from dedupe.store import RepositoryStore
from dedupe.store.manifests import ManifestWriter
from dedupe.store.tables import SpilledTable

R = CHUNK_RECORD.size
HEADER = {
    "name": "db",
    "kind": "full",
    "parent": None,
    "created": "x",
    "size": 0,
    "chunks": 0,
    **{"new_chunks": 0, "new_bytes": 0, "stored_bytes": 0, "seconds": 0.0, "source": {}},
}


def records(n: int, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return b"".join(
        CHUNK_RECORD.pack(rng.randbytes(32), rng.randrange(1, 1 << 20)) for _ in range(n)
    )


def meta_for(table: bytes) -> dict[str, Any]:
    return {"type": "stream", "digest": "ab" * 32, "chunk_count": len(table) // R}


def frames_of(data: bytes) -> tuple[int, list[memoryview]]:
    """(where the body starts, its sealed frames) of a stored manifest."""
    _start, end = header_span(data, "g")
    return end, split_frames(memoryview(data)[end:], "g")


def gen_id_of(data: bytes) -> str:
    """A manifest's id: BLAKE3 of its prefix (magic, length, sealed header)."""
    _start, end = header_span(data, "g")
    return str(blake3.blake3(data[:end]).hexdigest())


async def with_frames(
    store: RepositoryStore, gen_id: str, data: bytes, frames: list[bytes | memoryview]
) -> str:
    """A new generation whose body is `frames` (sealed under `gen_id`'s body key) under a
    new header, authenticated by a key map entry that copies `gen_id`'s read-wrapped body
    key: what a writer key holder can make (it can sign entries and copy wrapped keys,
    but never open a body key). Only the frames' own authentication stands in the way."""
    end, _ = frames_of(data)
    body = b"".join(FRAME_LENGTH.pack(len(f)) + f for f in frames)
    header_key = new_key()
    header = json.dumps(dict(HEADER, version=3, body=object_id(body))).encode()
    prefix = encode_prefix(seal(header_key, header, HEADER_AAD))
    new_id = bytes.fromhex(str(blake3.blake3(prefix).hexdigest()))
    found = store.keymaps.get(GENERATION, bytes.fromhex(gen_id))
    assert found is not None
    current = store.current_epoch
    entry = KeyMapEntry(
        GENERATION,
        new_id,
        current.number,
        read_wrap=found.entry.read_wrap,
        meta_wrap=current.wrap_meta(header_key, GENERATION, new_id),
    )
    await store.keymaps.write([entry])
    return await put_as_is(store, prefix + body)


async def put_as_is(store: RepositoryStore, data: bytes) -> str:
    """Store bytes under the id of their prefix, as anyone with write access could."""
    gen_id = gen_id_of(data)
    await store.backend.put(f"generations/{gen_id}", data)
    return gen_id


def test_a_table_of_many_frames_round_trips(run: Callable[..., Any], repo_path: Path) -> None:
    n = 2 * FRAME_RECORDS + 7232
    table = records(n)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            with store.manifest_writer() as writer:
                # pieces that end inside, exactly at and across frame boundaries
                for lo, hi in [
                    (0, 1),
                    (1, FRAME_RECORDS),
                    (FRAME_RECORDS, FRAME_RECORDS + 5),
                    (FRAME_RECORDS + 5, n),
                ]:
                    writer.add(table[lo * R : hi * R])
                gen_id = await store.commit_manifest(writer, HEADER, meta_for(table))
            header, meta, got = await store.read_manifest(gen_id)
            assert got == table
            assert meta == meta_for(table)
            assert header["name"] == "db" and len(header["body"]) == 64
            data = await store.backend.get(f"generations/{gen_id}")
            assert gen_id_of(data) == gen_id
            assert len(frames_of(data)[1]) == 3 + 1  # three table frames, the meta frame

            empty = await store.write_manifest(HEADER, meta_for(b""), b"")
            assert (await store.read_manifest(empty))[2] == b""
            assert len(frames_of(await store.backend.get(f"generations/{empty}"))[1]) == 1

    run(go())


def _drop_second(fs: list[memoryview]) -> list[bytes | memoryview]:
    return [fs[0], *fs[2:]]


def _swap_first_two(fs: list[memoryview]) -> list[bytes | memoryview]:
    return [fs[1], fs[0], *fs[2:]]


def _without_meta(fs: list[memoryview]) -> list[bytes | memoryview]:
    return list(fs[:-1])


def _meta_twice(fs: list[memoryview]) -> list[bytes | memoryview]:
    return [*fs, fs[-1]]


def _flip_a_bit(fs: list[memoryview]) -> list[bytes | memoryview]:
    damaged = bytearray(fs[1])
    damaged[100] ^= 1
    return [fs[0], bytes(damaged), *fs[2:]]


@pytest.mark.parametrize(
    "tamper", [_drop_second, _swap_first_two, _without_meta, _meta_twice, _flip_a_bit]
)
def test_frames_cut_reordered_or_damaged_are_refused(
    run: Callable[..., Any], repo_path: Path, tamper: Callable[[list[memoryview]], list[Any]]
) -> None:
    table = records(3 * FRAME_RECORDS)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            gen_id = await store.write_manifest(HEADER, meta_for(table), table)
            data = await store.backend.get(f"generations/{gen_id}")
            _end, frames = frames_of(data)
            bad = await with_frames(store, gen_id, data, tamper(frames))
            with pytest.raises(IntegrityError, match=f"generation {bad}"):
                await store.read_manifest(bad)
            assert (await store.read_manifest(gen_id))[2] == table  # the original is intact
            # the helper itself makes readable manifests: the same frames, sealed again
            same = await with_frames(store, gen_id, data, list(frames))
            assert (await store.read_manifest(same))[2] == table

    run(go())


def test_a_body_under_another_manifests_header_is_refused(
    run: Callable[..., Any], repo_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            stored = []
            for table in (records(5), records(9, 1)):
                gen_id = await store.write_manifest(HEADER, meta_for(table), table)
                stored.append(await store.backend.get(f"generations/{gen_id}"))
            a, b = stored
            (a_end, _), (b_end, _) = frames_of(a), frames_of(b)
            # a real header (and so a real, authenticated id) with another body
            a_id = await put_as_is(store, a[:a_end] + b[b_end:])
            with pytest.raises(IntegrityError, match="does not belong to its header"):
                await store.read_manifest(a_id)
            await put_as_is(store, a[: a_end + 50])  # cut short
            with pytest.raises(IntegrityError):
                await store.read_manifest(a_id)
            with pytest.raises(TruncatedObject):
                split_frames(memoryview(a)[a_end : a_end + 6], "g")
            await put_as_is(store, a)
            assert (await store.read_manifest(a_id))[2] == records(5)

    run(go())


def test_a_manifest_of_an_earlier_format_version_is_refused_by_name(
    run: Callable[..., Any], repo_path: Path
) -> None:
    """No released repository holds version 1 or 2 manifests: none is read (FORMAT 12)."""

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            table = records(10)
            gen_id = await store.write_manifest(HEADER, meta_for(table), table)
            data = await store.backend.get(f"generations/{gen_id}")
            # an old manifest under the name of an authenticated one
            await store.backend.put(f"generations/{gen_id}", b"DDPGEN02" + data[8:])
            for read in (store.read_manifest, store.read_manifest_header):
                with pytest.raises((UnsupportedFormat, IntegrityError), match=gen_id):
                    await read(gen_id)
            assert gen_id not in [g.id for g in await repo.generations()]

    run(go())


def test_the_writer_holds_about_one_frame_whatever_the_table(
    run: Callable[..., Any], repo_path: Path
) -> None:
    """The bound the backup relies on: adding 12 MB of records in small batches (as the
    pipeline does) allocates a few frames' worth at most, not the table."""
    batches, per_batch = 330, 1000  # 330,000 records: 20 frames, 11.9 MB of table

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            store = repo._store
            with store.manifest_writer() as writer:
                tracemalloc.start()
                try:
                    for i in range(batches):
                        writer.add(os.urandom(per_batch * R))
                        if i == 0:
                            tracemalloc.reset_peak()
                    _now, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                table_bytes = batches * per_batch * R
                assert peak < 3 * 1024 * 1024 and 4 * peak < table_bytes, (peak, table_bytes)
                meta = {"type": "stream", "digest": "", "chunk_count": batches * per_batch}
                gen_id = await store.commit_manifest(writer, HEADER, meta)
            assert len((await store.read_manifest(gen_id))[2]) == table_bytes

    run(go())


class OnAFullDisk(ManifestWriter):
    """The spill on /dev/full, a real device whose every write fails with ENOSPC."""

    @staticmethod
    def _open_spill() -> BinaryIO:
        return open("/dev/full", "w+b")  # noqa: SIM115 - closed by ManifestWriter.close


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_scratch_disk_fails_the_backup_and_commits_nothing(
    run: Callable[..., Any], repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = os.urandom(200_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = (await repo.backup(io.BytesIO(source), name="db")).id
            with monkeypatch.context() as m:
                m.setattr(ManifestWriter, "_open_spill", staticmethod(OnAFullDisk._open_spill))
                with pytest.raises(ScratchError, match="No space left") as err:
                    await repo.backup(io.BytesIO(os.urandom(300_000)), name="db")
                assert err.value.hint and "TMPDIR" in err.value.hint
            assert [g.id for g in await repo.generations()] == [first]
            assert (await repo.verify(read_data=True)).ok
            again = (await repo.backup(io.BytesIO(source + b"more"), name="db")).id
            out = io.BytesIO()
            await repo.restore(again, out)
            assert out.getvalue() == source + b"more"

    run(go())


def test_a_scratch_directory_that_is_gone_is_a_clear_error_and_nothing_is_left(
    run: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    async def failing() -> Any:
        yield os.urandom(100_000)
        raise OSError(5, "Input/output error")

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.backup(io.BytesIO(os.urandom(100_000)), name="db")
            with pytest.raises(Exception, match="Input/output error"):
                await repo.backup(failing(), name="db")
            assert os.listdir(scratch) == []  # the spill never had a name, or lost it
            scratch.rmdir()
            with pytest.raises(ScratchError, match=str(scratch)):
                await repo.backup(io.BytesIO(b"x" * 1000), name="db")
            assert len(await repo.generations()) == 1

    run(go())


def test_an_incremental_and_a_full_are_stored_in_frames(
    run: Callable[..., Any], repo_path: Path
) -> None:
    """Both kinds of backup produce version 3 manifests whose tables read back as the
    chunks restore uses."""
    base = os.urandom(600_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(base), name="db", kind="full")
            incr = await repo.backup(
                io.BytesIO(base[:300_000] + os.urandom(5000) + base[300_000:]),
                name="db",
                kind="incremental",
            )
            store = repo._store
            for g in (full, incr):
                data = await store.backend.get(f"generations/{g.id}")
                assert data[:8] == b"DDPGEN03"
            _h, meta, own = await store.read_manifest(incr.id)
            assert meta["delta"]["parent"] == full.id
            assert 0 < len(own) // R < incr.chunks  # only the changed records are its own

    run(go())


def test_meta_with_text_spliced_in_is_what_json_writes_of_the_values() -> None:
    """encode_meta puts each RawJSON's text where the value would be, and nothing else:
    the same bytes as json.dumps of the meta with the values as Python objects, also when
    other strings of the meta look like the placeholder's shape."""
    ops = [[0, 5, 100], [1, 3], [0, 0, 7]]
    meta = {
        "type": "stream",
        "note": '"0123456789abcdef0123456789abcdef.0"',
        "delta": {"parent": "ab" * 32, "ops": RawJSON(json.dumps(ops).encode())},
        "more": [RawJSON(b"[]"), RawJSON(b'{"k": 1}')],
    }
    plain = dict(meta, delta={"parent": "ab" * 32, "ops": ops}, more=[[], {"k": 1}])
    assert encode_meta(meta) == json.dumps(plain, sort_keys=True).encode()
    assert encode_meta(plain) == json.dumps(plain, sort_keys=True).encode()
    with pytest.raises(TypeError, match="bytes"):
        encode_meta({"x": b"raw"})


def test_an_incremental_hands_its_ops_to_the_manifest_as_text(
    run: Callable[..., Any], repo_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An incremental's ops reach the manifest writer as the kernel's text, not as Python
    lists (~110 bytes an op: a 21 MiB jump at the end of a 4 GiB page file's incremental), and
    the manifest reads back with the ops the kernel made."""
    base = os.urandom(2_000_000)
    changed = bytearray(base)
    for at in range(50_000, 2_000_000, 100_000):  # 20 scattered changes: ~40 ops
        changed[at : at + 10] = os.urandom(10)
    seen: list[object] = []

    class Watching(ManifestWriter):
        def finish(self, header: dict[str, Any], meta: dict[str, Any]) -> str:
            seen.append(meta.get("delta", {}).get("ops"))
            return super().finish(header, meta)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            monkeypatch.setattr(repo._store, "manifest_writer", Watching)
            await repo.backup(io.BytesIO(base), name="db", kind="full")
            incr = await repo.backup(io.BytesIO(bytes(changed)), name="db", kind="incremental")
            _h, meta, _own = await repo._store.read_manifest(incr.id)
            assert seen[0] is None and isinstance(seen[1], RawJSON)
            assert json.loads(seen[1].text) == meta["delta"]["ops"]
            assert len(meta["delta"]["ops"]) >= 20

    run(go())


def test_the_readers_that_expand_deltas_hold_their_ops_packed(
    run: Callable[..., Any], repo_path: Path
) -> None:
    """spill_manifest, through which every reader that expands a chain reads its
    manifests, hands a stream delta's ops out as PackedOps, equal to the lists
    read_manifest gives."""
    base = os.urandom(2_000_000)
    changed = bytearray(base)
    for at in range(50_000, 2_000_000, 100_000):
        changed[at : at + 10] = os.urandom(10)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(base), name="db", kind="full")
            incr = await repo.backup(io.BytesIO(bytes(changed)), name="db", kind="incremental")
            store = repo._store
            _h, spilled, records = await store.spill_manifest(incr.id, io.BytesIO())
            _h, read, own = await store.read_manifest(incr.id)
            assert isinstance(spilled["delta"]["ops"], PackedOps)
            assert isinstance(read["delta"]["ops"], list) and len(read["delta"]["ops"]) >= 20
            assert spilled == read and records == len(own) // R

    run(go())


def test_a_parent_table_that_cannot_be_read_is_a_scratch_error(
    run: Callable[..., Any], repo_path: Path
) -> None:
    """The parent's spilled table shorter than its count (a scratch disk that lost
    data): the incremental fails with ScratchError and commits nothing."""

    async def source() -> Any:
        yield os.urandom(100_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(os.urandom(100_000)), name="db", kind="full")
            with tempfile.TemporaryFile() as short:
                short.write(records(2))
                short.flush()
                with pytest.raises(ScratchError, match="parent table"):
                    await run_backup(
                        repo._store,
                        source(),
                        name="db",
                        source_info={"type": "stream", "label": ""},
                        executor=repo._executor,
                        kind="incremental",
                        parent=(full.id, SpilledTable(short, 5, {})),
                    )
            assert [g.id for g in await repo.generations()] == [full.id]

    run(go())


def test_frames_are_decompressed_with_one_context_per_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """decompress_capped (every manifest frame, a few per link of a chain) makes one
    zstd decompression context per thread and reuses it, also after a frame that failed
    to decompress; another thread makes its own (a context is not thread-safe). The cap
    is still checked first, and a damaged frame is still an IntegrityError.

    Property: reading a chain makes no context per frame (~20 us each; fails when a
    context is made per call)."""
    real = zstandard.ZstdDecompressor
    made: list[int] = []

    def counting() -> Any:
        made.append(1)
        return real()

    monkeypatch.setattr(zstandard, "ZstdDecompressor", counting)
    monkeypatch.setattr(repository, "_local", threading.local())
    frame = zstandard.ZstdCompressor().compress(b"x" * 1000)
    for _ in range(5):
        assert repository.decompress_capped(frame, 1000, "f") == b"x" * 1000
    with pytest.raises(IntegrityError, match="more than 999"):
        repository.decompress_capped(frame, 999, "f")
    with pytest.raises(IntegrityError, match="does not decompress"):
        repository.decompress_capped(frame[:-3], 1000, "f")
    assert repository.decompress_capped(frame, 1000, "f") == b"x" * 1000
    assert len(made) == 1
    got: list[bytes] = []
    worker = threading.Thread(
        target=lambda: got.append(repository.decompress_capped(frame, 1000, "f"))
    )
    worker.start()
    worker.join()
    assert got == [b"x" * 1000] and len(made) == 2
