"""Key maps on a backend (docs/FORMAT.md sections 4.5 and 4.6): the directory of every
accepted entry, the data keys it unwraps, and the writing and consolidation of key maps.

A key map entry is what makes a reader trust an object: the object's id, with its data
key wrapped for the epoch, signed by a key holder the admin-signed keyring lists, in a
role that may write that kind of object. `KeyDirectory` loads the key maps of the active
epochs, refuses (and records, by name and reason) any that fails a check, and answers
"is this object authenticated, and with which key does it open".

Contract: one directory per open repository; `refresh()` may run concurrently with
lookups (it only adds entries); `reset()` starts over after the keyring changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace

from dedupe.backends.base import Backend
from dedupe.crypto import EpochKeys, HolderSecrets, box_open, box_seal, sign, verify
from dedupe.crypto.signing import KEYMAP_DOMAIN
from dedupe.errors import (
    DedupeError,
    IntegrityError,
    KeyNotAvailable,
    MissingObject,
    UnsupportedFormat,
)
from dedupe.format.keymap import (
    DICTIONARY,
    DRILL,
    GENERATION,
    INDEX,
    KIND_NAMES,
    MAX_ENTRIES,
    MAX_KEYMAP_BYTES,
    PACK,
    QUARANTINE,
    SELF_WRAPPED,
    KeyMapEntry,
    decode_keymap,
    encode_unsigned,
    keymap_name,
    keymap_prefix,
    parse_keymap_name,
)
from dedupe.format.keyring import Keyring
from dedupe.hashing import object_id
from dedupe.store.cache import NoCache

LOAD_CONCURRENCY = 8
# Which kinds of entry each role may sign (docs/FORMAT.md 4.4).
ALLOWED_KINDS = {
    "admin": frozenset({PACK, INDEX, GENERATION, QUARANTINE, DRILL, DICTIONARY}),
    "writer": frozenset({PACK, INDEX, GENERATION, DICTIONARY}),
    "reader": frozenset({QUARANTINE, DRILL}),
}

Report = Callable[[str], None]


@dataclass(frozen=True)
class Found:
    """An accepted entry and the epoch of the key map that holds it."""

    epoch: int
    entry: KeyMapEntry
    keymap: str


def not_authenticated(what: str) -> IntegrityError:
    return IntegrityError(
        f"{what} is not authenticated: no accepted key map lists it, so no key holder of "
        "this repository wrote it (planted, forged, or of a retired key epoch)",
        hint="run 'dedupe verify' to list every such object; 'dedupe prune' removes them",
    )


class KeyDirectory:
    def __init__(
        self,
        backend: Backend,
        holder: HolderSecrets,
        keyring: Keyring,
        epochs: dict[int, EpochKeys],
        report: Report,
        cache: NoCache | None = None,
    ) -> None:
        self.backend = backend
        self.holder = holder
        self.report = report
        self.cache = cache or NoCache()
        self._cache_tidied = False
        # Set by the store: re-reads the keyring, True (and reset() done) if it changed.
        self.keyring_changed: Callable[[], Awaitable[bool]] | None = None
        self.reset(keyring, epochs)

    def reset(self, keyring: Keyring, epochs: dict[int, EpochKeys]) -> None:
        self.keyring = keyring
        self.epochs = epochs
        # Every accepted entry of every object, in load order: a key holder may sign an
        # entry for an object it did not write, with a key of its own, so no entry may
        # shadow another; readers try each distinct key (read_keys, meta_keys).
        self._by_kind: dict[int, dict[bytes, list[Found]]] = {k: {} for k in KIND_NAMES}
        self.loaded: set[str] = set()
        self.rejected: dict[str, str] = {}  # key map name -> why it was refused
        self._refreshing: asyncio.Lock | None = None

    @property
    def current(self) -> EpochKeys:
        return self.epochs[self.keyring.current_epoch]

    # --- reading -------------------------------------------------------------------------

    async def names(self, every_epoch: bool = False) -> list[str]:
        """Key maps of the active epochs (or, `every_epoch`, every object under keymaps/)."""
        if every_epoch:
            return await self.backend.list("keymaps/")
        names: list[str] = []
        for record in self.keyring.active_epochs:
            names += await self.backend.list(keymap_prefix(record.number))
        return names

    async def refresh(self) -> int:
        """Load the key maps written since the last refresh; returns how many were new."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            listed: dict[str, int] = {}
            for record in self.keyring.active_epochs:
                listed.update(await self.cache.listing(self.backend, keymap_prefix(record.number)))
            if not self._cache_tidied:  # once per open: consolidations elsewhere removed some
                self._cache_tidied = True
                self.cache.retain("keymaps/", listed)
            new = [n for n in listed if n not in self.loaded and n not in self.rejected]
            if not new:
                return 0
            # Key maps this holder accepted before (store/cache.py: written there only
            # after every check passed, under this holder's MAC) skip the signature check,
            # and are checked in one batch; the others are fetched and checked in full.
            cached = {
                n: data
                for n in new
                if (data := self.cache.read(n, listed[n], MAX_KEYMAP_BYTES)) is not None
            }
            for name, outcome in await asyncio.to_thread(self._accept_all, cached):
                self._record(name, outcome)
            sem = asyncio.Semaphore(LOAD_CONCURRENCY)

            async def load(name: str) -> None:
                async with sem:
                    try:
                        data = await self.backend.get_small(name, MAX_KEYMAP_BYTES)
                    except MissingObject:  # consolidated meanwhile: its entries are elsewhere
                        return
                    except IntegrityError as e:
                        self._record(name, e)
                        return
                    try:
                        outcome = await asyncio.to_thread(self.accept, name, data)
                    except (IntegrityError, UnsupportedFormat) as e:
                        self._record(name, e)
                        return
                    self._record(name, outcome)
                    self.cache.write(name, data, len(data))

            await asyncio.gather(*(load(n) for n in new if n not in cached))
            return len(new)

    def _accept_all(
        self, cached: dict[str, bytes]
    ) -> list[tuple[str, tuple[int, list[KeyMapEntry]] | DedupeError]]:
        outcomes: list[tuple[str, tuple[int, list[KeyMapEntry]] | DedupeError]] = []
        for name, data in cached.items():
            try:
                outcomes.append((name, self.accept(name, data, signature_checked=True)))
            except (IntegrityError, UnsupportedFormat) as e:
                outcomes.append((name, e))
        return outcomes

    def _record(self, name: str, outcome: tuple[int, list[KeyMapEntry]] | DedupeError) -> None:
        if isinstance(outcome, DedupeError):
            self.rejected[name] = outcome.message
            self.report(outcome.message)
            return
        epoch, entries = outcome
        self._add(name, epoch, entries)
        self.loaded.add(name)

    def accept(
        self, name: str, data: bytes, signature_checked: bool = False
    ) -> tuple[int, list[KeyMapEntry]]:
        """(epoch, entries) of a key map that passes every check of docs/FORMAT.md 4.5;
        IntegrityError (or UnsupportedFormat) naming it and the reason otherwise.
        `signature_checked`: this holder verified the signature of these very bytes
        before (its cache's MAC says so); every other check runs again, since they depend
        on the current keyring."""
        what = f"key map {name}"
        parsed = parse_keymap_name(name)
        if parsed is None:
            raise IntegrityError(f"{what} is not named as a key map")
        name_epoch, keymap_id = parsed
        if object_id(data) != keymap_id:
            raise IntegrityError(f"{what} does not hash to its name: it is damaged")
        km = decode_keymap(data, what)
        if km.epoch != name_epoch:
            raise IntegrityError(f"{what} is filed under epoch {name_epoch} but is for {km.epoch}")
        record = self.keyring.epoch(km.epoch)
        if record is None:
            raise IntegrityError(f"{what} is for key epoch {km.epoch}, which the keyring lacks")
        if not record.active:
            raise IntegrityError(
                f"{what} is for key epoch {km.epoch}, which was retired: refused (a key map "
                "of a retired epoch is never used again)"
            )
        signer = self.keyring.holder(km.signer)
        if signer is None:
            raise IntegrityError(
                f"{what} is signed by key {km.signer.hex()}, which is not in the keyring"
            )
        if not signature_checked and not verify(
            signer.sign_public,
            KEYMAP_DOMAIN,
            self.keyring.repository_id + km.signed,
            km.signature,
        ):
            raise IntegrityError(
                f"{what} fails the signature of key {km.signer.hex()}: forged or damaged"
            )
        allowed = ALLOWED_KINDS[signer.role]
        for e in km.entries:
            if e.kind not in allowed:
                raise IntegrityError(
                    f"{what} is signed by a {signer.role} key, which may not vouch for a "
                    f"{KIND_NAMES[e.kind]} ({e.object_id.hex()})"
                )
            # A writer's generation (or dictionary) carries its author: the writer itself
            # (docs/FORMAT.md 4.5), so that nobody can pass one off as another key's.
            if signer.role == "writer" and e.kind in SELF_WRAPPED and e.self_key != km.signer:
                raise IntegrityError(
                    f"{what}: a writer key vouches for {KIND_NAMES[e.kind]} "
                    f"{e.object_id.hex()} without naming itself as its author"
                )
        return km.epoch, km.entries

    def _add(self, name: str, epoch: int, entries: Iterable[KeyMapEntry]) -> None:
        for e in entries:
            found = self._by_kind[e.kind].setdefault(e.object_id, [])
            if not any(f.epoch == epoch and f.entry == e for f in found):
                found.append(Found(epoch, e, name))

    def get(self, kind: int, oid: bytes) -> Found | None:
        """The first accepted entry of an object (whether it is authenticated at all)."""
        found = self._by_kind[kind].get(oid)
        return found[0] if found else None

    def all(self, kind: int, oid: bytes) -> list[Found]:
        return list(self._by_kind[kind].get(oid, ()))

    async def find(self, kind: int, oid: bytes, what: str) -> list[Found]:
        """The accepted entries of an object; after a miss the key maps are listed again
        once (a concurrent writer may have just committed it), and after a second miss the
        keyring is read again (a rotation may have moved it to a new epoch). IntegrityError
        if none."""
        found = self.all(kind, oid)
        if not found:
            await self.refresh()
            found = self.all(kind, oid)
        if not found and self.keyring_changed is not None and await self.keyring_changed():
            await self.refresh()
            found = self.all(kind, oid)
        if not found:
            raise not_authenticated(what)
        return found

    def ids(self, kind: int) -> set[bytes]:
        return set(self._by_kind[kind])

    def entries(self, kind: int) -> dict[bytes, Found]:
        """Object id -> its first accepted entry, for every object of `kind`."""
        return {oid: found[0] for oid, found in self._by_kind[kind].items()}

    def authors(self, gen_id: bytes) -> set[bytes | None]:
        """Who wrote a generation, by its entries: a writer key's id, or None for an
        admin (readers write none). Several when keys disagree about it."""
        return {f.entry.self_key for f in self._by_kind[GENERATION].get(gen_id, ())}

    # --- unwrapping ------------------------------------------------------------------------

    def _epoch(self, found: Found, what: str) -> EpochKeys:
        keys = self.epochs.get(found.epoch)
        if keys is None:
            raise KeyNotAvailable(
                f"this key was not granted key epoch {found.epoch}, which {what} needs"
            )
        return keys

    def _distinct(self, keys: Iterable[bytes], what: str) -> list[bytes]:
        out = list(dict.fromkeys(keys))
        if not out:
            raise IntegrityError(f"no key map entry of {what} opens with this key's secrets")
        return out

    def read_keys(self, found: list[Found], what: str) -> list[bytes]:
        """The distinct data keys the entries' read_wraps hold (a pack's; a generation
        body's), to be tried in turn. A writer opens the body of a generation it wrote
        itself through its self-wrap."""
        keys: list[bytes] = []
        errors: list[DedupeError] = []
        for f in found:
            e = f.entry
            assert e.read_wrap is not None
            try:
                epoch = self._epoch(f, what)
                if epoch.read_secret is None:
                    if e.self_key == self.holder.key_id and e.self_wrap:
                        keys.append(
                            box_open(self.holder.box_secret, e.self_wrap, f"the data key of {what}")
                        )
                    continue
                keys.append(epoch.unwrap_read(e.read_wrap, what))
            except (IntegrityError, KeyNotAvailable) as err:
                errors.append(err)
        if not keys and self.epochs[self.keyring.current_epoch].read_secret is None:
            if found[0].entry.kind == GENERATION:
                raise KeyNotAvailable(
                    f"this writer key cannot open the body of {what}: another key wrote it",
                    hint="a writer opens only the generations it wrote itself",
                )
            raise KeyNotAvailable(f"this key cannot open {what}: a writer key opens no data")
        if not keys and errors:
            raise errors[0]
        return self._distinct(keys, what)

    def meta_keys(self, found: list[Found], what: str) -> list[bytes]:
        """The distinct data keys the entries' meta_wraps hold, to be tried in turn."""
        keys: list[bytes] = []
        errors: list[DedupeError] = []
        for f in found:
            e = f.entry
            assert e.meta_wrap is not None
            try:
                keys.append(
                    self._epoch(f, what).unwrap_meta(e.meta_wrap, e.kind, e.object_id, what)
                )
            except (IntegrityError, KeyNotAvailable) as err:
                errors.append(err)
        if not keys and errors:
            raise errors[0]
        return self._distinct(keys, what)

    # --- writing ---------------------------------------------------------------------------

    def pack_entry(self, pack_id: bytes, key: bytes) -> KeyMapEntry:
        c = self.current
        return KeyMapEntry(PACK, pack_id, c.number, read_wrap=c.wrap_read(key))

    def meta_entry(self, kind: int, oid: bytes, key: bytes) -> KeyMapEntry:
        c = self.current
        return KeyMapEntry(kind, oid, c.number, meta_wrap=c.wrap_meta(key, kind, oid))

    def _self_wrap(self, key: bytes) -> tuple[bytes | None, bytes | None]:
        """(self_key, self_wrap) of `key` for a writer key, which seals it to itself as
        well; (None, None) for the roles that read through the epoch."""
        if self.holder.role != "writer":
            return None, None
        return self.holder.key_id, box_seal(self.holder.box_public, key)

    def dictionary_entry(self, dict_id: bytes, key: bytes) -> KeyMapEntry:
        """Readers open a dictionary through the epoch; the writer key that made it also
        seals its key to itself, to compress its next backups with it (FORMAT 16)."""
        c = self.current
        self_key, self_wrap = self._self_wrap(key)
        return KeyMapEntry(
            DICTIONARY, dict_id, c.number, c.wrap_read(key), None, self_key, self_wrap
        )

    def generation_entry(self, gen_id: bytes, header_key: bytes, body_key: bytes) -> KeyMapEntry:
        """A writer key also seals the body key to itself, so that its incrementals can
        read their parents' tables; other roles read bodies through the epoch."""
        c = self.current
        self_key, self_wrap = self._self_wrap(body_key)
        return KeyMapEntry(
            GENERATION,
            gen_id,
            c.number,
            read_wrap=c.wrap_read(body_key),
            meta_wrap=c.wrap_meta(header_key, GENERATION, gen_id),
            self_key=self_key,
            self_wrap=self_wrap,
        )

    def encode(self, epoch: int, entries: list[KeyMapEntry], signer: HolderSecrets) -> bytes:
        unsigned = encode_unsigned(epoch, signer.key_id, entries)
        signature = sign(signer.sign_secret, KEYMAP_DOMAIN, self.keyring.repository_id + unsigned)
        return unsigned + signature

    async def write(
        self,
        entries: list[KeyMapEntry],
        epoch: int | None = None,
        signer: HolderSecrets | None = None,
    ) -> list[str]:
        """Sign and store `entries` as key maps (of at most MAX_ENTRIES each) of `epoch`
        (default: the current one) and add them to the directory. Returns their names."""
        epoch = self.keyring.current_epoch if epoch is None else epoch
        signer = signer or self.holder
        names: list[str] = []
        for start in range(0, len(entries), MAX_ENTRIES):
            part = entries[start : start + MAX_ENTRIES]
            data = await asyncio.to_thread(self.encode, epoch, part, signer)
            name = keymap_name(epoch, object_id(data))
            await self.backend.put(name, data)
            self.cache.write(name, data, len(data))
            names.append(name)
            self._add(name, epoch, part)
            self.loaded.add(name)
        return names

    # --- consolidation (docs/FORMAT.md 4.6) ------------------------------------------------

    def rewrap(self, found: Found, target: EpochKeys, keep_self: set[bytes]) -> KeyMapEntry:
        """`found`'s entry with its wraps for `target` (unchanged when it is the same
        epoch) and its self-wrap dropped unless its author is in `keep_self` (the author,
        `self_key`, stays)."""
        e = found.entry
        self_key, self_wrap = e.self_key, e.self_wrap
        if self_key is not None and self_key not in keep_self:
            self_wrap = None  # the author stays known; its way into the body goes
        if found.epoch == target.number:
            return replace(e, self_key=self_key, self_wrap=self_wrap)
        what = f"{KIND_NAMES[e.kind]} {e.object_id.hex()}"
        epoch = self._epoch(found, what)
        read_wrap = meta_wrap = None
        if e.read_wrap is not None:
            read_wrap = target.wrap_read(epoch.unwrap_read(e.read_wrap, what))
        if e.meta_wrap is not None:
            key = epoch.unwrap_meta(e.meta_wrap, e.kind, e.object_id, what)
            meta_wrap = target.wrap_meta(key, e.kind, e.object_id)
        return KeyMapEntry(e.kind, e.object_id, e.born, read_wrap, meta_wrap, self_key, self_wrap)

    async def consolidate(
        self,
        signer: HolderSecrets,
        target: EpochKeys,
        dropped: Callable[[int, bytes], bool] = lambda kind, oid: False,
        keep_self: set[bytes] | None = None,
    ) -> tuple[list[str], int]:
        """Rewrite every key map under keymaps/ as new key maps of `target`, signed by
        `signer` (an admin): every accepted entry, re-wrapped for `target`, but those of
        objects the caller deleted (`dropped`); self-wraps only for the key holders in
        `keep_self` (default: the keyring's); write them; only then delete every key map
        read, refused ones included (the caller made sure none vouches for something the
        keyring should know: `refused_for_newer_keys`). Entries of objects that merely
        cannot be seen now are kept: an object hidden during a rotation must not lose its
        key. Returns (names written, entries dropped because their keys no longer open)."""
        await self.refresh()
        old = await self.names(every_epoch=True)
        if keep_self is None:
            keep_self = {k.key_id for k in self.keyring.keys}
        entries: list[KeyMapEntry] = []
        failed = 0
        for kind in KIND_NAMES:
            for oid, found in sorted(self._by_kind[kind].items()):
                if dropped(kind, oid):
                    continue
                kept: list[KeyMapEntry] = []
                for f in found:
                    try:
                        e = await asyncio.to_thread(self.rewrap, f, target, keep_self)
                    except (IntegrityError, KeyNotAvailable) as err:
                        failed += 1
                        self.report(f"{err.message}; its key map entry is dropped")
                        continue
                    if e not in kept:
                        kept.append(e)
                entries += kept
        written = await self.write(entries, target.number, signer) if entries else []
        for name in old:
            if name in written:
                continue
            try:
                await self.backend.delete(name)
            except MissingObject:
                pass
        # What is in the backend now is exactly what was written.
        self._by_kind = {k: {} for k in KIND_NAMES}
        self.loaded, self.rejected = set(), {}
        for name, start in zip(written, range(0, len(entries), MAX_ENTRIES), strict=True):
            self._add(name, target.number, entries[start : start + MAX_ENTRIES])
            self.loaded.add(name)
        return written, failed

    async def refused_for_newer_keys(self) -> list[str]:
        """Key maps that this keyring refuses because they are of an epoch it does not
        know or signed by a key it does not list: what a keyring older than the
        repository (rolled back) sees. Deleting on its word would delete real data."""
        await self.refresh()
        suspicious = []
        known = {e.number for e in self.keyring.epochs}
        for name in await self.names(every_epoch=True):
            if name in self.loaded:
                continue
            parsed = parse_keymap_name(name)
            if parsed is not None and parsed[0] not in known:
                suspicious.append(f"{name} (of epoch {parsed[0]}, unknown to this keyring)")
                continue
            reason = self.rejected.get(name)
            if reason is None:
                try:
                    self.accept(name, await self.backend.get_small(name, MAX_KEYMAP_BYTES))
                    continue
                except MissingObject:
                    continue
                except (IntegrityError, UnsupportedFormat) as e:
                    reason = e.message
            if "which is not in the keyring" in reason or "which the keyring lacks" in reason:
                suspicious.append(f"{name} ({reason})")
        return suspicious


__all__ = ["ALLOWED_KINDS", "Found", "KeyDirectory", "not_authenticated"]
