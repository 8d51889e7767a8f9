"""The keyring record (docs/FORMAT.md section 4.3): key holders, epochs and grants.

Plain records and their JSON, validated for shape; the store signs and verifies them and
the crypto package opens grants. A keyring is immutable here: changes make a new one
(`dataclasses.replace`) with the serial one higher.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from dedupe.errors import IntegrityError, UnsupportedFormat

KEYRING_VERSION = 2
KEYRING_NAMES = ("keyring/1", "keyring/2")
MAX_KEYRING_BYTES = 16 << 20
ROLES = ("admin", "reader", "writer")
ACTIVE = "active"
RETIRED = "retired"
REPLICA_MODES = ("sync", "async")
MAX_REPLICAS = 16
MAX_POLICIES = 1024


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: Any, size: int | None = None) -> bytes:
    raw = base64.b64decode(str(s), validate=True)
    if size is not None and len(raw) != size:
        raise ValueError(f"expected {size} bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class KeyHolder:
    """The public facts of one key holder."""

    key_id: bytes
    name: str
    role: str
    created: str
    box_public: bytes
    sign_public: bytes

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.key_id.hex(),
            "name": self.name,
            "role": self.role,
            "created": self.created,
            "box_public": _b64(self.box_public),
            "sign_public": _b64(self.sign_public),
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> KeyHolder:
        role = str(r["role"])
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        key_id = bytes.fromhex(r["id"])
        if len(key_id) != 16:
            raise ValueError("a key id is 16 bytes")
        return cls(
            key_id,
            str(r["name"]),
            role,
            str(r["created"]),
            _unb64(r["box_public"], 32),
            _unb64(r["sign_public"], 32),
        )


@dataclass(frozen=True)
class EpochRecord:
    number: int
    created: str
    state: str
    read_public: bytes
    meta_check: str
    grants: dict[bytes, bytes] = field(default_factory=dict)  # key id -> sealed grant
    retired: str | None = None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def to_record(self) -> dict[str, Any]:
        r: dict[str, Any] = {
            "number": self.number,
            "created": self.created,
            "state": self.state,
            "read_public": _b64(self.read_public),
            "meta_check": self.meta_check,
            "grants": {k.hex(): _b64(v) for k, v in sorted(self.grants.items())},
        }
        if self.retired is not None:
            r["retired"] = self.retired
        return r

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> EpochRecord:
        state = str(r["state"])
        if state not in (ACTIVE, RETIRED):
            raise ValueError(f"unknown epoch state {state!r}")
        number = int(r["number"])
        if number < 1:
            raise ValueError("epoch numbers start at 1")
        grants = {bytes.fromhex(k): _unb64(v) for k, v in dict(r["grants"]).items()}
        if state == RETIRED and grants:
            raise ValueError(f"retired epoch {number} still holds grants")
        return cls(
            number,
            str(r["created"]),
            state,
            _unb64(r["read_public"], 32),
            str(r["meta_check"]),
            grants,
            r.get("retired"),
        )


@dataclass(frozen=True)
class ReplicaRecord:
    """A repository this one copies its generations to (docs/FORMAT.md 4.3.1). Listed in
    the keyring, so only an admin names where the data may go, and a rolled back list is
    refused with the keyring it is in."""

    name: str
    location: str
    mode: str  # "sync": a backup commits only once every sync replica has it; "async"
    repository_id: bytes  # the replica's own repository id, pinned when it was added
    added: str

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "location": self.location,
            "mode": self.mode,
            "repository": self.repository_id.hex(),
            "added": self.added,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> ReplicaRecord:
        mode = str(r["mode"])
        if mode not in REPLICA_MODES:
            raise ValueError(f"unknown replica mode {mode!r}")
        name = str(r["name"])
        problem = replica_name_problem(name)
        if problem:
            raise ValueError(problem)
        repository_id = bytes.fromhex(r["repository"])
        if len(repository_id) != 32:
            raise ValueError("a replica's repository id is 32 bytes")
        location = str(r["location"])
        if not location or not location.isprintable():
            raise ValueError("a replica's location is printable and not empty")
        return cls(name, location, mode, repository_id, str(r["added"]))


def replica_name_problem(name: str) -> str | None:
    """Why `name` cannot name a replica, or None: 1 to 64 of [A-Za-z0-9._-], not starting
    with '.' or '-' (it names the replica on command lines and in metric labels)."""
    if not 1 <= len(name) <= 64 or name[0] in ".-":
        return f"replica name {name!r}: 1 to 64 characters, not starting with '.' or '-'"
    if any(not (c.isascii() and (c.isalnum() or c in "._-")) for c in name):
        return f"replica name {name!r}: only letters, digits, '.', '_' and '-'"
    return None


@dataclass(frozen=True)
class PolicyRecord:
    """The recovery objectives of one source name (docs/FORMAT.md 4.3.2): its newest
    generation must be younger than `rpo_seconds`, a drill of it must restore within
    `rto_seconds`, and the last drill must be younger than `drill_max_age_seconds`. In the
    keyring, so only an admin sets them and a rolled back set is refused with it."""

    name: str
    rpo_seconds: int
    rto_seconds: int
    drill_max_age_seconds: int
    set: str

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rpo_seconds": self.rpo_seconds,
            "rto_seconds": self.rto_seconds,
            "drill_max_age_seconds": self.drill_max_age_seconds,
            "set": self.set,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> PolicyRecord:
        name = str(r["name"])
        if not 1 <= len(name) <= 255 or not name.isprintable():
            raise ValueError(f"policy name {name!r}: 1 to 255 printable characters")
        rpo, rto, drill_age = r["rpo_seconds"], r["rto_seconds"], r["drill_max_age_seconds"]
        if not all(type(n) is int and 0 < n <= 10 * 365 * 86400 for n in (rpo, rto, drill_age)):
            raise ValueError(f"policy {name!r}: objectives are whole seconds, 1 s to 10 years")
        return cls(name, rpo, rto, drill_age, str(r["set"]))


@dataclass(frozen=True)
class Keyring:
    repository_id: bytes
    serial: int
    updated: str
    keys: tuple[KeyHolder, ...]
    epochs: tuple[EpochRecord, ...]
    current_epoch: int
    reencrypt_below: int | None = None
    replicas: tuple[ReplicaRecord, ...] = ()
    policies: tuple[PolicyRecord, ...] = ()

    def holder(self, key_id: bytes) -> KeyHolder | None:
        for k in self.keys:
            if k.key_id == key_id:
                return k
        return None

    def epoch(self, number: int) -> EpochRecord | None:
        for e in self.epochs:
            if e.number == number:
                return e
        return None

    @property
    def active_epochs(self) -> list[EpochRecord]:
        return [e for e in self.epochs if e.active]

    def to_record(self) -> dict[str, Any]:
        """The keyring as JSON, without its signature."""
        return {
            "format": "dedupe-keyring",
            "version": KEYRING_VERSION,
            "repository": self.repository_id.hex(),
            "serial": self.serial,
            "updated": self.updated,
            "keys": [k.to_record() for k in self.keys],
            "epochs": [e.to_record() for e in sorted(self.epochs, key=lambda e: e.number)],
            "current_epoch": self.current_epoch,
            "reencrypt_below": self.reencrypt_below,
            # Only when there are any: a keyring without replicas keeps the bytes it had.
            **({"replicas": [r.to_record() for r in self.replicas]} if self.replicas else {}),
            **({"policies": [p.to_record() for p in self.policies]} if self.policies else {}),
        }

    @classmethod
    def from_record(cls, r: dict[str, Any], what: str = "the keyring") -> Keyring:
        """Parse and check the shape (its signature is the caller's to check)."""
        if not isinstance(r, dict) or r.get("format") != "dedupe-keyring":
            raise IntegrityError(f"{what} is not a dedupe keyring")
        if r.get("version") != KEYRING_VERSION:
            raise UnsupportedFormat(
                f"{what} has version {r.get('version')}; this dedupe reads {KEYRING_VERSION}"
            )
        try:
            keys = tuple(KeyHolder.from_record(k) for k in r["keys"])
            epochs = tuple(EpochRecord.from_record(e) for e in r["epochs"])
            ring = cls(
                bytes.fromhex(r["repository"]),
                int(r["serial"]),
                str(r["updated"]),
                keys,
                epochs,
                int(r["current_epoch"]),
                None if r.get("reencrypt_below") is None else int(r["reencrypt_below"]),
                tuple(ReplicaRecord.from_record(x) for x in r.get("replicas", [])),
                tuple(PolicyRecord.from_record(x) for x in r.get("policies", [])),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{what} is malformed: {e}") from None
        problem = ring.problem()
        if problem:
            raise IntegrityError(f"{what} is inconsistent: {problem}")
        return ring

    def problem(self) -> str | None:
        """What is wrong with this keyring's structure, or None."""
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            return "a key id appears twice"
        numbers = [e.number for e in self.epochs]
        if len(set(numbers)) != len(numbers):
            return "an epoch appears twice"
        current = self.epoch(self.current_epoch)
        if current is None or not current.active:
            return f"the current epoch {self.current_epoch} is not an active epoch"
        if self.current_epoch != max(e.number for e in self.active_epochs):
            return "the current epoch is not the newest active one"
        if not any(k.role == "admin" for k in self.keys):
            return "no admin key is left"
        known = set(ids)
        for e in self.epochs:
            if set(e.grants) - known:
                return f"epoch {e.number} grants a key that is not in the keyring"
            if e.active and set(e.grants) != known:
                return f"active epoch {e.number} does not grant every key holder"
        if len(self.replicas) > MAX_REPLICAS:
            return f"more than {MAX_REPLICAS} replicas"
        for what in ("name", "location", "repository_id"):
            values = [getattr(r, what) for r in self.replicas]
            if len(set(values)) != len(values):
                return f"two replicas have the same {what.replace('_id', '')}"
        if any(r.repository_id == self.repository_id for r in self.replicas):
            return "the repository is named as its own replica"
        if len(self.policies) > MAX_POLICIES:
            return f"more than {MAX_POLICIES} policies"
        names = [p.name for p in self.policies]
        if len(set(names)) != len(names):
            return "two policies are for the same name"
        return None
