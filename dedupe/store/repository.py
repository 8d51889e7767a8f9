"""RepositoryStore: a repository's objects on a backend, opened with a key.

It owns the config, the key holder's secrets, the keyring and the key directory (which
objects are authenticated, and with which data key they open), the in-memory chunk index
and the cache of unwrapped pack keys, and it reads and writes packs, index objects, key
maps and manifests in the order docs/FORMAT.md section 9 requires. It runs no pipelines:
the engine does.

Trust, in one line: the key file pins the admin verify key, which verifies the config and
the keyring, which lists the key holders, whose signatures make key maps acceptable, whose
entries name the objects a reader may use and wrap their keys. Anything else is refused by
name (docs/FORMAT.md section 4).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import blake3
import zstandard

from dedupe.backends.base import Backend
from dedupe.chunking import DEFAULT_PARAMS, ChunkerParams, gear_table
from dedupe.crypto import (
    EpochKeys,
    EpochSecrets,
    HolderSecrets,
    KdfParams,
    create_key_file,
    key_file_info,
    meta_check,
    new_key,
    open_key_file,
    open_sealed,
    seal_grant,
    sign_record,
    verify_record,
)
from dedupe.crypto.aead import OVERHEAD, seal_into
from dedupe.crypto.keyfile import MAX_KEY_FILE_BYTES
from dedupe.crypto.signing import CONFIG_DOMAIN
from dedupe.errors import (
    DedupeError,
    DictionaryUnusable,
    GenerationNotFound,
    IntegrityError,
    KeyNotAvailable,
    LocationNotEmpty,
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
    MAX_CONFIG_BYTES,
    new_config,
    parse_config,
)
from dedupe.format.delta import PackedOps, compose_chain, join_pieces
from dedupe.format.index import (
    INDEX_AAD,
    INDEX_MAGIC,
    PackRecord,
    decode_index_records,
    index_parts,
    max_plaintext,
)
from dedupe.format.keymap import (
    DICTIONARY,
    DRILL,
    GENERATION,
    INDEX,
    PACK,
    QUARANTINE,
    KeyMapEntry,
)
from dedupe.format.keyring import (
    ACTIVE,
    KEYRING_NAMES,
    MAX_KEYRING_BYTES,
    EpochRecord,
    KeyHolder,
    Keyring,
)
from dedupe.format.manifest import (
    CHUNK_RECORD,
    FRAME_LENGTH,
    HEADER_AAD,
    HEADER_PROBE,
    MAX_HEADER,
    MAX_META_FRAME,
    MAX_TABLE_FRAME,
    decode_header,
    decode_meta,
    frame_aad,
    header_span,
    split_frames,
)
from dedupe.format.pack import FOOTER_SIZE, TRAILER_AAD, decode_footer
from dedupe.hashing import ChunkHasher, object_id
from dedupe.store.blobs import BlobCodec, Dictionary
from dedupe.store.cache import NoCache
from dedupe.store.dictionaries import (
    DICT_PREFIX,
    MAX_DICT_OBJECT,
    REF_SIZE,
    decode_dictionary,
    dict_name,
    encode_dictionary,
    parse_dict_name,
)
from dedupe.store.drills import DRILL_PREFIX, MAX_DRILL_BYTES, decode_drill, encode_drill
from dedupe.store.index import ChunkIndex, entry_records
from dedupe.store.keymaps import KeyDirectory, not_authenticated
from dedupe.store.keyring import (
    check_and_record_serial,
    decode_keyring,
    open_epochs,
    read_keyring,
    unverified_key_ids,
    write_keyring,
)
from dedupe.store.manifests import Buffer, ManifestWriter, scratch_error
from dedupe.store.packer import FinishedPack
from dedupe.store.quarantine import (
    QUARANTINE_PREFIX,
    decode_quarantine,
    encode_quarantine,
    read_quarantine,
)

T = TypeVar("T")
log = logging.getLogger("dedupe")

# The longest a manifest's prefix (magic, length, sealed header) can be.
MAX_PREFIX = 12 + MAX_HEADER
# How many manifest headers are read at once when listing generations.
HEADER_CONCURRENCY = 16
# Manifests of a chain read at once ahead of its walk, when the store knows the parents
# from headers it has opened (parent_hint: a backup lists them all to find its parent).
CHAIN_AHEAD = 8
# Pieces in which spill_manifest reads a manifest.
SPILL_PIECE = 1 << 20
# Body bytes spill_manifest opens on the event loop's thread rather than a worker's (a
# thread's round trip costs ~0.1 ms, opening a frame of a few KiB a few microseconds),
# as long as what they decompress to stays within INLINE_PLAIN (a frame of repeated
# records compresses to almost nothing).
INLINE_FRAMES = 16 * 1024
INLINE_PLAIN = 256 * 1024
MIN_PACK_SIZE = 4096  # tests shrink packs to a few KiB so small inputs make many packs
KEYS_PREFIX = "keys/"
# How long a codec worker thread waits for a dictionary the event loop loads for it.
DICTIONARY_LOAD_SECONDS = 300
# Runs at a commit once the generation id is known, before anything is written; it may
# raise to refuse the commit (replication waits there for the sync replicas).
BeforeWrite = Callable[[str, dict[str, Any]], Awaitable[None]]


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def key_file_name(key_id: bytes) -> str:
    """A new name for a key file of `key_id` (docs/FORMAT.md section 3)."""
    return f"{KEYS_PREFIX}{key_id.hex()}-{secrets.token_hex(4)}"


def key_id_of(name: str) -> str:
    """The key id (hex) a key file's name carries."""
    return name.rsplit("/", 1)[-1].split("-", 1)[0]


_OBJECT_ID = re.compile("[0-9a-f]{64}")


def is_object_id(text: str) -> bool:
    """64 lowercase hex digits: how every object is named (docs/FORMAT.md section 3)."""
    return _OBJECT_ID.fullmatch(text) is not None


def named_ids(names: list[str]) -> dict[bytes, str]:
    """Object id -> name, for the names whose last component is an object id; anything
    else under an object prefix (a planted `packs/zz/x`) is no object of ours."""
    out = {}
    for n in names:
        last = n.rsplit("/", 1)[-1]
        if is_object_id(last):
            out[bytes.fromhex(last)] = n
    return out


_local = threading.local()  # a zstd decompression context per thread (~20 us to make one)


def decompress_capped(data: Buffer, cap: int, what: str) -> bytes:
    """One zstd frame whose recorded content size is at most `cap` bytes. The cap is
    checked before anything is decompressed: zstd trusts the recorded size."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what} is not a zstd frame: {e}") from None
    if size < 0:
        raise IntegrityError(f"{what} does not record its size")
    if size > cap:
        raise IntegrityError(f"{what} would decompress to {size} bytes, more than {cap}")
    try:
        dctx = getattr(_local, "dctx", None)
        if dctx is None:
            dctx = _local.dctx = zstandard.ZstdDecompressor()
        out: bytes = dctx.decompress(data, max_output_size=cap)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{what} does not decompress: {e}") from None
    return out


class _Defer(Exception):
    """A frame that would decompress to more than the caller's thread may take."""


def _open_frame(
    data_key: bytes, sealed: Buffer, i: int, last: bool, what: str, most: int | None = None
) -> bytes:
    """The payload of frame `i` of a manifest body; a table frame (all but the last) must
    hold whole chunk records, and no more than FRAME_RECORDS of them. With `most`: _Defer
    when its recorded size is larger (nothing decompressed)."""
    where = f"{what}, frame {i}"
    opened = open_sealed(data_key, sealed, frame_aad(i), where)
    if most is not None:
        try:
            size = zstandard.frame_content_size(opened)
        except zstandard.ZstdError:
            size = -1
        if size > most:
            raise _Defer
    plain = decompress_capped(opened, MAX_META_FRAME if last else MAX_TABLE_FRAME, where)
    if not last and (not plain or len(plain) % CHUNK_RECORD.size):
        raise IntegrityError(f"{what}: a table frame does not hold whole chunk records")
    return plain


def _opens(key: bytes, sealed: Buffer, aad: bytes) -> bool:
    try:
        open_sealed(key, sealed, aad, "probe")
    except IntegrityError:
        return False
    return True


def open_with_one(keys: list[bytes], sealed: Buffer, aad: bytes, what: str) -> bytearray:
    """Open `sealed` with the first of `keys` that opens it (the distinct keys an object's
    key map entries hold); the first key's error when none does."""
    for key in keys[1:]:
        if _opens(key, sealed, aad):
            return open_sealed(key, sealed, aad, what)
    return open_sealed(keys[0], sealed, aad, what)


def _first_frame(
    keys: list[bytes], sealed: Buffer, last: bool, what: str, most: int | None = None
) -> tuple[bytes, bytes]:
    """(the body key, the payload of frame 0): the first of `keys` that opens it."""
    for key in keys[1:]:
        if _opens(key, sealed, frame_aad(0)):
            return key, _open_frame(key, sealed, 0, last, what, most)
    return keys[0], _open_frame(keys[0], sealed, 0, last, what, most)


def _expand_stream(chain: list[tuple[str, dict[str, Any], bytes, dict[str, Any]]]) -> bytes:
    """The complete table of the last of `chain` (from its full up): each delta checked
    against the table below it and its header's count, the deltas composed
    (dedupe.format.delta.compose_chain), the records joined once."""
    for gid, meta, _table, _header in chain:
        # _check_meta checks each body's own type; a stream's chain must be streams all
        # the way down, as spill_complete_table (restore) requires: a stream delta over
        # a tree's table would be vouched for by verify and refused by restore.
        if meta.get("type") != "stream":
            raise IntegrityError(f"generation {gid} is not a stream generation")
    _gid, _meta, full, _header = chain[0]
    r = CHUNK_RECORD.size
    sources, pieces = compose_chain(
        full,
        len(full) // r,
        (
            (
                literal,
                meta["delta"]["ops"],
                len(literal) // r,
                int(header["chunks"]),
                f"generation {gid}",
            )
            for gid, meta, literal, header in chain[1:]
        ),
        join_pieces,
    )
    return join_pieces(sources, pieces)


class RecordSink(Protocol):
    """Where spill_manifest writes a manifest's own table: a binary file, or anything
    with its `write`."""

    def write(self, data: bytes, /) -> object: ...


class _BodyFrames:
    """The frames of a manifest body as spill_manifest reads it: `take` opens every
    whole frame at the start of `buf` (and removes it), writing table frames to `sink`
    and decoding the meta frame, the last of the object."""

    def __init__(self, keys: list[bytes], sink: RecordSink, what: str) -> None:
        self.keys, self.sink, self.what = keys, sink, what
        self.data_key: bytes | None = None  # the first frame tells which key is the body's
        self.frame_no = 0
        self.records = 0
        self.meta: dict[str, Any] | None = None

    def take(self, buf: bytearray, complete: bool, limit: int | None = None) -> bool:
        """`complete`: the object has been read to its end (its last bytes are in `buf`).
        With `limit`, stops after the frame that takes what the frames opened gave past
        `limit` bytes, and returns False: the rest is for another call (on a worker)."""
        what = self.what
        made = 0
        while len(buf) >= FRAME_LENGTH.size:
            (n,) = FRAME_LENGTH.unpack_from(buf)
            if len(buf) < FRAME_LENGTH.size + n:
                break
            sealed = bytes(buf[FRAME_LENGTH.size : FRAME_LENGTH.size + n])
            last = complete and len(buf) == FRAME_LENGTH.size + n  # the meta frame
            most = None if limit is None else max(limit - made, MAX_TABLE_FRAME)
            try:
                if self.data_key is None:
                    self.data_key, plain = _first_frame(self.keys, sealed, last, what, most)
                else:
                    plain = _open_frame(self.data_key, sealed, self.frame_no, last, what, most)
            except _Defer:
                return False  # left in `buf`, for a worker
            del buf[: FRAME_LENGTH.size + n]
            self.frame_no += 1
            if last:
                self.meta = _packed(decode_meta(plain, what))
            else:
                try:
                    self.sink.write(plain)
                except OSError as e:
                    raise scratch_error(e, "writing", "a") from None
                self.records += len(plain) // CHUNK_RECORD.size
            made += len(plain)
            if limit is not None and made > limit:
                return False
        return True


META_TYPES = ("stream", "tree")


def _packed(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with a stream delta's ops as PackedOps when they have the shape writers
    give them: 17 bytes an op where json.loads's lists take ~110, for as long as a reader
    holds the meta of a generation it expands (spill_manifest). Ops of any other shape
    stay as they are, for delta_ranges to refuse as before."""
    delta = meta.get("delta")
    if meta.get("type") == "stream" and isinstance(delta, dict):
        packed = PackedOps.of(delta.get("ops"))
        if packed is not None:
            delta["ops"] = packed
    return meta


def _check_meta(header: dict[str, Any], meta: dict[str, Any], what: str) -> None:
    """The body is of a type this version reads (FORMAT.md 8: a stream or a tree; any
    other would be read as a stream by the table readers, so that verify vouched for a
    generation restore refuses), and its delta names the parent its header names."""
    if meta.get("type") not in META_TYPES:
        raise UnsupportedFormat(
            f"{what} is of type {str(meta.get('type'))[:40]!r}, which this version does not read"
        )
    delta = meta.get("delta")
    if delta is not None and not isinstance(delta, dict):
        raise IntegrityError(f"{what}: malformed delta: not an object")
    ops = delta.get("ops") if delta is not None else None
    if delta is not None and meta["type"] == "stream" and not isinstance(ops, list | PackedOps):
        # Expanding it would stop the reader with a KeyError or TypeError, not a
        # DedupeError that verify reports.
        raise IntegrityError(f"{what}: malformed delta: its ops are not a list")
    parent = delta.get("parent") if delta is not None else None
    if parent != header.get("parent"):
        raise IntegrityError(f"{what}: its body and its header name different parents")


def pack_name(pack_id: bytes) -> str:
    h = pack_id.hex()
    return f"packs/{h[:2]}/{h}"


@dataclass
class IndexBatch:
    """Packs written and not yet listed by an index object: their records, their entries
    (ENTRY_RECORDs, pack numbers local to `packs`) and their key map entries."""

    packs: list[PackRecord] = field(default_factory=list)
    records: bytearray = field(default_factory=bytearray)
    keys: list[KeyMapEntry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.packs)


@dataclass(frozen=True)
class SealedIndex:
    name: str
    data: bytearray  # not copied into a bytes: it can be tens of MiB
    entry: KeyMapEntry


class RepositoryStore:
    def __init__(
        self,
        backend: Backend,
        config: dict[str, Any],
        holder: HolderSecrets,
        keyring: Keyring,
        epochs: dict[int, EpochKeys],
        cache: NoCache | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.holder = holder
        self.problems: list[str] = []
        # Local copies of key maps, index objects and manifest headers (store/cache.py).
        self.cache = cache or NoCache()
        self.keymaps = KeyDirectory(backend, holder, keyring, epochs, self.report, self.cache)
        self.repository_id = bytes.fromhex(config["id"])
        self.hasher = ChunkHasher(holder.id_key)
        self.chunker_params = ChunkerParams.from_dict(config["chunker"])
        self.gear = gear_table(holder.chunker_key)
        self.pack_size = int(config["pack_size"])
        self.codec = BlobCodec(int(config["compression"]["level"]), self.hasher)
        self.index = ChunkIndex()
        self._loaded_index_objects: set[str] = set()
        self.damaged_index_objects: dict[str, str] = {}  # name -> what is wrong
        self._pack_keys: dict[bytes, bytes] = {}  # pack id -> data key
        self._cache_tidied = False
        self._keys_refreshed = time.monotonic()  # the keyring was read just before
        # A lookup that misses after a key map refresh asks whether the keyring changed.
        self.keymaps.keyring_changed = self._reread_keyring
        # How long a command waits for a conflicting lock to go (RepositoryLock's `wait`).
        self.lock_wait = 0.0
        # The parent each generation header opened so far names (parent_hint).
        self._parents_seen: dict[str, str | None] = {}
        # Dictionaries being loaded, by ref (load_dictionary), and the loop that loads
        # them for the codec's worker threads.
        self._dict_loads: dict[bytes, asyncio.Future[Dictionary]] = {}
        # Refs found to have no usable dictionary, and why: each later blob that names one
        # fails at once (verify opens them one by one) until the next refresh_index.
        self._dict_failed: dict[bytes, IntegrityError] = {}
        # Dictionary objects that did not open as their name says, by name, until the next
        # operation: a reload (the codec's budget dropped the dictionary) then reads only
        # the object that serves the ref, not every copy planted beside it.
        self._dict_bad: dict[str, IntegrityError | KeyNotAvailable] = {}
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self.codec.loader = self._load_dictionary_from_thread
        # Worker threads waiting for a dictionary the loop loads (closing() wakes them).
        self._thread_waits: set[concurrent.futures.Future[Dictionary]] = set()
        self._closing = False

    @property
    def keyring(self) -> Keyring:
        return self.keymaps.keyring

    @property
    def epochs(self) -> dict[int, EpochKeys]:
        return self.keymaps.epochs

    @property
    def role(self) -> str:
        return self.holder.role

    @property
    def current_epoch(self) -> EpochKeys:
        return self.keymaps.current

    def report(self, message: str) -> None:
        """A problem found on the way that does not stop the operation (a damaged copy of
        the keyring, a refused key map, an unreadable quarantine record): logged once and
        kept in `problems`, which the API and the CLI show."""
        if message not in self.problems:
            self.problems.append(message)
            log.warning("%s", message)

    # --- creating and opening -----------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        backend: Backend,
        passphrase: bytes | Callable[[], bytes],
        *,
        chunker: ChunkerParams | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        kdf: KdfParams | None = None,
        cache: Callable[[HolderSecrets], NoCache] | None = None,
    ) -> RepositoryStore:
        if pack_size < MIN_PACK_SIZE:
            raise ValueError(f"pack_size must be at least {MIN_PACK_SIZE} bytes")
        if not 1 <= compression_level <= 22:
            raise ValueError("compression_level must be within 1..22 (zstd levels)")
        if not await backend.is_empty():
            if await backend.exists("config"):
                raise RepositoryExists(
                    f"a repository already exists at {backend.location}",
                    hint="choose another location, or use the existing repository",
                )
            raise LocationNotEmpty(
                f"{backend.location} is not empty: a repository needs a location of its own",
                hint="give a new or empty directory; nothing was written",
            )
        if callable(passphrase):  # asked for only once the location has proved usable
            passphrase = passphrase()
        repository_id = os.urandom(32)
        holder = HolderSecrets.first_admin(repository_id)
        assert holder.admin_sign is not None
        now = utc_now()
        epoch = EpochSecrets.generate(1)
        keyring = Keyring(
            repository_id=repository_id,
            serial=1,
            updated=now,
            keys=(
                KeyHolder(
                    holder.key_id, "default", "admin", now, holder.box_public, holder.sign_public
                ),
            ),
            epochs=(
                EpochRecord(
                    1,
                    now,
                    ACTIVE,
                    epoch.read_public,
                    meta_check(epoch.meta),
                    {
                        holder.key_id: seal_grant(
                            holder.box_public, repository_id, holder.key_id, epoch, True
                        )
                    },
                ),
            ),
            current_epoch=1,
        )
        config = sign_record(
            holder.admin_sign,
            CONFIG_DOMAIN,
            new_config(
                repository_id,
                now,
                (chunker or DEFAULT_PARAMS).to_dict(),
                pack_size,
                compression_level,
            ),
        )
        key_file = await asyncio.to_thread(create_key_file, holder, passphrase, "default", kdf)
        # The config is written last: until it exists there is no repository here.
        await backend.put(key_file_name(holder.key_id), key_file)
        await write_keyring(backend, keyring, holder.admin_sign)
        await backend.put("config", json.dumps(config, indent=2).encode() + b"\n")
        check_and_record_serial(repository_id, keyring)
        return cls(
            backend,
            config,
            holder,
            keyring,
            {1: epoch.keys()},
            cache(holder) if cache else None,
        )

    @classmethod
    async def open(
        cls,
        backend: Backend,
        passphrase: bytes | Callable[[], bytes],
        cache: Callable[[HolderSecrets], NoCache] | None = None,
    ) -> RepositoryStore:
        """Open the repository at `backend` with `passphrase`, or with what the callable
        returns: it is called once the config has shown that a repository is there, so
        that a wrong location is reported before anyone is asked for a passphrase.
        `cache`: makes the object cache for the key holder (default: none). The key
        maps are loaded here; the chunk index by the first operation that needs it
        (refresh_index), so that listing generations reads no index object."""
        try:
            raw_config = await backend.get_small("config", MAX_CONFIG_BYTES)
        except MissingObject:
            raise RepositoryNotFound(
                f"no dedupe repository at {backend.location}",
                hint="check -r/--repo or DEDUPE_REPO, or create one with 'dedupe init'",
            ) from None
        config = parse_config(raw_config)
        repository_id = bytes.fromhex(config["id"])
        if callable(passphrase):
            passphrase = passphrase()
        holder = await cls._open_key_file(backend, repository_id, passphrase)
        problems: list[str] = []
        if not verify_record(holder.admin_verify_key, CONFIG_DOMAIN, config):
            raise IntegrityError(
                "the repository config fails its admin signature: it was damaged or tampered "
                "with (someone may have changed the chunker or compression)",
                hint="restore the config object from a copy of the repository",
            )
        keyring = await read_keyring(
            backend, holder.admin_verify_key, repository_id, problems.append
        )
        check_and_record_serial(repository_id, keyring)
        epochs = open_epochs(holder, keyring, problems.append)
        store = cls(backend, config, holder, keyring, epochs, cache(holder) if cache else None)
        for p in problems:
            store.report(p)
        await store.keymaps.refresh()
        store._keys_refreshed = time.monotonic()
        return store

    @staticmethod
    async def _open_key_file(
        backend: Backend, repository_id: bytes, passphrase: bytes
    ) -> HolderSecrets:
        """The first key file that opens with `passphrase`, among those whose key id the
        keyring lists (read before it is verified, only to choose): a key file planted
        under another id, or left by an interrupted `key add`, costs no key derivation and
        is never used (docs/FORMAT.md 4.2). Every key file when no keyring copy parses."""
        names = sorted(await backend.list(KEYS_PREFIX))
        listings = await unverified_key_ids(backend)
        if listings:  # ids both copies list first: one forged copy must not block the other
            every, some = set.intersection(*listings), set.union(*listings)
            names = [n for n in names if key_id_of(n) in every] + [
                n for n in names if key_id_of(n) in some - every
            ]
        if not names:
            raise IntegrityError("the repository has no key files: it cannot be opened")
        damaged: list[str] = []
        other_repository = 0
        for name in names:
            try:
                data = await backend.get_small(name, MAX_KEY_FILE_BYTES)
            except IntegrityError as e:
                damaged.append(f"{name}: {e.message}")
                continue
            try:
                if key_file_info(data).repository != repository_id:
                    other_repository += 1
            except (IntegrityError, UnsupportedFormat):
                pass
            try:
                return await asyncio.to_thread(open_key_file, data, repository_id, passphrase)
            except WrongPassphrase:
                continue
            except (IntegrityError, UnsupportedFormat) as e:
                damaged.append(f"{name}: {e.message}")
        if other_repository == len(names):
            raise IntegrityError(
                f"the config names repository {repository_id.hex()}, but every key file "
                "belongs to another: the config was replaced",
                hint="restore the config object from a copy of the repository",
            )
        raise WrongPassphrase(
            "wrong passphrase: no key file of this repository opens with it",
            hint=(f"key files that could not be tried: {'; '.join(damaged)}; " if damaged else "")
            + "check DEDUPE_PASSWORD / DEDUPE_PASSWORD_FILE / DEDUPE_PASSWORD_COMMAND",
        )

    async def refresh_keys(self, max_age: float = 0.0) -> bool:
        """Re-read the keyring; when another process changed it (a rotation, a key added
        or removed), open this holder's grants again and start the key directory and the
        index over. Then load the key maps written meanwhile. True if the keyring changed.
        `max_age`: list the key maps only when the last listing (or the open) is older
        than this many seconds or the keyring changed; what was written since is still
        found, as every lookup that misses lists them again (KeyDirectory.find). The
        keyring is read every time (two small reads): a rollback is noticed at once."""
        changed = await self._reread_keyring()
        if not changed and max_age and time.monotonic() - self._keys_refreshed < max_age:
            return False
        await self.keymaps.refresh()
        self._keys_refreshed = time.monotonic()
        return changed

    async def _reread_keyring(self) -> bool:
        keyring = await read_keyring(
            self.backend, self.holder.admin_verify_key, self.repository_id, self.report
        )
        if keyring.serial == self.keyring.serial:
            return False
        check_and_record_serial(self.repository_id, keyring)
        self.keymaps.reset(keyring, open_epochs(self.holder, keyring, self.report))
        self._forget_index()
        return True

    async def heal_keyring(self) -> bool:
        """Make both keyring copies the verified newest one (after an interrupted key
        change or a damaged copy): its bytes are copied as they are, signature and all.
        Callers hold the exclusive lock. True if a copy was rewritten."""
        copies: dict[str, bytes | None] = {}
        for name in KEYRING_NAMES:
            try:
                copies[name] = await self.backend.get_small(name, MAX_KEYRING_BYTES)
            except (MissingObject, IntegrityError):
                copies[name] = None
        best = None
        for name, data in copies.items():
            if data is None:
                continue
            try:
                ring = decode_keyring(data, self.holder.admin_verify_key, self.repository_id, name)
            except (IntegrityError, UnsupportedFormat):
                continue
            if best is None or ring.serial > best[0]:
                best = (ring.serial, data)
        if best is None or best[0] != self.keyring.serial:
            return False  # nothing to copy, or the keyring changed under us: leave it
        healed = False
        for name, data in copies.items():
            if data != best[1]:
                await self.backend.put(name, best[1])
                healed = True
        return healed

    def use_keyring(self, keyring: Keyring, epochs: dict[int, EpochKeys]) -> None:
        """Adopt a keyring this process has just written (key commands)."""
        check_and_record_serial(self.repository_id, keyring)
        self.keymaps.keyring = keyring
        self.keymaps.epochs = epochs

    # --- index ---------------------------------------------------------------------------------

    def _forget_index(self) -> None:
        self.index = ChunkIndex()
        self._loaded_index_objects = set()
        self.damaged_index_objects = {}
        self._pack_keys = {}

    async def refresh_index(self, rebuild: bool = False, cached: bool = True) -> int:
        """Bring the in-memory index up to date with the index objects in the backend: load
        those written since the last refresh (by us or by concurrent backups), and start
        over when one we loaded is gone (a prune replaced it: its packs may be gone too,
        and pack numbers change). Index objects that are not authenticated or do not open
        are skipped and reported. `cached=False` reads every one from the backend, never
        from the local cache (repair judges what the store holds). Returns how many index
        objects were loaded."""
        # Listed before the key maps are: a writer stores an index object's key map first,
        # so every index object listed here has its entry in the key maps loaded below.
        index_sizes = await self.cache.listing(self.backend, "index/")
        listed = set(named_ids(list(index_sizes)).values())
        self._dict_failed.clear()  # an operation starts: look again
        self._dict_bad.clear()
        self._loop = asyncio.get_running_loop()  # the loop it runs on loads dictionaries
        if not self._cache_tidied:  # once per open: a prune elsewhere removed some
            self._cache_tidied = True
            self.cache.retain("index/", index_sizes)
        present = set(named_ids(await self.backend.list("packs/")))
        await self.refresh_keys()
        if rebuild or not self._loaded_index_objects <= listed:
            self._forget_index()
        self.index.set_present_packs(present)
        # So are quarantine records: set them before loading, so a good copy can win.
        self.index.quarantine(
            await read_quarantine(self.backend, self.open_quarantine, False, self.report)
        )
        names = [n for n in listed if n not in self._loaded_index_objects]
        if not names:
            return 0
        sem = asyncio.Semaphore(4)

        async def load(name: str) -> None:
            # Each object goes into the table as soon as it is decoded, so at most a few
            # decoded objects are in memory at once, not the whole index twice.
            async with sem:
                data = (
                    self.cache.read(name, index_sizes[name], index_sizes[name]) if cached else None
                )
                fetched = data is None
                try:
                    if data is None:
                        data = await self.backend.get(name)
                except MissingObject:
                    return  # replaced by a prune meanwhile
                try:
                    packs, records = await self.open_index_object(name, data)
                    # An authentic object can still be malformed (an entry naming a pack
                    # it does not list): the table refuses it whole, storing nothing.
                    self.index.add_records(packs, records, f"index object {name}")
                except (IntegrityError, UnsupportedFormat) as e:
                    # One bad index object must not make the whole repository unreadable:
                    # its chunks count as not indexed (restores that need them fail and
                    # name them; verify reports the object).
                    if self.damaged_index_objects.get(name) != e.message:
                        self.report(e.message)
                    self.damaged_index_objects[name] = e.message
                    return
                if fetched:  # kept once it proved to be what its key map entry vouches for
                    self.cache.write(name, data, len(data))
                del data
            self.damaged_index_objects.pop(name, None)
            self._loaded_index_objects.add(name)

        await asyncio.gather(*(load(n) for n in names))
        return len(names)

    async def open_index_object(
        self, name: str, data: bytes
    ) -> tuple[list[PackRecord], memoryview]:
        """(pack table, entry records) of an index object: its bytes checked against its
        name, its key map entry found, its key unwrapped, opened and decompressed (capped)."""
        what = f"index object {name}"
        oid = name.rsplit("/", 1)[-1]
        if await asyncio.to_thread(object_id, data) != oid:
            raise IntegrityError(f"{what} does not match its name: it is damaged")
        if data[:8] != INDEX_MAGIC:
            if data[:7] == INDEX_MAGIC[:7]:
                raise UnsupportedFormat(f"{what} is of another format version ({data[:8]!r})")
            raise IntegrityError(f"{what} has an unknown magic")
        keys = self.keymaps.meta_keys(
            await self.keymaps.find(INDEX, bytes.fromhex(oid), what), what
        )

        def decode() -> tuple[list[PackRecord], memoryview]:
            sealed = memoryview(data)[8:]
            plain = decompress_capped(
                open_with_one(keys, sealed, INDEX_AAD, what), max_plaintext(len(sealed)), what
            )
            return decode_index_records(plain, what)

        return await asyncio.to_thread(decode)

    def seal_index(self, packs: list[PackRecord], records: Buffer) -> SealedIndex:
        """An index object listing `packs` and `records`, sealed under a fresh key, and the
        key map entry that will authenticate it."""
        key = new_key()
        # The plaintext is compressed piece by piece (one frame that records its size) and
        # sealed straight into the object's buffer: prune's one index object of a million
        # entries then costs the records and twice its compressed size at the peak, not
        # also a joined plaintext and two more copies of the sealed bytes.
        # Level 1: the records are mostly chunk ids, which no level compresses, and level
        # 3's context took 1.7 MiB more than level 1's for a backup's index flush of
        # 32,768 entries, which lands at that backup's memory peak (stop 36).
        head, body = index_parts(packs, records)
        zc = zstandard.ZstdCompressor(level=1).compressobj(size=len(head) + len(body))
        compressed = b"".join((zc.compress(head), zc.compress(body), zc.flush()))
        data = bytearray(len(INDEX_MAGIC) + len(compressed) + OVERHEAD)
        data[: len(INDEX_MAGIC)] = INDEX_MAGIC
        seal_into(key, compressed, INDEX_AAD, data, len(INDEX_MAGIC))
        del compressed
        oid = object_id(data)
        return SealedIndex(
            f"index/{oid}", data, self.keymaps.meta_entry(INDEX, bytes.fromhex(oid), key)
        )

    async def write_index(
        self,
        packs: list[PackRecord],
        records: Buffer,
        keys: list[KeyMapEntry] | None = None,
        *,
        load: bool = True,
    ) -> str:
        """Store an index object listing `packs` and the entries `records` (ENTRY_RECORDs,
        pack numbers local to `packs`), after the key map that authenticates it and the
        packs whose key map entries are `keys`; then add them to the in-memory index,
        unless `load` is False (prune, which reloads the whole index afterwards: adding a
        million entries to the index it is about to drop would hold both at once).

        `records` is read, not copied (a copy was a backup's flush twice over at its
        memory peak, and prune's million entries twice): the caller leaves it unchanged
        until this returns."""
        sealed = await asyncio.to_thread(self.seal_index, packs, records)
        await self.keymaps.write([*(keys or []), sealed.entry])
        await self._put_index(sealed, packs, records, load)
        return sealed.name

    async def write_batch(self, batch: IndexBatch) -> str:
        return await self.write_index(batch.packs, batch.records, batch.keys)

    async def _put_index(
        self, sealed: SealedIndex, packs: list[PackRecord], records: Buffer, load: bool = True
    ) -> None:
        await self.backend.put(sealed.name, sealed.data)
        self.cache.write(sealed.name, sealed.data, len(sealed.data))
        if not load:
            return
        self._loaded_index_objects.add(sealed.name)
        self.index.note_written([p.pack_id for p in packs])
        self.index.add_records(packs, records, sealed.name)

    async def pack_key(self, pack_no: int) -> bytes:
        """The data key of a pack, from its key map entries, unwrapped once and cached."""
        return await self.pack_key_of(self.index.packs[pack_no].pack_id)

    async def pack_key_of(self, pack_id: bytes) -> bytes:
        key = self._pack_keys.get(pack_id)
        if key is None:
            what = f"pack {pack_id.hex()}"
            keys = self.keymaps.read_keys(await self.keymaps.find(PACK, pack_id, what), what)
            if len(keys) > 1:  # entries disagree (a key holder signed its own): ask the pack
                trailer = await self.pack_trailer(pack_id)
                keys = [k for k in keys if _opens(k, trailer, TRAILER_AAD)] or keys[:1]
            key = self._pack_keys[pack_id] = keys[0]
        return key

    async def pack_trailer(self, pack_id: bytes) -> bytes:
        """The sealed trailer of a pack: its size, then its footer, then the trailer."""
        name = pack_name(pack_id)
        size = await self.backend.stat(name)
        footer = await self.backend.get(name, max(0, size - FOOTER_SIZE), min(size, FOOTER_SIZE))
        length = decode_footer(size, footer, f"pack {pack_id.hex()}")
        return await self.backend.get(name, size - FOOTER_SIZE - length, length)

    async def open_quarantine(self, name: str, data: bytes) -> list[tuple[bytes, bytes, str]]:
        """(chunk id, pack id, reason) triples of a quarantine record, authenticated by its
        key map entries (IntegrityError naming it otherwise)."""
        what = f"quarantine record {name}"
        return await self._open_meta_record(QUARANTINE, name, data, decode_quarantine, what)

    async def write_quarantine(self, chunks: list[tuple[bytes, bytes, str]]) -> str:
        """Store a quarantine record of (chunk id, pack id, reason) triples under a fresh
        key, after the key map entry that authenticates it. Returns its name."""
        key = new_key()
        return await self._write_meta_record(
            QUARANTINE, QUARANTINE_PREFIX, key, encode_quarantine(key, utc_now(), chunks)
        )

    async def open_drill(self, name: str, data: bytes) -> dict[str, Any]:
        """A drill record (docs/FORMAT.md 15), authenticated by its key map entries."""
        return await self._open_meta_record(DRILL, name, data, decode_drill, f"drill record {name}")

    async def write_drill(self, record: dict[str, Any]) -> str:
        """Store a drill record under a fresh key, after the key map entry that
        authenticates it. Returns its name."""
        key = new_key()
        return await self._write_meta_record(DRILL, DRILL_PREFIX, key, encode_drill(key, record))

    async def read_drills(self, report: Callable[[str], None]) -> list[tuple[str, dict[str, Any]]]:
        """(name, record) of every drill record that is authenticated and readable; each
        one that is not is passed to `report` and left out (it is no evidence)."""
        found = []
        # Records are immutable: the local cache keeps them (FORMAT.md 3.1), so a status
        # run fetches only the ones made since the last. A cached copy is authenticated
        # through its key map entries like a fetched one.
        sizes = await self.cache.listing(self.backend, DRILL_PREFIX)
        self.cache.retain(DRILL_PREFIX, sizes)
        for name in sorted(sizes):
            try:
                data = self.cache.read(name, sizes[name], MAX_DRILL_BYTES)
                if data is None:
                    data = await self.backend.get_small(name, MAX_DRILL_BYTES)
                    self.cache.write(name, data, len(data))
                found.append((name, await self.open_drill(name, data)))
            except MissingObject:  # removed meanwhile (prune)
                continue
            except (IntegrityError, UnsupportedFormat) as e:
                report(f"{e.message}: it is not taken as a drill")
        return found

    async def _open_meta_record(
        self, kind: int, name: str, data: bytes, decode: Callable[[bytes, str, bytes], T], what: str
    ) -> T:
        """A small record sealed under a key that its key map entries (of `kind`) wrap for
        every key holder: each distinct key is tried until one opens it."""
        last = name.rsplit("/", 1)[-1]
        if not is_object_id(last):
            raise IntegrityError(f"{what} is not named by an object id")
        keys = self.keymaps.meta_keys(
            await self.keymaps.find(kind, bytes.fromhex(last), what), what
        )
        errors: list[IntegrityError] = []
        for key in keys:
            try:
                return await asyncio.to_thread(decode, key, name, data)
            except IntegrityError as e:
                errors.append(e)
        raise errors[0]

    async def _write_meta_record(self, kind: int, prefix: str, key: bytes, data: bytes) -> str:
        oid = object_id(data)
        await self.keymaps.write([self.keymaps.meta_entry(kind, bytes.fromhex(oid), key)])
        name = f"{prefix}{oid}"
        await self.backend.put(name, data)
        self.cache.write(name, data, len(data))  # a drill record: immutable (3.1)
        return name

    # --- dictionaries (docs/FORMAT.md 16) ---------------------------------------------------

    async def write_dictionary(
        self, dictionary: bytes, *, register: bool = True
    ) -> tuple[str, Dictionary]:
        """Store a dictionary under a fresh key, after the key map entry that authenticates
        it, and (`register`) give it to the codec. IntegrityError, and nothing stored,
        when zstd refuses it. Returns its id and its handle."""
        ref = self.hasher.chunk_id(dictionary)[:REF_SIZE]
        handle = Dictionary(ref, dictionary)
        await asyncio.to_thread(handle.check)
        key = new_key()
        data = await asyncio.to_thread(encode_dictionary, key, dictionary)
        dict_id = object_id(data)
        await self.keymaps.write([self.keymaps.dictionary_entry(bytes.fromhex(dict_id), key)])
        await self.backend.put(dict_name(ref, dict_id), data)
        if register:
            self.codec.add_dictionary(handle)
        return dict_id, handle

    async def open_dictionary(self, name: str, ref: bytes, dict_id: str) -> bytes:
        """The content of dictionary object `name`, checked as FORMAT.md 16 says: its
        entry, its size, its bytes against its name, its AEAD, its content against its
        ref. A failure is remembered by name until the next refresh_index."""
        if name in self._dict_bad:
            raise self._dict_bad[name]
        try:
            return await self._open_dictionary(name, ref, dict_id)
        except (IntegrityError, KeyNotAvailable) as e:
            self._dict_bad[name] = e
            raise

    async def _open_dictionary(self, name: str, ref: bytes, dict_id: str) -> bytes:
        plain = await self.open_dictionary_object(name, dict_id)
        if self.hasher.chunk_id(plain)[:REF_SIZE] != ref:
            raise IntegrityError(
                f"dictionary {dict_id} does not hold the dictionary its name refers to"
            )
        return plain

    async def open_dictionary_object(
        self, name: str, dict_id: str, data: bytes | None = None
    ) -> bytes:
        """The content of dictionary object `name` (its bytes `data`, read here when not
        given), opened under a key of its key map entries: its bytes against its name and
        its AEAD, not its ref (open_dictionary checks that; prune asks what it is).
        KeyNotAvailable when no entry is for this key, IntegrityError otherwise."""
        what = f"dictionary {dict_id}"
        keys = self.keymaps.read_keys(
            await self.keymaps.find(DICTIONARY, bytes.fromhex(dict_id), what), what
        )
        if data is None:
            data = await self.backend.get_small(name, MAX_DICT_OBJECT)
        errors: list[IntegrityError] = []
        for key in keys:
            try:
                return await asyncio.to_thread(decode_dictionary, key, name, data)
            except IntegrityError as e:
                errors.append(e)
        raise errors[0] if errors else KeyNotAvailable(f"no key of this repository opens {what}")

    async def load_dictionary(self, ref: bytes) -> Dictionary:
        """The usable dictionary of `ref`, given to the codec; loaded once however many
        ask at once, and again only if the codec has dropped it since (blobs.DICT_BUDGET:
        the codec, not the store, holds what is loaded). IntegrityError when no stored
        dictionary of that ref is usable (missing, not authenticated, damaged, not for
        this key), or when two usable ones differ (remembered until refresh_index)."""
        if ref in self._dict_failed:
            raise self._dict_failed[ref]
        loading = self._dict_loads.get(ref)
        if loading is None:
            loading = self._dict_loads[ref] = asyncio.ensure_future(self._load_dictionary(ref))
        try:
            return await asyncio.shield(loading)
        finally:
            # Done (loaded, failed or cancelled): a later need loads afresh.
            if loading.done() and self._dict_loads.get(ref) is loading:
                del self._dict_loads[ref]

    async def _load_dictionary(self, ref: bytes) -> Dictionary:
        names = await self.backend.list(f"{DICT_PREFIX}{ref.hex()}/")
        candidates = {}
        for name in sorted(names):
            parsed = parse_dict_name(name)
            if parsed is not None and parsed[0] == ref:
                candidates[name] = bytes.fromhex(parsed[1])

        def vouched() -> list[str]:
            return [n for n, oid in candidates.items() if self.keymaps.get(DICTIONARY, oid)]

        # Only objects a key map vouches for are read: a planted one costs a name in the
        # listing, not a read (nor a reload of the key maps each).
        trusted = vouched()
        if not trusted and candidates:
            await self.keymaps.refresh()  # a concurrent writer's, committed since
            trusted = vouched()
        found: dict[bytes, str] = {}
        problems = [f"{n} is not authenticated" for n in candidates if n not in trusted][:3]
        for name in trusted:
            try:
                plain = await self.open_dictionary(name, ref, name.rsplit("/")[-1])
                await asyncio.to_thread(Dictionary(ref, plain).check)  # refused: remembered
                found.setdefault(plain, name)
            except (IntegrityError, KeyNotAvailable) as e:
                problems.append(e.message)
        what = f"compression dictionary {ref.hex()}"
        if not found or len(found) > 1:
            why = "; ".join(problems) if problems else "the repository has none"
            if found:
                why = f"{', '.join(sorted(found.values()))} differ"
            failed = self._dict_failed[ref] = DictionaryUnusable(f"no usable {what}: {why}")
            raise failed
        handle = Dictionary(ref, next(iter(found)))
        self.codec.add_dictionary(handle)
        return handle

    def _load_dictionary_from_thread(self, ref: bytes) -> Dictionary:
        """load_dictionary for the codec, which meets a blob's ref in a worker thread:
        runs the load on the store's event loop and waits for it. On the loop's own
        thread it cannot wait, and says so (the blob then counts as unreadable)."""
        loop = self._loop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if loop is None or on_loop or loop.is_closed() or self._closing:
            raise DictionaryUnusable(
                f"compression dictionary {ref.hex()} is not loaded, and cannot be from here"
            )
        future = asyncio.run_coroutine_threadsafe(self.load_dictionary(ref), loop)
        self._thread_waits.add(future)
        try:
            return future.result(timeout=DICTIONARY_LOAD_SECONDS)
        except TimeoutError:
            future.cancel()
            raise DictionaryUnusable(
                f"compression dictionary {ref.hex()} did not load in {DICTIONARY_LOAD_SECONDS} s"
            ) from None
        except concurrent.futures.CancelledError:
            raise DictionaryUnusable(
                f"compression dictionary {ref.hex()} was not loaded: the repository is closing"
            ) from None
        finally:
            self._thread_waits.discard(future)

    def closing(self) -> None:
        """The handle is being closed: worker threads waiting for a dictionary stop
        waiting (the loop may be about to wait for them), and none waits from now on."""
        self._closing = True
        for future in list(self._thread_waits):
            future.cancel()

    async def dictionary_by_id(self, dict_id: str) -> Dictionary | None:
        """For a backup: the dictionary `dict_id` (which an earlier generation's header
        names), given to the codec, if it exists and this key can open it (a writer opens
        only its own); None otherwise. Every object of that id is tried: a copy of it put
        under another ref fails its ref check, and must not hide the real one."""
        for name in await self.backend.list(DICT_PREFIX):
            parsed = parse_dict_name(name)
            if parsed is None or parsed[1] != dict_id:
                continue
            try:
                plain = await self.open_dictionary(name, parsed[0], dict_id)
                handle = Dictionary(parsed[0], plain)
                self.codec.add_dictionary(handle)
            except (IntegrityError, KeyNotAvailable) as e:
                log.info("not compressing with dictionary %s: %s", name, e.message)
                continue
            return handle
        return None

    # --- packs ---------------------------------------------------------------------------------

    async def write_pack(self, data: bytes | bytearray) -> bytes:
        pack_id = bytes.fromhex(await asyncio.to_thread(object_id, data))
        await self.backend.put(pack_name(pack_id), data)
        return pack_id

    async def write_finished_pack(self, pack: FinishedPack, batch: IndexBatch) -> None:
        """Write a pack from a PackWriter and add it to `batch`: its record, its entries
        and its key map entry, for the index object that will list it."""
        pack_id = await self.write_pack(pack.data)
        pack_no = len(batch.packs)
        batch.packs.append(PackRecord(pack_id, len(pack.data)))
        batch.keys.append(self.keymaps.pack_entry(pack_id, pack.key))
        batch.records += entry_records(pack.records, pack_no)

    async def read_pack_range(self, pack_no: int, offset: int, into: memoryview) -> None:
        """Read len(into) bytes of pack `pack_no` from `offset` into `into`."""
        await self.backend.read_into(pack_name(self.index.packs[pack_no].pack_id), offset, into)

    # --- manifests -----------------------------------------------------------------------------

    def manifest_writer(self) -> ManifestWriter:
        """A writer for the next manifest. The caller adds the chunk table as it is
        produced and ends with commit_manifest."""
        return ManifestWriter()

    async def commit_manifest(
        self,
        writer: ManifestWriter,
        header: dict[str, Any],
        meta: dict[str, Any],
        batch: IndexBatch | None = None,
        before_write: BeforeWrite | None = None,
    ) -> str:
        """Seal and store a manifest: the commit point of a backup. The packs of `batch`
        (written, not yet indexed) get their index object; one key map authenticates them,
        that index object and the manifest, and is stored first. `before_write(gen_id,
        header)` runs before any of it is written, and may raise to store none of it.
        Returns the id."""
        gen_id = await asyncio.to_thread(writer.finish, header, meta)
        if before_write is not None:
            await before_write(gen_id, header)
        entries = list(batch.keys) if batch else []
        sealed = None
        if batch:
            sealed = await asyncio.to_thread(self.seal_index, batch.packs, batch.records)
            entries.append(sealed.entry)
        entries.append(
            self.keymaps.generation_entry(bytes.fromhex(gen_id), writer.header_key, writer.body_key)
        )
        await self.keymaps.write(entries)
        if sealed is not None and batch is not None:
            await self._put_index(sealed, batch.packs, batch.records)
        await self.backend.put_stream(f"generations/{gen_id}", writer.parts())
        self.cache.write(f"generations/{gen_id}", writer.prefix, writer.size)
        return gen_id

    async def write_manifest(
        self, header: dict[str, Any], meta: dict[str, Any], chunk_table: bytes | bytearray
    ) -> str:
        """commit_manifest for a chunk table held in memory."""
        with self.manifest_writer() as writer:
            await asyncio.to_thread(writer.add, chunk_table)
            return await self.commit_manifest(writer, header, meta)

    async def generation_ids(self) -> list[str]:
        return [oid.hex() for oid in named_ids(await self.backend.list("generations/"))]

    async def generation_headers(self) -> list[tuple[str, dict[str, Any] | DedupeError]]:
        """Every generation the backend lists, with its authenticated header or the error
        that kept it from opening (GenerationNotFound when it was forgotten meanwhile).
        A header comes from the cache when its copy there is intact: one listing, and no
        request per generation; the others are read HEADER_CONCURRENCY at a time."""
        sizes = await self.cache.listing(self.backend, "generations/")
        named = named_ids(list(sizes))
        ids = [oid.hex() for oid in named]
        self.cache.retain("generations/", sizes)
        result: dict[str, dict[str, Any] | DedupeError] = {}
        missed: list[str] = []
        for oid, name in named.items():
            gen_id = oid.hex()
            cached = self._cached_prefix(gen_id, sizes[name])
            if cached is None:
                missed.append(gen_id)
                continue
            try:
                result[gen_id] = await self._open_header(gen_id, cached)
            except (IntegrityError, UnsupportedFormat) as e:
                result[gen_id] = e
        sem = asyncio.Semaphore(HEADER_CONCURRENCY)

        async def read(gen_id: str) -> None:
            async with sem:
                try:
                    result[gen_id] = await self.read_manifest_header(gen_id)
                except (GenerationNotFound, IntegrityError, UnsupportedFormat) as e:
                    result[gen_id] = e

        await asyncio.gather(*(read(g) for g in missed))
        return [(gen_id, result[gen_id]) for gen_id in ids]

    def _cached_prefix(self, gen_id: str, size: int) -> memoryview | None:
        """The sealed header of a generation the store just listed or stated with `size`
        bytes, from its cached prefix, if intact."""
        head = self.cache.read(f"generations/{gen_id}", size, MAX_PREFIX)
        if head is None:
            return None
        try:
            start, end = header_span(head, f"generation {gen_id}")
        except (IntegrityError, UnsupportedFormat):
            return None
        return memoryview(head)[start:end] if end == len(head) else None

    async def _prefix(self, gen_id: str, size: int) -> tuple[bytes, int, int]:
        """(prefix, header start, header end) of a manifest, checked against its id."""
        what = f"generation {gen_id}"
        name = f"generations/{gen_id}"
        head = await self.backend.get(name, 0, min(size, HEADER_PROBE))
        start, end = header_span(head, what)
        if end > size:
            raise TruncatedObject(f"{what} is truncated inside its header")
        if end > len(head):
            head = await self.backend.get(name, 0, end)
        if blake3.blake3(memoryview(head)[:end]).hexdigest() != gen_id:
            raise IntegrityError(f"{what} does not match its id: the manifest is damaged")
        return head, start, end

    async def _open_header(self, gen_id: str, sealed: Buffer) -> dict[str, Any]:
        what = f"generation {gen_id}"
        found = await self.keymaps.find(GENERATION, bytes.fromhex(gen_id), what)
        keys = self.keymaps.meta_keys(found, what)
        header = decode_header(
            bytes(open_with_one(keys, sealed, HEADER_AAD, f"header of {what}")), what
        )
        header["id"] = gen_id
        self._parents_seen[gen_id] = header["parent"]
        return header

    def parent_hint(self, gen_id: str) -> str | None:
        """The parent named by the header of `gen_id` if this handle has opened it (a
        listing opens every header), else None. A hint to read a chain's manifests
        ahead, concurrently: each manifest read still names its own parent, and that is
        what a chain is walked by."""
        return self._parents_seen.get(gen_id)

    def can_open_body(self, gen_id: str) -> bool:
        """Whether this key can open the generation's body (readers and admins always; a
        writer only for the generations it wrote itself, through their self-wraps)."""
        for f in self.keymaps.all(GENERATION, bytes.fromhex(gen_id)):
            keys = self.epochs.get(f.epoch)
            if keys is None:
                continue
            if keys.read_secret is not None:
                return True
            if f.entry.self_key == self.holder.key_id and f.entry.self_wrap is not None:
                return True
        return False

    def written_by_me(self, gen_id: str) -> bool:
        """Whether this key's own role wrote the generation, by its entries (FORMAT 4.5):
        a writer its own, an admin an admin's. A backup chains only onto such a parent,
        whose chunk table and file entries it trusts without reading the data again."""
        mine = self.holder.key_id if self.holder.role == "writer" else None
        return self.keymaps.authors(bytes.fromhex(gen_id)) == {mine}

    def _body_keys(self, gen_id: str) -> list[bytes]:
        what = f"generation {gen_id}"
        found = self.keymaps.all(GENERATION, bytes.fromhex(gen_id))
        if not found:  # _open_header found it first
            raise not_authenticated(what)
        return self.keymaps.read_keys(found, what)

    async def read_manifest_header(self, gen_id: str) -> dict[str, Any]:
        """The authenticated header of a generation, from one short read (none when the
        cache holds its prefix)."""
        size = await self._stat_generation(gen_id)
        cached = self._cached_prefix(gen_id, size)
        if cached is not None:
            return await self._open_header(gen_id, cached)
        head, start, end = await self._prefix(gen_id, size)
        self.cache.write(f"generations/{gen_id}", memoryview(head)[:end], size)
        return await self._open_header(gen_id, memoryview(head)[start:end])

    async def read_manifest(self, gen_id: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        """-> (header, body meta, chunk table) of a generation, all authenticated."""
        size = await self._stat_generation(gen_id)
        head, start, end = await self._prefix(gen_id, size)
        header = await self._open_header(gen_id, memoryview(head)[start:end])
        keys = self._body_keys(gen_id)
        data = await self.backend.get(f"generations/{gen_id}")
        return await asyncio.to_thread(self._decode_body, gen_id, header, keys, data, end)

    def _decode_body(
        self, gen_id: str, header: dict[str, Any], keys: list[bytes], data: bytes, end: int
    ) -> tuple[dict[str, Any], dict[str, Any], bytes]:
        what = f"generation {gen_id}"
        if blake3.blake3(memoryview(data)[:end]).hexdigest() != gen_id:
            raise IntegrityError(f"{what} changed while it was read")
        body = memoryview(data)[end:]
        if object_id(body) != header.get("body"):
            raise IntegrityError(f"{what}: its body does not belong to its header")
        frames = split_frames(body, what)
        key, first = _first_frame(keys, frames[0], len(frames) == 1, what)
        plains = [first] + [
            _open_frame(key, sealed, i, i == len(frames) - 1, what)
            for i, sealed in enumerate(frames)
            if i
        ]
        meta = decode_meta(plains.pop(), what)
        table = b"".join(plains)
        if len(table) != int(meta["chunk_count"]) * CHUNK_RECORD.size:
            raise IntegrityError(f"{what}: chunk table does not match its count")
        _check_meta(header, meta, what)
        return header, meta, table

    async def spill_manifest(
        self, gen_id: str, sink: RecordSink
    ) -> tuple[dict[str, Any], dict[str, Any], int]:
        """(header, body meta, record count) of a generation, its own chunk table written
        to `sink` (plain CHUNK_RECORDs) frame by frame as the object is read in pieces:
        at most a frame and a piece are in memory, however large the table. Everything
        read_manifest checks is checked, the body's hash once all of it is read, so `sink`
        holds trustworthy records only when this returns.

        The frames of each piece are opened in one go: on a worker thread, or, when the
        piece holds at most INLINE_FRAMES bytes (the whole body of a day's incremental,
        usually), on the caller's, which a thread's round trip would cost more than (up
        to INLINE_PLAIN bytes of plain frames; the rest goes on on a worker)."""
        what = f"generation {gen_id}"
        name = f"generations/{gen_id}"
        size = await self._stat_generation(gen_id)
        head, start, end = await self._prefix(gen_id, size)
        header = await self._open_header(gen_id, memoryview(head)[start:end])
        frames = _BodyFrames(self._body_keys(gen_id), sink, what)
        body = blake3.blake3()
        buf = bytearray(memoryview(head)[end:])  # body bytes read and not yet taken as a frame
        body.update(buf)
        pos = len(head)
        while True:
            if len(buf) > INLINE_FRAMES or not frames.take(buf, pos == size, INLINE_PLAIN):
                await asyncio.to_thread(frames.take, buf, pos == size)
            if pos >= size:
                break
            piece = await self.backend.get(name, pos, min(SPILL_PIECE, size - pos))
            pos += len(piece)
            body.update(piece)
            buf += piece
        if body.hexdigest() != header.get("body"):
            raise IntegrityError(f"{what}: its body does not belong to its header")
        meta = frames.meta
        if meta is None or buf:
            raise TruncatedObject(f"{what} is truncated: it ends inside a frame or has no meta")
        if frames.records != int(meta["chunk_count"]):
            raise IntegrityError(f"{what}: chunk table does not match its count")
        _check_meta(header, meta, what)
        return header, meta, frames.records

    async def manifest_chain(
        self, gen_id: str
    ) -> list[tuple[str, dict[str, Any], bytes, dict[str, Any]]]:
        """[(id, body meta, own table, header)] from `gen_id` up its parent chain to the
        full. MissingObject when a generation of the chain is gone."""

        async def read(g: str) -> tuple[str, dict[str, Any], bytes, dict[str, Any]]:
            header, meta, table = await self.read_manifest(g)
            return g, meta, table, header

        return await self.walk_chain(
            gen_id, read, lambda link: link[1], "the chain is broken; restore another generation"
        )

    async def walk_chain(
        self,
        gen_id: str,
        read: Callable[[str], Awaitable[T]],
        meta_of: Callable[[T], dict[str, Any]],
        hint: str,
        discard: Callable[[T], None] = lambda _link: None,
    ) -> list[T]:
        """`read` of every generation from `gen_id` up its parent chain to the full, in
        that order. The walk follows the parent each manifest's body meta (`meta_of`)
        names, which read_manifest and spill_manifest check against its authenticated
        header; generations whose headers this handle has opened (parent_hint) are read
        ahead of it, CHAIN_AHEAD at once. MissingObject (with `hint`) when a generation
        of the chain is gone, IntegrityError on a cycle. `discard` releases what a read
        holds: every read's when the walk fails, and a read ahead that it did not take."""
        links: list[T] = []
        seen: set[str] = set()
        reading: dict[str, asyncio.Future[T]] = {}
        try:
            current: str | None = gen_id
            while current is not None:
                if current in seen:
                    raise IntegrityError(f"generation {gen_id} has a cycle in its parent chain")
                seen.add(current)
                ahead: str | None = current
                for _ in range(CHAIN_AHEAD):
                    if ahead is None or (ahead in seen and ahead != current):
                        break
                    if ahead not in reading:
                        reading[ahead] = asyncio.ensure_future(read(ahead))
                    ahead = self.parent_hint(ahead)
                try:
                    # Left in `reading` until its result is had: a cancellation that
                    # lands as it completes leaves it to the clean-up below.
                    link = await reading[current]
                    del reading[current]
                except GenerationNotFound:
                    del reading[current]
                    raise MissingObject(
                        f"generation {current}, which {gen_id} is based on, is missing",
                        hint=hint,
                    ) from None
                links.append(link)
                delta = meta_of(link).get("delta")
                current = str(delta["parent"]) if delta else None
        except BaseException:
            for link in links:
                discard(link)
            raise
        finally:  # reads ahead that the walk did not take (it failed first)

            def let_go(task: asyncio.Future[T]) -> None:
                if not task.cancelled() and task.exception() is None:
                    discard(task.result())

            for task in reading.values():
                task.cancel()
                task.add_done_callback(let_go)  # at once if done; else when it ends
            # Let them end; a second cancellation may cut this short, not the discards.
            await asyncio.gather(*reading.values(), return_exceptions=True)
        return links

    async def generation_chunks(self, gen_id: str) -> tuple[dict[str, Any], bytes]:
        """(body meta, the generation's complete chunk table): every chunk its restore reads,
        in order, as CHUNK_RECORDs. Generations stored as a delta against a parent are
        expanded through their chain, so callers never see the difference."""
        chain = await self.manifest_chain(gen_id)
        own_meta = chain[0][1]
        if own_meta.get("type") == "tree":
            # A tree's complete table: its files' records in entry order (section 8.3).
            from dedupe.format.tree import expand

            metas = [(meta, table) for _gid, meta, table, _h in reversed(chain)]
            _entries, expanded = await asyncio.to_thread(expand, metas, f"generation {gen_id}")
            return own_meta, expanded
        return own_meta, await asyncio.to_thread(_expand_stream, chain[::-1])

    async def _stat_generation(self, gen_id: str) -> int:
        try:
            bytes.fromhex(gen_id)
        except ValueError:
            raise GenerationNotFound(f"{gen_id!r} is not a generation id") from None
        try:
            return await self.backend.stat(f"generations/{gen_id}")
        except MissingObject:
            raise GenerationNotFound(f"generation {gen_id} does not exist") from None
