"""Passphrase-protected key files (docs/FORMAT.md 4.2).

A key file holds one key holder's secrets, sealed under a key-encryption key derived from
a passphrase with Argon2id: the repository's id and chunker keys, the holder's own X25519
box key (to open its grants) and Ed25519 signing key (to sign its key maps), the admin
signing key for admins, and the admin verify key pinned for everyone. Each key file
carries a role; several key files open one repository.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import blake3
import nacl.pwhash

from dedupe.crypto.aead import new_key, open_sealed, seal
from dedupe.crypto.epochs import box_public_of, new_box_secret
from dedupe.crypto.signing import new_signing_seed, verify_key_of
from dedupe.errors import IntegrityError, PassphraseMissing, UnsupportedFormat, WrongPassphrase

CACHE_KEY_CONTEXT = "dedupe 2026-12 local object cache MAC v1"

ROLES = ("admin", "reader", "writer")
KEY_ID_SIZE = 16
KEY_FILE_VERSION = 2
MAX_KEY_FILE_BYTES = 1 << 20
# Bounds on the KDF cost a key file may ask for (docs/FORMAT.md 4.2): a key file is read
# before anything in it can be trusted, so a planted one must not exhaust memory or time.
OPSLIMIT_RANGE = (nacl.pwhash.argon2id.OPSLIMIT_MIN, 16)
MEMLIMIT_RANGE = (nacl.pwhash.argon2id.MEMLIMIT_MIN, 1 << 30)


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost. The default (3 passes, 64 MiB) takes about 0.2-0.5 s on a laptop core
    and keeps the KDF's memory below the backup pipeline's own budget."""

    opslimit: int = 3
    memlimit: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if not OPSLIMIT_RANGE[0] <= self.opslimit <= OPSLIMIT_RANGE[1]:
            raise ValueError(
                f"KDF opslimit must be within {OPSLIMIT_RANGE[0]}..{OPSLIMIT_RANGE[1]}"
            )
        if not MEMLIMIT_RANGE[0] <= self.memlimit <= MEMLIMIT_RANGE[1]:
            raise ValueError(
                f"KDF memlimit must be within {MEMLIMIT_RANGE[0]}..{MEMLIMIT_RANGE[1]} bytes"
            )

    @classmethod
    def weakest(cls) -> KdfParams:
        """For tests only: the smallest cost libsodium accepts."""
        return cls(OPSLIMIT_RANGE[0], MEMLIMIT_RANGE[0])


@dataclass(frozen=True)
class HolderSecrets:
    """What one key file opens: the repository-wide id and chunker keys, this holder's own
    key pairs, the admin signing key (admins only) and the pinned admin verify key."""

    repository_id: bytes
    key_id: bytes
    role: str
    id_key: bytes
    chunker_key: bytes
    box_secret: bytes
    sign_secret: bytes
    admin_verify_key: bytes
    admin_sign: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}")
        if (self.admin_sign is not None) != (self.role == "admin"):
            raise ValueError("exactly the admin role holds the admin signing key")

    @property
    def box_public(self) -> bytes:
        return box_public_of(self.box_secret)

    @property
    def sign_public(self) -> bytes:
        return verify_key_of(self.sign_secret)

    @property
    def cache_key(self) -> bytes:
        """The key of this holder's local object cache MACs (docs/FORMAT.md 3.1), derived
        from its own box secret: no other key holder, and no one without the key file,
        can make a cache entry this holder accepts."""
        return bytes(blake3.blake3(self.box_secret, derive_key_context=CACHE_KEY_CONTEXT).digest())

    @classmethod
    def first_admin(cls, repository_id: bytes) -> HolderSecrets:
        """The key holder `init` makes: a fresh admin of a fresh repository."""
        admin_sign = new_signing_seed()
        return cls(
            repository_id=repository_id,
            key_id=os.urandom(KEY_ID_SIZE),
            role="admin",
            id_key=new_key(),
            chunker_key=new_key(),
            box_secret=new_box_secret(),
            sign_secret=new_signing_seed(),
            admin_verify_key=verify_key_of(admin_sign),
            admin_sign=admin_sign,
        )

    def new_holder(self, role: str) -> HolderSecrets:
        """Another key holder of the same repository (`key add`): its own key id and key
        pairs; the repository keys; the admin signing key if `role` is admin. Only an
        admin can make one (it gives away the admin signing key)."""
        if self.admin_sign is None:
            raise ValueError("only an admin key can make new key holders")
        return HolderSecrets(
            repository_id=self.repository_id,
            key_id=os.urandom(KEY_ID_SIZE),
            role=role,
            id_key=self.id_key,
            chunker_key=self.chunker_key,
            box_secret=new_box_secret(),
            sign_secret=new_signing_seed(),
            admin_verify_key=self.admin_verify_key,
            admin_sign=self.admin_sign if role == "admin" else None,
        )


@dataclass(frozen=True)
class KeyFileInfo:
    """The plain (unauthenticated) fields of a key file: enough to choose which to try."""

    repository: bytes
    key_id: bytes
    name: str
    role: str
    created: str
    kdf: KdfParams


def _aad(repository_id: bytes, key_id: bytes, role: str) -> bytes:
    return b"dedupe-key v2\x00" + repository_id + key_id + role.encode("ascii")


def _kek(passphrase: bytes, salt: bytes, kdf: KdfParams) -> bytes:
    return bytes(
        nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit)
    )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


class NewKeyFile:
    """A key file just made (`data`) and the key-encryption key its passphrase derived
    (`kek`): what `reopen_key_file` needs to open it once it was stored and read back,
    without a second Argon2id run. (Not a dataclass: no repr shows the key.)"""

    __slots__ = ("data", "kek")

    def __init__(self, data: bytes, kek: bytes) -> None:
        self.data = data
        self.kek = kek


def create_key_file(
    holder: HolderSecrets, passphrase: bytes, name: str, kdf: KdfParams | None = None
) -> bytes:
    return new_key_file(holder, passphrase, name, kdf).data


def new_key_file(
    holder: HolderSecrets, passphrase: bytes, name: str, kdf: KdfParams | None = None
) -> NewKeyFile:
    """A key file for `holder` under `passphrase`: one run of the KDF."""
    if not passphrase:
        raise PassphraseMissing(
            "an empty passphrase protects nothing; no key file was made",
            hint="choose a passphrase of at least one character",
        )
    kdf = kdf or KdfParams()
    salt = os.urandom(nacl.pwhash.argon2id.SALTBYTES)
    kek = _kek(passphrase, salt, kdf)
    payload = json.dumps(
        {
            "admin_verify_key": _b64(holder.admin_verify_key),
            "id_key": _b64(holder.id_key),
            "chunker_key": _b64(holder.chunker_key),
            "box_secret": _b64(holder.box_secret),
            "sign_secret": _b64(holder.sign_secret),
            "admin_sign": _b64(holder.admin_sign) if holder.admin_sign else None,
        }
    ).encode()
    record = {
        "format": "dedupe-key",
        "version": KEY_FILE_VERSION,
        "repository": holder.repository_id.hex(),
        "id": holder.key_id.hex(),
        "name": name,
        "role": holder.role,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "kdf": {
            "algorithm": "argon2id13",
            "opslimit": kdf.opslimit,
            "memlimit": kdf.memlimit,
            "salt": _b64(salt),
        },
        "sealed": _b64(seal(kek, payload, _aad(holder.repository_id, holder.key_id, holder.role))),
    }
    return NewKeyFile(json.dumps(record, indent=2).encode() + b"\n", kek)


def _parse(data: bytes) -> tuple[dict[str, Any], KeyFileInfo, bytes, bytes]:
    """(record, info, salt, sealed) of a key file; nothing in it is trusted yet."""
    try:
        record: dict[str, Any] = json.loads(data)
        if not isinstance(record, dict) or record.get("format") != "dedupe-key":
            raise UnsupportedFormat("this is not a dedupe key file")
        if record.get("version") != KEY_FILE_VERSION:
            raise UnsupportedFormat(
                f"key file version {record.get('version')} is not supported "
                f"(this dedupe reads version {KEY_FILE_VERSION})"
            )
        kdf_rec = record["kdf"]
        if kdf_rec.get("algorithm") != "argon2id13":
            raise UnsupportedFormat(f"unknown key derivation {kdf_rec.get('algorithm')!r}")
        try:
            kdf = KdfParams(int(kdf_rec["opslimit"]), int(kdf_rec["memlimit"]))
        except ValueError as e:
            raise IntegrityError(f"the key file asks for an unacceptable KDF cost: {e}") from None
        key_id = bytes.fromhex(record["id"])
        if len(key_id) != KEY_ID_SIZE:
            raise ValueError("key id of the wrong length")
        role = str(record["role"])
        if role not in ROLES:
            raise IntegrityError(f"the key file names an unknown role {role!r}")
        info = KeyFileInfo(
            bytes.fromhex(record["repository"]),
            key_id,
            str(record["name"]),
            role,
            str(record["created"]),
            kdf,
        )
        salt = base64.b64decode(kdf_rec["salt"], validate=True)
        sealed = base64.b64decode(record["sealed"], validate=True)
        if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
            raise ValueError("salt of the wrong length")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"the key file is damaged: {e}") from None
    return record, info, salt, sealed


def key_file_info(data: bytes) -> KeyFileInfo:
    """The key file's id, name, role and KDF cost, unauthenticated (no KDF is run)."""
    return _parse(data)[1]


def open_key_file(data: bytes, repository_id: bytes, passphrase: bytes) -> HolderSecrets:
    """Open a key file; a wrong passphrase raises WrongPassphrase, nothing else is returned."""
    _record, info, salt, sealed = _parse(data)
    return _open(info, sealed, repository_id, _kek(passphrase, salt, info.kdf))


def reopen_key_file(data: bytes, repository_id: bytes, written: NewKeyFile) -> HolderSecrets:
    """Open `data`, a key file read back after `written` was stored, with the key
    `written` was sealed under. It must be `written.data` byte for byte (IntegrityError
    before anything is opened otherwise): the passphrase would then derive that same key
    from the same salt and cost, so the KDF is not run again."""
    if data != written.data:
        raise IntegrityError("the key file read back is not the one written")
    _record, info, _salt, sealed = _parse(data)
    return _open(info, sealed, repository_id, written.kek)


def _open(info: KeyFileInfo, sealed: bytes, repository_id: bytes, kek: bytes) -> HolderSecrets:
    try:
        plain = open_sealed(kek, sealed, _aad(repository_id, info.key_id, info.role), "key file")
    except IntegrityError:
        raise WrongPassphrase(
            "wrong passphrase: no key file of this repository opens with it",
            hint="check DEDUPE_PASSWORD / DEDUPE_PASSWORD_FILE / DEDUPE_PASSWORD_COMMAND",
        ) from None
    try:
        payload = json.loads(plain)
        admin_sign = payload["admin_sign"]
        return HolderSecrets(
            repository_id=repository_id,
            key_id=info.key_id,
            role=info.role,
            id_key=base64.b64decode(payload["id_key"]),
            chunker_key=base64.b64decode(payload["chunker_key"]),
            box_secret=base64.b64decode(payload["box_secret"]),
            sign_secret=base64.b64decode(payload["sign_secret"]),
            admin_verify_key=base64.b64decode(payload["admin_verify_key"]),
            admin_sign=base64.b64decode(admin_sign) if admin_sign else None,
        )
    except (ValueError, KeyError, TypeError) as e:  # authentic but wrong: a bug that wrote it
        raise IntegrityError(f"the key file opened but its content is malformed: {e}") from None
