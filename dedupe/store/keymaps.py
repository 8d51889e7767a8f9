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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from dedupe.backends.base import Backend
from dedupe.crypto import EpochKeys, HolderSecrets, box_open, box_seal, sign, verify
from dedupe.crypto.signing import KEYMAP_DOMAIN
from dedupe.errors import IntegrityError, KeyNotAvailable, MissingObject, UnsupportedFormat
from dedupe.format.keymap import (
    GENERATION,
    INDEX,
    KIND_NAMES,
    MAX_ENTRIES,
    PACK,
    QUARANTINE,
    KeyMapEntry,
    decode_keymap,
    encode_unsigned,
    keymap_name,
    keymap_prefix,
    parse_keymap_name,
)
from dedupe.format.keyring import Keyring
from dedupe.hashing import object_id

LOAD_CONCURRENCY = 8
# Which kinds of entry each role may sign (docs/FORMAT.md 4.4).
ALLOWED_KINDS = {
    "admin": frozenset({PACK, INDEX, GENERATION, QUARANTINE}),
    "writer": frozenset({PACK, INDEX, GENERATION}),
    "reader": frozenset({QUARANTINE}),
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
    ) -> None:
        self.backend = backend
        self.holder = holder
        self.report = report
        self.reset(keyring, epochs)

    def reset(self, keyring: Keyring, epochs: dict[int, EpochKeys]) -> None:
        self.keyring = keyring
        self.epochs = epochs
        self._by_kind: dict[int, dict[bytes, Found]] = {k: {} for k in KIND_NAMES}
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
            new = [n for n in await self.names() if n not in self.loaded and n not in self.rejected]
            if not new:
                return 0
            sem = asyncio.Semaphore(LOAD_CONCURRENCY)

            async def load(name: str) -> None:
                async with sem:
                    try:
                        data = await self.backend.get(name)
                    except MissingObject:  # consolidated meanwhile: its entries are elsewhere
                        return
                    try:
                        epoch, entries = await asyncio.to_thread(self.accept, name, data)
                    except (IntegrityError, UnsupportedFormat) as e:
                        self.rejected[name] = e.message
                        self.report(e.message)
                        return
                    self._add(name, epoch, entries)
                    self.loaded.add(name)

            await asyncio.gather(*(load(n) for n in new))
            return len(new)

    def accept(self, name: str, data: bytes) -> tuple[int, list[KeyMapEntry]]:
        """(epoch, entries) of a key map that passes every check of docs/FORMAT.md 4.5;
        IntegrityError (or UnsupportedFormat) naming it and the reason otherwise."""
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
        if not verify(
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
        return km.epoch, km.entries

    def _add(self, name: str, epoch: int, entries: Iterable[KeyMapEntry]) -> None:
        for e in entries:
            table = self._by_kind[e.kind]
            old = table.get(e.object_id)
            # Prefer an entry that carries a self-wrap (it serves its writer too).
            if old is None or (old.entry.self_wrap is None and e.self_wrap is not None):
                table[e.object_id] = Found(epoch, e, name)

    def get(self, kind: int, oid: bytes) -> Found | None:
        return self._by_kind[kind].get(oid)

    async def find(self, kind: int, oid: bytes, what: str) -> Found:
        """The accepted entry of an object; after a miss the key maps are listed again
        once (a concurrent writer may have just committed it). IntegrityError if none."""
        found = self.get(kind, oid)
        if found is None:
            await self.refresh()
            found = self.get(kind, oid)
        if found is None:
            raise not_authenticated(what)
        return found

    def ids(self, kind: int) -> set[bytes]:
        return set(self._by_kind[kind])

    def entries(self, kind: int) -> dict[bytes, Found]:
        return self._by_kind[kind]

    # --- unwrapping ------------------------------------------------------------------------

    def _epoch(self, found: Found, what: str) -> EpochKeys:
        keys = self.epochs.get(found.epoch)
        if keys is None:
            raise KeyNotAvailable(
                f"this key was not granted key epoch {found.epoch}, which {what} needs"
            )
        return keys

    def read_key(self, found: Found, what: str) -> bytes:
        """The data key a read_wrap holds (a pack's; a generation body's). A writer opens
        the body of a generation it wrote itself through its self-wrap."""
        e = found.entry
        assert e.read_wrap is not None
        keys = self._epoch(found, what)
        if keys.read_secret is None and e.self_key == self.holder.key_id and e.self_wrap:
            return box_open(self.holder.box_secret, e.self_wrap, f"the data key of {what}")
        if keys.read_secret is None and e.kind == GENERATION:
            raise KeyNotAvailable(
                f"this writer key cannot open the body of {what}: another key wrote it",
                hint="a writer opens only the generations it wrote itself",
            )
        return keys.unwrap_read(e.read_wrap, what)

    def meta_key(self, found: Found, what: str) -> bytes:
        e = found.entry
        assert e.meta_wrap is not None
        return self._epoch(found, what).unwrap_meta(e.meta_wrap, e.kind, e.object_id, what)

    # --- writing ---------------------------------------------------------------------------

    def pack_entry(self, pack_id: bytes, key: bytes) -> KeyMapEntry:
        c = self.current
        return KeyMapEntry(PACK, pack_id, c.number, read_wrap=c.wrap_read(key))

    def meta_entry(self, kind: int, oid: bytes, key: bytes) -> KeyMapEntry:
        c = self.current
        return KeyMapEntry(kind, oid, c.number, meta_wrap=c.wrap_meta(key, kind, oid))

    def generation_entry(self, gen_id: bytes, header_key: bytes, body_key: bytes) -> KeyMapEntry:
        """A writer key also seals the body key to itself, so that its incrementals can
        read their parents' tables; other roles read bodies through the epoch."""
        c = self.current
        self_key = self_wrap = None
        if self.holder.role == "writer":
            self_key = self.holder.key_id
            self_wrap = box_seal(self.holder.box_public, body_key)
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
            names.append(name)
            self._add(name, epoch, part)
            self.loaded.add(name)
        return names

    # --- consolidation (docs/FORMAT.md 4.6) ------------------------------------------------

    def rewrap(self, found: Found, target: EpochKeys, keep_self: set[bytes]) -> KeyMapEntry:
        """`found`'s entry with its wraps for `target` (unchanged when it is the same
        epoch) and its self-wrap dropped unless its key is in `keep_self`."""
        e = found.entry
        self_key, self_wrap = e.self_key, e.self_wrap
        if self_key is not None and self_key not in keep_self:
            self_key = self_wrap = None
        if found.epoch == target.number:
            return replace(e, self_key=self_key, self_wrap=self_wrap)
        what = f"{KIND_NAMES[e.kind]} {e.object_id.hex()}"
        read_wrap = meta_wrap = None
        if e.read_wrap is not None:
            read_wrap = target.wrap_read(self._epoch(found, what).unwrap_read(e.read_wrap, what))
        if e.meta_wrap is not None:
            meta_wrap = target.wrap_meta(self.meta_key(found, what), e.kind, e.object_id)
        return KeyMapEntry(e.kind, e.object_id, e.born, read_wrap, meta_wrap, self_key, self_wrap)

    async def consolidate(
        self,
        signer: HolderSecrets,
        target: EpochKeys,
        exists: Callable[[int, bytes], bool],
        keep_self: set[bytes] | None = None,
    ) -> tuple[list[str], int]:
        """Rewrite every key map under keymaps/ as new key maps of `target`, signed by
        `signer` (an admin): keep the entries of objects that `exists`, re-wrapped for
        `target`, with self-wraps only for key holders still in the keyring; write them;
        only then delete every key map read (refused ones included: planted, of a removed
        signer, of a retired epoch). Returns (names written, entries dropped because
        their keys no longer open). `keep_self`: the key holders whose self-wraps stay
        (default: every holder of the keyring)."""
        await self.refresh()
        old = await self.names(every_epoch=True)
        if keep_self is None:
            keep_self = {k.key_id for k in self.keyring.keys}
        entries: list[KeyMapEntry] = []
        dropped = 0
        for kind in KIND_NAMES:
            for oid, found in sorted(self._by_kind[kind].items()):
                if not exists(kind, oid):
                    continue
                try:
                    entries.append(await asyncio.to_thread(self.rewrap, found, target, keep_self))
                except (IntegrityError, KeyNotAvailable) as e:
                    dropped += 1
                    self.report(f"{e.message}; its key map entry is dropped")
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
        return written, dropped


__all__ = ["ALLOWED_KINDS", "Found", "KeyDirectory", "not_authenticated"]
