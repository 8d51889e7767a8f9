"""RepositoryStore: a repository's objects on a backend, opened with a key.

It owns the config, the opened keys and epochs, the in-memory chunk index and the cache of
unwrapped pack keys, and it reads and writes packs, index objects and manifests in the
order docs/FORMAT.md section 9 requires. It runs no pipelines: the engine does.
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime
from typing import Any, BinaryIO

import blake3
import zstandard

from dedupe.backends.base import Backend
from dedupe.chunking import DEFAULT_PARAMS, ChunkerParams, gear_table
from dedupe.crypto import (
    EpochKeys,
    KdfParams,
    RepositoryKeys,
    create_key_file,
    mac_hex,
    new_epoch,
    open_key_file,
    open_sealed,
    read_epoch_record,
    seal,
    verify_mac,
)
from dedupe.errors import (
    GenerationNotFound,
    IntegrityError,
    MissingObject,
    RepositoryExists,
    RepositoryNotFound,
    TruncatedObject,
    UnsupportedFormat,
    WrongPassphrase,
)
from dedupe.format.config import (
    DEFAULT_COMPRESSION_LEVEL,
    DEFAULT_PACK_SIZE,
    new_config,
    parse_config,
)
from dedupe.format.delta import apply_delta
from dedupe.format.index import (
    ENTRY_RECORD,
    INDEX_AAD,
    INDEX_MAGIC,
    PackRecord,
    decode_index_records,
    encode_index,
)
from dedupe.format.manifest import (
    BODY_AAD_PREFIX,
    BODY_PREFIX_SIZE,
    CHUNK_RECORD,
    FRAME_LENGTH,
    HEADER_AAD,
    HEADER_PROBE,
    decode_body_prefix,
    decode_body_v1,
    decode_meta,
    frame_aad,
    header_span,
    manifest_version,
    split_frames,
    split_manifest_v1,
)
from dedupe.hashing import ChunkHasher, object_id
from dedupe.store.blobs import BlobCodec
from dedupe.store.index import ChunkIndex
from dedupe.store.manifests import Buffer, ManifestWriter, write_scratch
from dedupe.store.packer import FinishedPack
from dedupe.store.quarantine import read_quarantine

# Pieces in which spill_manifest reads a manifest.
SPILL_PIECE = 1 << 20
MIN_PACK_SIZE = 4096  # tests shrink packs to a few KiB so small inputs make many packs


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _open_frame(data_key: bytes, sealed: Buffer, i: int, last: bool, what: str) -> bytes:
    """The payload of frame `i` of a version 2 manifest body; a table frame (all but the
    last) must hold whole chunk records."""
    plain: bytes = zstandard.ZstdDecompressor().decompress(
        open_sealed(data_key, sealed, frame_aad(i), f"{what}, frame {i}")
    )
    if not last and (not plain or len(plain) % CHUNK_RECORD.size):
        raise IntegrityError(f"{what}: a table frame does not hold whole chunk records")
    return plain


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


class RepositoryStore:
    def __init__(
        self,
        backend: Backend,
        config: dict[str, Any],
        keys: RepositoryKeys,
        epochs: dict[int, EpochKeys],
    ) -> None:
        self.backend = backend
        self.config = config
        self.keys = keys
        self.epochs = epochs
        self.repository_id = bytes.fromhex(config["id"])
        self.hasher = ChunkHasher(keys.id_key)
        self.chunker_params = ChunkerParams.from_dict(config["chunker"])
        self.gear = gear_table(keys.chunker_key)
        self.pack_size = int(config["pack_size"])
        self.codec = BlobCodec(int(config["compression"]["level"]), self.hasher)
        self.index = ChunkIndex()
        self._loaded_index_objects: set[str] = set()
        self.damaged_index_objects: dict[str, str] = {}  # name -> what is wrong
        self._pack_keys: dict[int, bytes] = {}

    @property
    def current_epoch(self) -> EpochKeys:
        return self.epochs[max(self.epochs)]

    # --- creating and opening -----------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        backend: Backend,
        passphrase: bytes,
        *,
        chunker: ChunkerParams | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        kdf: KdfParams | None = None,
    ) -> RepositoryStore:
        if pack_size < MIN_PACK_SIZE:
            raise ValueError(f"pack_size must be at least {MIN_PACK_SIZE} bytes")
        if not 1 <= compression_level <= 22:
            raise ValueError("compression_level must be within 1..22 (zstd levels)")
        if await backend.exists("config"):
            raise RepositoryExists(
                f"a repository already exists at {backend.location}",
                hint="choose another location, or use the existing repository",
            )
        keys = RepositoryKeys.generate()
        repository_id = os.urandom(32)
        config = new_config(
            repository_id,
            utc_now(),
            (chunker or DEFAULT_PARAMS).to_dict(),
            pack_size,
            compression_level,
        )
        config["mac"] = mac_hex(keys.meta_key, config)
        assert keys.epoch_master is not None
        record, epoch = new_epoch(1, keys.epoch_master, keys.meta_key)
        key_file = await asyncio.to_thread(
            create_key_file, keys, repository_id, passphrase, "default", kdf
        )
        # The config is written last: until it exists there is no repository here.
        await backend.put("keys/default", key_file)
        await backend.put("epochs/00000001", json.dumps(record, indent=2).encode())
        await backend.put("config", json.dumps(config, indent=2).encode() + b"\n")
        return cls(backend, config, keys, {1: epoch})

    @classmethod
    async def open(cls, backend: Backend, passphrase: bytes) -> RepositoryStore:
        try:
            raw_config = await backend.get("config")
        except MissingObject:
            raise RepositoryNotFound(
                f"no dedupe repository at {backend.location}",
                hint="check -r/--repo or DEDUPE_REPO, or create one with 'dedupe init'",
            ) from None
        config = parse_config(raw_config)
        repository_id = bytes.fromhex(config["id"])
        key_names = sorted(await backend.list("keys/"))
        if not key_names:
            raise IntegrityError("the repository has no key files: it cannot be opened")
        keys = None
        for name in key_names:
            data = await backend.get(name)
            try:
                keys = await asyncio.to_thread(open_key_file, data, repository_id, passphrase)
                break
            except WrongPassphrase:
                continue
        if keys is None:
            raise WrongPassphrase(
                "wrong passphrase: no key file of this repository opens with it",
                hint="check DEDUPE_PASSWORD / DEDUPE_PASSWORD_FILE / DEDUPE_PASSWORD_COMMAND",
            )
        if not verify_mac(keys.meta_key, config):
            raise IntegrityError(
                "the repository config failed its MAC: it was damaged or tampered with"
            )
        epochs = {}
        for name in sorted(await backend.list("epochs/")):
            try:
                record = json.loads(await backend.get(name))
            except ValueError:
                raise IntegrityError(f"epoch record {name} is not valid JSON") from None
            epoch = read_epoch_record(record, keys.meta_key, keys.epoch_master)
            epochs[epoch.number] = epoch
        if not epochs:
            raise IntegrityError("the repository has no key epochs: it cannot be used")
        store = cls(backend, config, keys, epochs)
        await store.refresh_index()
        return store

    # --- index ---------------------------------------------------------------------------------

    async def refresh_index(self, rebuild: bool = False) -> int:
        """Bring the in-memory index up to date with the index objects in the backend: load
        those written since the last refresh (by us or by concurrent backups), and start
        over when one we loaded is gone (a prune replaced it: its packs may be gone too,
        and pack numbers change). Returns how many index objects were loaded."""
        # Which packs exist decides which copy of a chunk is usable (ChunkIndex.add).
        present = {bytes.fromhex(n.rsplit("/", 1)[-1]) for n in await self.backend.list("packs/")}
        listed = set(await self.backend.list("index/"))
        if rebuild or not self._loaded_index_objects <= listed:
            self.index = ChunkIndex()
            self._loaded_index_objects = set()
            self.damaged_index_objects = {}
            self._pack_keys = {}
        self.index.set_present_packs(present)
        # So are quarantine records: set them before loading, so a good copy can win.
        self.index.quarantine(await read_quarantine(self.backend, self.keys.meta_key, strict=False))
        names = [n for n in listed if n not in self._loaded_index_objects]
        if not names:
            return 0
        sem = asyncio.Semaphore(4)

        async def load(name: str) -> None:
            # Each object goes into the table as soon as it is decoded, so at most a few
            # decoded objects are in memory at once, not the whole index twice.
            async with sem:
                data = await self.backend.get(name)
                try:
                    packs, records = await asyncio.to_thread(self._open_index_object, name, data)
                except (IntegrityError, UnsupportedFormat) as e:
                    # One damaged index object must not make the whole repository
                    # unreadable: its chunks count as not indexed (restores that need
                    # them fail and name them; verify reports the object).
                    self.damaged_index_objects[name] = e.message
                    return
                del data
                self.index.add_records(packs, records, f"index object {name}")
            self._loaded_index_objects.add(name)

        await asyncio.gather(*(load(n) for n in names))
        return len(names)

    def _open_index_object(self, name: str, data: bytes) -> tuple[list[PackRecord], memoryview]:
        """(pack table, entry records) of an index object, authenticated."""
        if object_id(data) != name.rsplit("/", 1)[-1]:
            raise IntegrityError(f"index object {name} does not match its name: it is damaged")
        if data[:8] != INDEX_MAGIC:
            raise UnsupportedFormat(f"index object {name} has an unknown magic")
        plain = open_sealed(self.keys.meta_key, data[8:], INDEX_AAD, f"index object {name}")
        return decode_index_records(
            zstandard.ZstdDecompressor().decompress(plain), f"index object {name}"
        )

    def _decode_index_object(
        self, name: str, data: bytes
    ) -> tuple[list[PackRecord], list[tuple[bytes, int, int, int, int]]]:
        """As _open_index_object, with the entries as tuples (prune walks them)."""
        packs, records = self._open_index_object(name, data)
        return packs, list(ENTRY_RECORD.iter_unpack(records))

    async def write_index(self, packs: list[PackRecord], records: bytes | bytearray) -> str:
        """Seal and store an index object listing `packs` and the entries `records`
        (ENTRY_RECORDs, pack numbers local to `packs`); then add them to the index."""
        records = bytes(records)  # the caller may go on changing its buffer

        def encode() -> bytes:
            plain = encode_index(packs, records)
            sealed = seal(
                self.keys.meta_key, zstandard.ZstdCompressor(level=3).compress(plain), INDEX_AAD
            )
            return INDEX_MAGIC + sealed

        data = await asyncio.to_thread(encode)
        name = f"index/{object_id(data)}"
        await self.backend.put(name, data)
        self._loaded_index_objects.add(name)
        self.index.note_written([p.pack_id for p in packs])
        self.index.add_records(packs, records, name)
        return name

    def pack_key(self, pack_no: int) -> bytes:
        """The data key of a pack, unwrapped once and cached."""
        key = self._pack_keys.get(pack_no)
        if key is None:
            record = self.index.packs[pack_no]
            epoch = self.epochs.get(record.epoch)
            if epoch is None:
                raise IntegrityError(
                    f"pack {record.pack_id.hex()} names key epoch {record.epoch}, which this "
                    "repository does not have"
                )
            key = self._pack_keys[pack_no] = epoch.unwrap(record.wrapped_key)
        return key

    # --- packs ---------------------------------------------------------------------------------

    async def write_pack(self, data: bytes | bytearray) -> bytes:
        pack_id = bytes.fromhex(await asyncio.to_thread(object_id, data))
        await self.backend.put(pack_name(pack_id), data)
        return pack_id

    async def write_finished_pack(
        self, pack: FinishedPack, packs: list[PackRecord], records: bytearray
    ) -> None:
        """Write a pack from a PackWriter and append its pack record to `packs` and its
        entries to `records` (ENTRY_RECORDs): the tables of the index object that will list
        it."""
        pack_id = await self.write_pack(pack.data)
        pack_no = len(packs)
        packs.append(PackRecord(pack_id, pack.epoch, pack.wrapped_key, len(pack.data)))
        pack_entry = ENTRY_RECORD.pack
        for chunk_id, offset, stored, raw in pack.entries():
            records += pack_entry(chunk_id, pack_no, offset, stored, raw)

    async def read_pack_range(self, pack_no: int, offset: int, into: memoryview) -> None:
        """Read len(into) bytes of pack `pack_no` from `offset` into `into`."""
        await self.backend.read_into(pack_name(self.index.packs[pack_no].pack_id), offset, into)

    # --- manifests -----------------------------------------------------------------------------

    def manifest_writer(self) -> ManifestWriter:
        """A writer for the next manifest, its body sealed under the current epoch. The
        caller adds the chunk table as it is produced and ends with commit_manifest."""
        return ManifestWriter(self.current_epoch, self.keys.meta_key)

    async def commit_manifest(
        self, writer: ManifestWriter, header: dict[str, Any], meta: dict[str, Any]
    ) -> str:
        """Seal and store a manifest: the commit point of a backup. Returns its id."""

        def finish() -> str:
            writer.finish(header, meta)
            return writer.object_id()

        gen_id = await asyncio.to_thread(finish)
        await self.backend.put_stream(f"generations/{gen_id}", writer.parts())
        return gen_id

    async def write_manifest(
        self, header: dict[str, Any], meta: dict[str, Any], chunk_table: bytes | bytearray
    ) -> str:
        """commit_manifest for a chunk table held in memory."""
        with self.manifest_writer() as writer:
            await asyncio.to_thread(writer.add, chunk_table)
            return await self.commit_manifest(writer, header, meta)

    async def generation_ids(self) -> list[str]:
        return [n.rsplit("/", 1)[-1] for n in await self.backend.list("generations/")]

    async def read_manifest_header(self, gen_id: str) -> dict[str, Any]:
        name = f"generations/{gen_id}"
        size = await self._stat_generation(gen_id)
        prefix = await self.backend.get(name, 0, min(size, HEADER_PROBE))
        start, end = header_span(prefix, f"generation {gen_id}")
        if end > len(prefix):
            prefix = await self.backend.get(name, 0, end)
        return self._open_header(prefix[start:end], gen_id)

    async def read_manifest(self, gen_id: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        """-> (header, body meta, chunk table) of a generation, all authenticated."""
        await self._stat_generation(gen_id)
        data = await self.backend.get(f"generations/{gen_id}")
        return await asyncio.to_thread(self._decode_manifest, gen_id, data)

    async def spill_manifest(
        self, gen_id: str, sink: BinaryIO
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """(header, body meta, record count) of a generation, its own chunk table written
        to `sink` (plain CHUNK_RECORDs) frame by frame as the object is read in pieces:
        at most a frame and a piece are in memory, however large the table. Everything
        read_manifest checks is checked, the object's id and the body's hash once all of
        it is read, so `sink` holds trustworthy records only when this returns."""
        what = f"generation {gen_id}"
        name = f"generations/{gen_id}"
        size = await self._stat_generation(gen_id)
        head = await self.backend.get(name, 0, min(size, HEADER_PROBE))
        if manifest_version(head, what) == 1:  # one sealed body: read it whole
            v1_header, v1_meta, table = await self.read_manifest(gen_id)
            await asyncio.to_thread(write_scratch, sink, table)
            return v1_header, v1_meta, len(table) // CHUNK_RECORD.size
        start, end = header_span(head, what)
        if end > len(head):
            head = await self.backend.get(name, 0, end)
        header = self._open_header(head[start:end], gen_id)
        whole, body = blake3.blake3(head[:end]), blake3.blake3()
        buf = bytearray()  # body bytes read and not yet taken as a frame
        pos = end
        data_key: bytes | None = None
        frame_no = records = 0
        meta: dict[str, Any] | None = None
        while pos < size:
            piece = await self.backend.get(name, pos, min(SPILL_PIECE, size - pos))
            pos += len(piece)
            whole.update(piece)
            body.update(piece)
            buf += piece
            if data_key is None:
                if len(buf) < BODY_PREFIX_SIZE:
                    continue
                epoch_no, wrapped = decode_body_prefix(buf, what)
                data_key = self._epoch(epoch_no, what).unwrap(wrapped)
                del buf[:BODY_PREFIX_SIZE]
            while len(buf) >= FRAME_LENGTH.size:
                (n,) = FRAME_LENGTH.unpack_from(buf)
                if len(buf) < FRAME_LENGTH.size + n:
                    break
                sealed = bytes(buf[FRAME_LENGTH.size : FRAME_LENGTH.size + n])
                del buf[: FRAME_LENGTH.size + n]
                last = pos == size and not buf  # the object ends here: the meta frame
                plain = _open_frame(data_key, sealed, frame_no, last, what)
                frame_no += 1
                if last:
                    meta = decode_meta(plain, what)
                else:
                    await asyncio.to_thread(write_scratch, sink, plain)
                    records += len(plain) // CHUNK_RECORD.size
        if whole.hexdigest() != gen_id:
            raise IntegrityError(f"{what} does not match its id: the manifest is damaged")
        if body.hexdigest() != header.get("body"):
            raise IntegrityError(f"{what}: its body does not belong to its header")
        if meta is None or buf:
            raise TruncatedObject(f"{what} is truncated: it ends inside a frame or has no meta")
        if records != int(meta["chunk_count"]):
            raise IntegrityError(f"{what}: chunk table does not match its count")
        return header, meta, records

    async def manifest_chain(self, gen_id: str) -> list[tuple[str, dict[str, Any], bytes]]:
        """[(id, body meta, own table)] from `gen_id` up its parent chain to the full.
        MissingObject when a generation of the chain is gone."""
        chain: list[tuple[str, dict[str, Any], bytes]] = []
        seen: set[str] = set()
        current: str | None = gen_id
        while current is not None:
            if current in seen:
                raise IntegrityError(f"generation {gen_id} has a cycle in its parent chain")
            seen.add(current)
            try:
                _header, meta, table = await self.read_manifest(current)
            except GenerationNotFound:
                raise MissingObject(
                    f"generation {current}, which {gen_id} is based on, is missing",
                    hint="the chain is broken; restore another generation",
                ) from None
            chain.append((current, meta, table))
            delta = meta.get("delta")
            current = str(delta["parent"]) if delta else None
        return chain

    async def generation_chunks(self, gen_id: str) -> tuple[dict[str, Any], bytes]:
        """(body meta, the generation's complete chunk table): every chunk its restore reads,
        in order, as CHUNK_RECORDs. Generations stored as a delta against a parent are
        expanded through their chain, so callers never see the difference."""
        chain = await self.manifest_chain(gen_id)
        own_meta = chain[0][1]
        if own_meta.get("type") == "tree":
            # A tree's complete table: its files' records in entry order (section 8.3).
            from dedupe.format.tree import expand

            metas = [(meta, table) for _gid, meta, table in reversed(chain)]
            _entries, expanded = await asyncio.to_thread(expand, metas, f"generation {gen_id}")
            return own_meta, expanded
        _, _, expanded = chain.pop()
        while chain:
            gid, meta, literal = chain.pop()
            expanded = await asyncio.to_thread(
                apply_delta, expanded, literal, meta["delta"]["ops"], f"generation {gid}"
            )
        return own_meta, expanded

    async def _stat_generation(self, gen_id: str) -> int:
        try:
            return await self.backend.stat(f"generations/{gen_id}")
        except MissingObject:
            raise GenerationNotFound(f"generation {gen_id} does not exist") from None

    def _open_header(self, sealed: bytes, gen_id: str) -> dict[str, Any]:
        plain = open_sealed(
            self.keys.meta_key, sealed, HEADER_AAD, f"header of generation {gen_id}"
        )
        header: dict[str, Any] = json.loads(plain)
        header["id"] = gen_id
        return header

    def _decode_manifest(
        self, gen_id: str, data: bytes
    ) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        what = f"generation {gen_id}"
        if object_id(data) != gen_id:
            raise IntegrityError(f"{what} does not match its id: the manifest is damaged")
        if manifest_version(data, what) == 1:
            return self._decode_manifest_v1(gen_id, data)
        start, end = header_span(data, what)
        header = self._open_header(data[start:end], gen_id)
        body = memoryview(data)[end:]
        if object_id(body) != header.get("body"):
            raise IntegrityError(f"{what}: its body does not belong to its header")
        epoch_no, wrapped, frames = split_frames(body, what)
        data_key = self._epoch(epoch_no, what).unwrap(wrapped)
        plains = [
            _open_frame(data_key, sealed, i, i == len(frames) - 1, what)
            for i, sealed in enumerate(frames)
        ]
        meta = decode_meta(plains.pop(), what)
        table = b"".join(plains)
        if len(table) != int(meta["chunk_count"]) * CHUNK_RECORD.size:
            raise IntegrityError(f"{what}: chunk table does not match its count")
        return header, meta, table

    def _decode_manifest_v1(
        self, gen_id: str, data: bytes
    ) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        what = f"generation {gen_id}"
        header_sealed, epoch_no, wrapped, body_sealed = split_manifest_v1(data, what)
        header = self._open_header(header_sealed, gen_id)
        data_key = self._epoch(epoch_no, what).unwrap(wrapped)
        aad = BODY_AAD_PREFIX + bytes.fromhex(object_id(header_sealed))
        body = zstandard.ZstdDecompressor().decompress(
            open_sealed(data_key, body_sealed, aad, what)
        )
        meta, table = decode_body_v1(body, what)
        return header, meta, table

    def _epoch(self, number: int, what: str) -> EpochKeys:
        epoch = self.epochs.get(number)
        if epoch is None:
            raise IntegrityError(f"{what} names key epoch {number}, which is unknown")
        return epoch
