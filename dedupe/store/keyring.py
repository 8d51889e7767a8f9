"""The keyring on a backend (docs/FORMAT.md section 4.3): read, verify, write, and the
epoch keys a key holder opens from its grants.

The keyring is the root of trust after the key file: it is signed by the admin key whose
verify key every key file pins. Two copies are written, one after the other; a reader
takes the copy of the highest serial that verifies, reports a copy that is damaged or
behind, and fails only when neither verifies. A client records the highest serial it has
seen (`seen_serial`) and refuses an older keyring: a validly signed old copy could bring
back a removed key holder or a retired epoch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dedupe.backends.base import Backend
from dedupe.crypto import EpochKeys, HolderSecrets, open_grant, sign_record, verify_record
from dedupe.crypto.signing import KEYRING_DOMAIN
from dedupe.errors import (
    IntegrityError,
    KeyRevoked,
    MissingObject,
    RollbackDetected,
    UnsupportedFormat,
)
from dedupe.format.keyring import KEYRING_NAMES, MAX_KEYRING_BYTES, Keyring

log = logging.getLogger("dedupe")

Report = Callable[[str], None]


def keyring_bytes(keyring: Keyring, admin_sign: bytes) -> bytes:
    problem = keyring.problem()
    if problem:
        raise ValueError(f"refusing to sign an inconsistent keyring: {problem}")
    record = sign_record(admin_sign, KEYRING_DOMAIN, keyring.to_record())
    return json.dumps(record, indent=1, sort_keys=True).encode() + b"\n"


async def write_keyring(backend: Backend, keyring: Keyring, admin_sign: bytes) -> None:
    """Sign and store both copies, the first then the second (each put is atomic): the
    change is in effect once the first is stored."""
    data = keyring_bytes(keyring, admin_sign)
    for name in KEYRING_NAMES:
        await backend.put(name, data)


def decode_keyring(data: bytes, verify_key: bytes, repository_id: bytes, name: str) -> Keyring:
    """A keyring copy, parsed and verified (IntegrityError naming `name` otherwise)."""
    try:
        record = json.loads(data)
    except ValueError:
        raise IntegrityError(f"{name} is not valid JSON: it is damaged") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"{name} is not a keyring")
    # The signature first: whatever else is wrong with a forged copy, that is the news.
    if not verify_record(verify_key, KEYRING_DOMAIN, record):
        raise IntegrityError(
            f"{name} fails its admin signature: it was damaged or forged",
            hint="only an admin key can change the keyring",
        )
    ring = Keyring.from_record(record, name)
    if ring.repository_id != repository_id:
        raise IntegrityError(f"{name} belongs to another repository")
    return ring


async def read_keyring(
    backend: Backend, verify_key: bytes, repository_id: bytes, report: Report
) -> Keyring:
    """The verified keyring of the highest serial among the copies (see the module
    docstring). IntegrityError when no copy verifies."""
    found: list[tuple[str, Keyring]] = []
    failures: list[str] = []
    for name in KEYRING_NAMES:
        try:
            found.append(
                (
                    name,
                    decode_keyring(
                        await backend.get_small(name, MAX_KEYRING_BYTES),
                        verify_key,
                        repository_id,
                        name,
                    ),
                )
            )
        except MissingObject:
            failures.append(f"{name} is missing")
        except (IntegrityError, UnsupportedFormat) as e:
            failures.append(e.message)
    if not found:
        raise IntegrityError(
            "the repository's keyring cannot be trusted: " + "; ".join(failures),
            hint="restore keyring/1 or keyring/2 from a copy of the repository",
        )
    name, best = max(found, key=lambda f: f[1].serial)
    for failure in failures:
        report(f"{failure}; using {name} (serial {best.serial})")
    for other, ring in found:
        if ring.serial < best.serial:
            report(
                f"{other} is at serial {ring.serial}, behind {name} at {best.serial} (an "
                "interrupted key change; the next one rewrites it)"
            )
    return best


async def unverified_key_ids(backend: Backend) -> list[set[str]]:
    """The key ids (hex) each keyring copy that parses lists, read without verifying them:
    only a hint of which key files to try (docs/FORMAT.md 4.2), so that a key file planted
    under another id costs no key derivation. Empty when no copy parses."""
    found = []
    for name in KEYRING_NAMES:
        try:
            record = json.loads(await backend.get_small(name, MAX_KEYRING_BYTES))
            found.append({str(k["id"]) for k in record["keys"]})
        except (MissingObject, IntegrityError, ValueError, KeyError, TypeError):
            continue
    return found


def open_epochs(holder: HolderSecrets, keyring: Keyring, report: Report) -> dict[int, EpochKeys]:
    """The keys of every active epoch this holder was granted. KeyRevoked when the
    keyring does not list it (or lists another role for it)."""
    me = keyring.holder(holder.key_id)
    if me is None:
        raise KeyRevoked(
            f"key {holder.key_id.hex()} has been removed from this repository",
            hint="ask an admin for a key ('dedupe key add')",
        )
    if me.role != holder.role or me.box_public != holder.box_public:
        raise IntegrityError(
            f"the keyring lists key {holder.key_id.hex()} differently from its key file"
        )
    epochs: dict[int, EpochKeys] = {}
    for record in keyring.active_epochs:
        sealed = record.grants.get(holder.key_id)
        if sealed is None:  # the keyring's structure check forbids it; say so if it happens
            report(f"epoch {record.number} grants nothing to key {holder.key_id.hex()}")
            continue
        try:
            keys = open_grant(
                holder.box_secret,
                sealed,
                keyring.repository_id,
                holder.key_id,
                record.number,
                record.read_public,
                record.meta_check,
            )
        except IntegrityError as e:
            report(f"{e.message}: data of epoch {record.number} cannot be read with this key")
            continue
        if holder.role == "writer" and keys.read_secret is not None:
            raise IntegrityError(f"epoch {record.number} grants a read secret to a writer key")
        epochs[record.number] = keys
    if keyring.current_epoch not in epochs:
        raise IntegrityError(
            f"this key cannot open the current key epoch {keyring.current_epoch}",
            hint="an admin can grant it again by removing and re-adding the key",
        )
    return epochs


def bump(keyring: Keyring, now: str, **changes: object) -> Keyring:
    """The next keyring: `changes` applied, the serial one higher."""
    return replace(keyring, serial=keyring.serial + 1, updated=now, **changes)  # type: ignore[arg-type]


# --- the highest serial this client has seen (rollback detection) ----------------------------


def state_dir() -> Path:
    explicit = os.environ.get("DEDUPE_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "dedupe"


def _state_file(repository_id: bytes) -> Path:
    return state_dir() / f"{repository_id.hex()}.json"


def _read_state(repository_id: bytes) -> dict[str, Any]:
    try:
        state = json.loads(_state_file(repository_id).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(repository_id: bytes, state: dict[str, Any], what: str) -> None:
    """Best effort: a client that cannot write its state directory loses only the
    protection `what` names, and says so."""
    path = _state_file(repository_id)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot record %s in %s (%s): %s", what, path, e, _UNNOTICED[what])


_UNNOTICED = {
    "the keyring serial": "rollbacks go unnoticed",
    "the newest drills": "a deleted drill record goes unnoticed",
}


def seen_serial(repository_id: bytes) -> int:
    try:
        return int(_read_state(repository_id)["keyring_serial"])
    except (KeyError, ValueError, TypeError):
        return 0


def check_and_record_serial(repository_id: bytes, keyring: Keyring) -> None:
    """RollbackDetected when this client has seen a newer keyring; else remember this one.
    Remembering is best effort: a client that cannot write its state directory loses only
    this protection, and says so."""
    seen = seen_serial(repository_id)
    if keyring.serial < seen:
        raise RollbackDetected(
            f"the repository's keyring is at serial {keyring.serial}, but this machine has "
            f"seen serial {seen}: an older copy was put back (a rollback), which could revive "
            "a removed key or a retired epoch",
            hint="find out who replaced keyring/1 and keyring/2; this machine's record is "
            f"{_state_file(repository_id)}",
        )
    if keyring.serial == seen:
        return
    state = _read_state(repository_id)
    state["keyring_serial"] = keyring.serial
    _write_state(repository_id, state, "the keyring serial")


def seen_drills(repository_id: bytes) -> dict[str, str]:
    """Per source name, the object name of the newest drill record this client has seen
    (docs/FORMAT.md 15: prune never deletes the newest, so its absence is an attack)."""
    found = _read_state(repository_id).get("newest_drills")
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def record_drills(repository_id: bytes, newest: dict[str, str]) -> None:
    state = _read_state(repository_id)
    if state.get("newest_drills") == newest:
        return
    state["newest_drills"] = newest
    _write_state(repository_id, state, "the newest drills")


__all__ = [
    "bump",
    "record_drills",
    "seen_drills",
    "check_and_record_serial",
    "decode_keyring",
    "keyring_bytes",
    "open_epochs",
    "read_keyring",
    "seen_serial",
    "state_dir",
    "unverified_key_ids",
    "write_keyring",
]
