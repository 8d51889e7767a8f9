"""Key holders and epochs: add, remove, change passphrase, rotate, re-encrypt, status
(docs/FORMAT.md sections 4 and 10).

Every change to the keyring is made by an admin key under the exclusive lock (the caller
holds it; `rotate` runs prune inside it for `--reencrypt`). Each operation is ordered so
that a crash at any point leaves a repository every key holder can still open, and so
that running the same command again finishes it:

- add: the key file is written, read back and opened, and only then does the keyring list
  the key (a key file the keyring does not list opens nothing);
- remove: key maps are consolidated first (nothing stays signed by the key, its
  self-wraps go), then the keyring drops it, then its key files go;
- passwd: the new key file is written, read back and opened before the old one goes;
- rotate: the new epoch is granted and made current, every key map is re-wrapped into it,
  and only then are the old epochs retired (their grants, and so their secrets, leave the
  repository); when it finds more than one active epoch, or a pending re-encryption, it
  finishes that instead of starting anew.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from typing import Any

from dedupe._types import ProgressCallback
from dedupe.crypto import ROLES, EpochSecrets, KdfParams, meta_check, seal_grant
from dedupe.crypto.keyfile import NewKeyFile, new_key_file, reopen_key_file
from dedupe.engine.prune import PruneReport, run_prune, stale_key_packs
from dedupe.errors import IntegrityError, KeyNotAvailable, RoleNotPermitted
from dedupe.format.keymap import DICTIONARY, GENERATION, INDEX, KIND_NAMES, PACK, QUARANTINE
from dedupe.format.keyring import (
    ACTIVE,
    RETIRED,
    EpochRecord,
    KeyHolder,
    Keyring,
    PolicyRecord,
    ReplicaRecord,
)
from dedupe.store import RepositoryStore
from dedupe.store.dictionaries import DICT_PREFIX, parse_dict_name
from dedupe.store.keyring import bump, write_keyring
from dedupe.store.repository import KEYS_PREFIX, key_file_name, key_id_of, named_ids, utc_now


@dataclass(frozen=True)
class KeyInfo:
    """One key holder as `key list` shows it."""

    id: str
    name: str
    role: str
    created: str
    current: bool  # the key this repository handle was opened with
    key_files: int  # how many key files of it are in the repository (2 during a passwd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EpochStatus:
    """One key epoch: its state and the objects whose keys are wrapped for it (`packs`,
    `generations`, ...: entries in its key maps) or were made in it (`packs_born`)."""

    number: int
    state: str
    created: str
    retired: str | None
    current: bool
    key_maps: int
    packs: int
    index_objects: int
    generations: int
    quarantine_records: int
    packs_born: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KeyStatus:
    serial: int
    current_epoch: int
    epochs: list[EpochStatus]
    reencrypt_below: int | None  # a pending `rotate --reencrypt`
    rotation_unfinished: bool  # more than one active epoch
    keys: list[KeyInfo]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RotateReport:
    epoch: int  # the current epoch afterwards
    retired: list[int]  # epochs this run retired
    resumed: bool  # it finished an interrupted rotation or re-encryption
    key_maps_written: int
    entries: int  # key map entries re-wrapped (objects whose keys now use `epoch`)
    entries_dropped: int  # entries whose keys no longer opened (reported)
    reencrypted: PruneReport | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reencrypted"] = self.reencrypted.to_dict() if self.reencrypted else None
        return d


def require_admin(store: RepositoryStore, what: str) -> None:
    if store.holder.admin_sign is None:
        raise RoleNotPermitted(
            f"a {store.role} key may not {what}",
            hint="use a key file with the admin role",
        )


def _admin_sign(store: RepositoryStore) -> bytes:
    assert store.holder.admin_sign is not None  # require_admin ran
    return store.holder.admin_sign


def _grant(store: RepositoryStore, holder: KeyHolder, secrets: EpochSecrets) -> bytes:
    return seal_grant(
        holder.box_public,
        store.repository_id,
        holder.key_id,
        secrets,
        with_read=holder.role != "writer",
    )


def _epoch_secrets(store: RepositoryStore, number: int) -> EpochSecrets:
    keys = store.epochs.get(number)
    if keys is None:
        raise KeyNotAvailable(f"this key cannot open key epoch {number}, so it cannot grant it")
    return keys.secrets()


async def _key_files(store: RepositoryStore) -> dict[str, list[str]]:
    """Key id (hex) -> names of its key files."""
    files: dict[str, list[str]] = {}
    for name in sorted(await store.backend.list(KEYS_PREFIX)):
        files.setdefault(key_id_of(name), []).append(name)
    return files


def _info(store: RepositoryStore, k: KeyHolder, files: dict[str, list[str]]) -> KeyInfo:
    return KeyInfo(
        id=k.key_id.hex(),
        name=k.name,
        role=k.role,
        created=k.created,
        current=k.key_id == store.holder.key_id,
        key_files=len(files.get(k.key_id.hex(), [])),
    )


async def list_keys(store: RepositoryStore) -> list[KeyInfo]:
    await store.refresh_keys()
    files = await _key_files(store)
    return [_info(store, k, files) for k in store.keyring.keys]


def find_key(keyring: Keyring, ref: str) -> KeyHolder:
    """A key holder by its full id, a unique id prefix (at least 4 hex digits) or its
    unique name. ValueError when none or several match."""
    ref = ref.strip()
    by_name = [k for k in keyring.keys if k.name == ref]
    by_id = [k for k in keyring.keys if len(ref) >= 4 and k.key_id.hex().startswith(ref.lower())]
    matches = by_id or by_name
    if len(matches) != 1:
        what = "no key" if not matches else f"{len(matches)} keys"
        raise ValueError(f"{what} of this repository match {ref!r}; see 'dedupe key list'")
    return matches[0]


async def _write_key_file(store: RepositoryStore, key_file: NewKeyFile, key_id: bytes) -> str:
    """Store a key file under a new name, read it back and open it (with the key its
    passphrase derived when it was made: the KDF runs once); on any failure remove it
    again. Returns its name."""
    name = key_file_name(key_id)
    await store.backend.put(name, key_file.data)
    try:
        back = await store.backend.get(name)
        opened = reopen_key_file(back, store.repository_id, key_file)
        if opened.key_id != key_id:
            raise RuntimeError("a key file read back does not hold the key it was written for")
    except BaseException:
        await store.backend.delete(name)
        raise
    return name


async def add_key(
    store: RepositoryStore,
    passphrase: bytes,
    *,
    role: str,
    name: str,
    kdf: KdfParams | None = None,
) -> KeyInfo:
    """A new key holder with `role`, its key file opened by `passphrase`, granted every
    active epoch (docs/FORMAT.md 10.3). The caller holds the exclusive lock."""
    require_admin(store, "add keys")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not name or len(name) > 200 or "\n" in name:
        raise ValueError("a key name must be 1 to 200 characters on one line")
    await store.refresh_keys()
    ring = store.keyring
    if any(k.name == name for k in ring.keys):
        raise ValueError(f"a key named {name!r} exists already; names must be unique")
    new = store.holder.new_holder(role)
    key_file = await asyncio.to_thread(new_key_file, new, passphrase, name, kdf)
    await _write_key_file(store, key_file, new.key_id)
    holder = KeyHolder(new.key_id, name, role, utc_now(), new.box_public, new.sign_public)
    epochs = tuple(
        replace(
            e,
            grants={**e.grants, new.key_id: _grant(store, holder, _epoch_secrets(store, e.number))},
        )
        if e.active
        else e
        for e in ring.epochs
    )
    new_ring = bump(ring, utc_now(), keys=(*ring.keys, holder), epochs=epochs)
    await write_keyring(store.backend, new_ring, _admin_sign(store))
    store.use_keyring(new_ring, store.epochs)
    return _info(store, holder, {new.key_id.hex(): ["new"]})


async def set_replicas(
    store: RepositoryStore,
    change: Callable[[tuple[ReplicaRecord, ...]], tuple[ReplicaRecord, ...]],
    confirm: Callable[[], Awaitable[None]],
) -> Keyring:
    """The keyring with its replica list (docs/FORMAT.md 4.3.1) replaced by
    `change(current list)`, signed and stored. Read afresh first, so that a change made
    elsewhere is not undone. The caller holds the exclusive lock; `confirm` checks it
    right before the write."""
    return await _set_listed(store, "replicas", change, confirm)


async def set_policies(
    store: RepositoryStore,
    change: Callable[[tuple[PolicyRecord, ...]], tuple[PolicyRecord, ...]],
    confirm: Callable[[], Awaitable[None]],
) -> Keyring:
    """The keyring with its recovery objectives (docs/FORMAT.md 4.3.2) replaced by
    `change(current ones)`; as set_replicas."""
    return await _set_listed(store, "policies", change, confirm)


async def _set_listed(
    store: RepositoryStore,
    field: str,
    change: Callable[[Any], Any],
    confirm: Callable[[], Awaitable[None]],
) -> Keyring:
    require_admin(store, f"change the {field}")
    await store.refresh_keys()
    new_ring = bump(store.keyring, utc_now(), **{field: change(getattr(store.keyring, field))})
    problem = new_ring.problem()
    if problem:
        raise ValueError(problem)
    await confirm()
    await write_keyring(store.backend, new_ring, _admin_sign(store))
    store.use_keyring(new_ring, store.epochs)
    return new_ring


async def _refuse_if_newer_keys_exist(store: RepositoryStore, what: str) -> None:
    """Consolidation deletes every key map it read; a key map this keyring refuses for
    being of an epoch or a key it does not know is what a keyring older than the
    repository sees (rolled back): deleting it would make real data unreadable."""
    suspicious = await store.keymaps.refused_for_newer_keys()
    if suspicious:
        raise IntegrityError(
            f"cannot {what}: {len(suspicious)} key map(s) are of keys or epochs this keyring "
            f"does not know (e.g. {suspicious[0]}); this machine's keyring may be older than "
            "the repository's",
            hint="put the newest keyring back first; if 'dedupe verify' shows these key maps "
            "were planted, 'dedupe prune --delete-unauthenticated' removes them",
        )


async def remove_key(
    store: RepositoryStore, ref: str, confirm: Callable[[], Awaitable[None]] | None = None
) -> KeyInfo:
    """Remove a key holder (docs/FORMAT.md 10.3). It can still open what the epochs it was
    granted protect until `rotate` runs. The caller holds the exclusive lock."""
    require_admin(store, "remove keys")
    await store.refresh_keys()
    ring = store.keyring
    target = find_key(ring, ref)
    if target.key_id == store.holder.key_id:
        raise ValueError("a key cannot remove itself; use another admin key")
    if target.role == "admin" and sum(k.role == "admin" for k in ring.keys) == 1:
        raise ValueError("the last admin key cannot be removed")
    files = await _key_files(store)
    info = _info(store, target, files)
    remaining = {k.key_id for k in ring.keys if k.key_id != target.key_id}
    # Nothing may stay signed by it (its key maps would be refused once it is gone).
    await _refuse_if_newer_keys_exist(store, "remove a key")
    if confirm is not None:
        await confirm()
    await store.keymaps.consolidate(store.holder, store.current_epoch, keep_self=remaining)
    epochs = tuple(
        replace(e, grants={k: v for k, v in e.grants.items() if k != target.key_id})
        for e in ring.epochs
    )
    new_ring = bump(
        ring,
        utc_now(),
        keys=tuple(k for k in ring.keys if k.key_id != target.key_id),
        epochs=epochs,
    )
    await write_keyring(store.backend, new_ring, _admin_sign(store))
    store.use_keyring(new_ring, store.epochs)
    for name in files.get(target.key_id.hex(), []):
        await store.backend.delete(name)
    return info


async def change_passphrase(
    store: RepositoryStore, new_passphrase: bytes, kdf: KdfParams | None = None
) -> KeyInfo:
    """A new key file for this key holder under `new_passphrase`; the old ones go once it
    opened (docs/FORMAT.md 4.2)."""
    await store.refresh_keys()
    me = store.keyring.holder(store.holder.key_id)
    assert me is not None  # the store opened, so the keyring lists it
    old = (await _key_files(store)).get(me.key_id.hex(), [])
    key_file = await asyncio.to_thread(new_key_file, store.holder, new_passphrase, me.name, kdf)
    name = await _write_key_file(store, key_file, me.key_id)
    for n in old:
        if n != name:
            await store.backend.delete(n)
    return _info(store, me, {me.key_id.hex(): [name]})


async def rotate(
    store: RepositoryStore,
    *,
    reencrypt: bool = False,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
    confirm: Callable[[], Awaitable[None]] | None = None,
) -> RotateReport:
    """`key rotate` (docs/FORMAT.md 10.1, 10.2). The caller holds the exclusive lock;
    `confirm` (RepositoryLock.confirm) runs before the steps that delete."""
    require_admin(store, "rotate keys")
    started = time.monotonic()
    await store.refresh_keys()
    ring = store.keyring
    resumed = len(ring.active_epochs) > 1 or ring.reencrypt_below is not None
    sign = _admin_sign(store)
    await _refuse_if_newer_keys_exist(store, "rotate")
    if not resumed:
        # 1. a new epoch, granted to every key holder, current from now on.
        number = max(e.number for e in ring.epochs) + 1
        secrets = EpochSecrets.generate(number)
        record = EpochRecord(
            number,
            utc_now(),
            ACTIVE,
            secrets.read_public,
            meta_check(secrets.meta),
            {k.key_id: _grant(store, k, secrets) for k in ring.keys},
        )
        ring = bump(
            ring,
            utc_now(),
            epochs=(*ring.epochs, record),
            current_epoch=number,
            reencrypt_below=number if reencrypt else None,
        )
        await write_keyring(store.backend, ring, sign)
        store.use_keyring(ring, {**store.epochs, number: secrets.keys()})
    elif reencrypt and ring.reencrypt_below is None:
        # Finishing an interrupted rotation, and re-encrypting what came before it.
        ring = bump(ring, utc_now(), reencrypt_below=ring.current_epoch)
        await write_keyring(store.backend, ring, sign)
        store.use_keyring(ring, store.epochs)
    current = store.current_epoch
    # 2. every key map re-wrapped into the current epoch.
    if confirm is not None:
        await confirm()
    await store.keymaps.refresh()
    written, dropped = await store.keymaps.consolidate(store.holder, current)
    entries = sum(len(store.keymaps.entries(k)) for k in KIND_NAMES)
    # 3. the other epochs retired: their grants, and so their secrets, leave the repository.
    now = utc_now()
    retired = [e.number for e in ring.epochs if e.active and e.number != current.number]
    if retired:
        ring = bump(
            ring,
            now,
            epochs=tuple(
                replace(e, state=RETIRED, retired=now, grants={}) if e.number in retired else e
                for e in ring.epochs
            ),
        )
        await write_keyring(store.backend, ring, sign)
        store.use_keyring(ring, {current.number: current})
    report = None
    if ring.reencrypt_below is not None:
        report = await reencrypt_packs(store, executor=executor, progress=progress, confirm=confirm)
    return RotateReport(
        epoch=current.number,
        retired=retired,
        resumed=resumed,
        key_maps_written=len(written),
        entries=entries,
        entries_dropped=dropped,
        reencrypted=report,
        seconds=round(time.monotonic() - started, 3),
    )


async def reencrypt_packs(
    store: RepositoryStore,
    *,
    executor: Executor | None = None,
    progress: ProgressCallback | None = None,
    confirm: Callable[[], Awaitable[None]] | None = None,
) -> PruneReport:
    """Rewrite every pack whose key was made before `reencrypt_below` (a prune that counts
    them as sparse), then clear the mark. The caller holds the exclusive lock."""
    below = store.keyring.reencrypt_below
    assert below is not None
    report = await run_prune(
        store,
        executor=executor,
        progress=progress,
        lock=False,
        reencrypt_below=below,
        confirm=confirm,
    )
    left = stale_key_packs(store, store.keymaps.ids(PACK), below)
    present = set(named_ids(await store.backend.list("packs/")))
    if left & present:
        raise RuntimeError(f"{len(left & present)} packs still have keys of an earlier epoch")
    await reseal_dictionaries(store, below, confirm)
    ring = bump(store.keyring, utc_now(), reencrypt_below=None)
    await write_keyring(store.backend, ring, _admin_sign(store))
    store.use_keyring(ring, store.epochs)
    return report


async def reseal_dictionaries(
    store: RepositoryStore,
    below: int,
    confirm: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Seal every dictionary whose key was made in an epoch below `below` again under a
    fresh key (FORMAT.md 16): the new object (same content, so the same ref: every blob
    that names it still opens) and its key map entry first, then the old object goes.
    A run killed between the two leaves both, and the next one deletes the old. Returns
    how many were sealed again. The caller holds the exclusive lock."""
    done = 0
    for name in sorted(await store.backend.list(DICT_PREFIX)):
        parsed = parse_dict_name(name)
        found = None if parsed is None else store.keymaps.get(DICTIONARY, bytes.fromhex(parsed[1]))
        if parsed is None or found is None or found.entry.born >= below:
            continue
        if confirm is not None:
            await confirm()
        try:
            plain = await store.open_dictionary(name, *parsed)
            await store.write_dictionary(plain, register=False)  # refused: IntegrityError
        except IntegrityError as e:
            # It serves no reader (damaged, under another dictionary's ref, or bytes zstd
            # refuses): sealed again it would be no use, and left it would stop every
            # --reencrypt here. It goes, as the old copy of a resealed one does.
            store.report(f"{name} deleted by --reencrypt: {e.message}")
        await store.backend.delete(name)
        done += 1
    return done


async def key_status(store: RepositoryStore) -> KeyStatus:
    await store.refresh_keys()
    ring = store.keyring
    keymaps = store.keymaps
    counts: dict[int, dict[int, int]] = {
        e.number: dict.fromkeys(KIND_NAMES, 0) for e in ring.epochs
    }
    born: dict[int, int] = dict.fromkeys((e.number for e in ring.epochs), 0)
    maps: dict[int, int] = dict.fromkeys((e.number for e in ring.epochs), 0)
    for name in keymaps.loaded:
        maps[int(name.split("/")[1])] = maps.get(int(name.split("/")[1]), 0) + 1
    for kind in KIND_NAMES:
        for found in keymaps.entries(kind).values():
            counts.setdefault(found.epoch, dict.fromkeys(KIND_NAMES, 0))[kind] += 1
            if kind == PACK:
                born[found.entry.born] = born.get(found.entry.born, 0) + 1
    files = await _key_files(store)
    epochs = [
        EpochStatus(
            number=e.number,
            state=e.state,
            created=e.created,
            retired=e.retired,
            current=e.number == ring.current_epoch,
            key_maps=maps.get(e.number, 0),
            packs=counts[e.number][PACK],
            index_objects=counts[e.number][INDEX],
            generations=counts[e.number][GENERATION],
            quarantine_records=counts[e.number][QUARANTINE],
            packs_born=born.get(e.number, 0),
        )
        for e in sorted(ring.epochs, key=lambda e: e.number)
    ]
    return KeyStatus(
        serial=ring.serial,
        current_epoch=ring.current_epoch,
        epochs=epochs,
        reencrypt_below=ring.reencrypt_below,
        rotation_unfinished=len(ring.active_epochs) > 1,
        keys=[_info(store, k, files) for k in ring.keys],
    )


__all__ = [
    "EpochStatus",
    "KeyInfo",
    "KeyStatus",
    "RotateReport",
    "add_key",
    "change_passphrase",
    "find_key",
    "key_status",
    "list_keys",
    "reencrypt_packs",
    "remove_key",
    "require_admin",
    "rotate",
]
