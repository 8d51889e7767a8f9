"""Passphrase-protected key files (docs/FORMAT.md 4.2).

A key file holds the repository keys sealed under a key-encryption key derived from a
passphrase with Argon2id. Several key files can open one repository; each carries a role.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import nacl.pwhash

from dedupe.crypto.aead import new_key, open_sealed, seal
from dedupe.errors import IntegrityError, UnsupportedFormat, WrongPassphrase

ROLES = ("admin", "reader", "writer")


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost. The default (3 passes, 64 MiB) takes about 0.2-0.5 s on a laptop core
    and keeps the KDF's memory below the backup pipeline's own budget."""

    opslimit: int = 3
    memlimit: int = 64 * 1024 * 1024

    @classmethod
    def weakest(cls) -> KdfParams:
        """For tests only: the smallest cost libsodium accepts."""
        return cls(nacl.pwhash.argon2id.OPSLIMIT_MIN, nacl.pwhash.argon2id.MEMLIMIT_MIN)


@dataclass(frozen=True)
class RepositoryKeys:
    """The keys a key file opens. `epoch_master` is None for the writer role."""

    id_key: bytes
    chunker_key: bytes
    meta_key: bytes
    epoch_master: bytes | None
    role: str = "admin"

    @classmethod
    def generate(cls) -> RepositoryKeys:
        return cls(new_key(), new_key(), new_key(), new_key(), "admin")


def _aad(repository_id: bytes, role: str) -> bytes:
    return b"dedupe-key v1\x00" + repository_id + role.encode("ascii")


def _kek(passphrase: bytes, salt: bytes, kdf: KdfParams) -> bytes:
    return bytes(
        nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit)
    )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def create_key_file(
    keys: RepositoryKeys,
    repository_id: bytes,
    passphrase: bytes,
    name: str = "default",
    kdf: KdfParams | None = None,
) -> bytes:
    if keys.role not in ROLES:
        raise ValueError(f"unknown role {keys.role!r}")
    kdf = kdf or KdfParams()
    salt = os.urandom(nacl.pwhash.argon2id.SALTBYTES)
    payload = json.dumps(
        {
            "id_key": _b64(keys.id_key),
            "chunker_key": _b64(keys.chunker_key),
            "meta_key": _b64(keys.meta_key),
            "epoch_master": _b64(keys.epoch_master) if keys.epoch_master else None,
        }
    ).encode()
    record = {
        "format": "dedupe-key",
        "version": 1,
        "repository": repository_id.hex(),
        "name": name,
        "role": keys.role,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kdf": {
            "algorithm": "argon2id13",
            "opslimit": kdf.opslimit,
            "memlimit": kdf.memlimit,
            "salt": _b64(salt),
        },
        "sealed": _b64(seal(_kek(passphrase, salt, kdf), payload, _aad(repository_id, keys.role))),
    }
    return json.dumps(record, indent=2).encode() + b"\n"


def open_key_file(data: bytes, repository_id: bytes, passphrase: bytes) -> RepositoryKeys:
    """Open a key file; a wrong passphrase raises WrongPassphrase, nothing else is returned."""
    try:
        record: dict[str, Any] = json.loads(data)
        kdf_rec = record["kdf"]
        if record.get("format") != "dedupe-key" or kdf_rec.get("algorithm") != "argon2id13":
            raise UnsupportedFormat("the key file has an unknown format")
        if record.get("version") != 1:
            raise UnsupportedFormat(f"key file version {record.get('version')} is not supported")
        role = str(record["role"])
        kdf = KdfParams(int(kdf_rec["opslimit"]), int(kdf_rec["memlimit"]))
        salt = base64.b64decode(kdf_rec["salt"])
        sealed = base64.b64decode(record["sealed"])
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"the key file is damaged: {e}") from None
    if role not in ROLES:
        raise IntegrityError(f"the key file names an unknown role {role!r}")
    kek = _kek(passphrase, salt, kdf)
    try:
        payload = json.loads(open_sealed(kek, sealed, _aad(repository_id, role), "key file"))
    except IntegrityError:
        raise WrongPassphrase(
            "wrong passphrase: no key file of this repository opens with it",
            hint="check DEDUPE_PASSWORD / DEDUPE_PASSWORD_FILE / DEDUPE_PASSWORD_COMMAND",
        ) from None
    master = payload.get("epoch_master")
    return RepositoryKeys(
        id_key=base64.b64decode(payload["id_key"]),
        chunker_key=base64.b64decode(payload["chunker_key"]),
        meta_key=base64.b64decode(payload["meta_key"]),
        epoch_master=base64.b64decode(master) if master else None,
        role=role,
    )
