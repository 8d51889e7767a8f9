"""Key epochs, data-key wraps and grants (docs/FORMAT.md sections 4.1 and 4.3).

An epoch is an X25519 *read* key pair and a 32-byte *meta* secret. Data keys of packs and
manifest bodies are wrapped for readers with a sealed box to the read public key
(`read_wrap`); data keys of metadata (index objects, manifest headers, quarantine records)
are sealed under a key derived from `meta` (`meta_wrap`), which writers hold too. A sealed
box proves nothing about who made it: wraps are trusted only inside a signed key map, and
grants only inside the signed keyring. This module seals and opens; it decides no trust.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property

import blake3
from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from dedupe.crypto.aead import open_sealed, seal
from dedupe.crypto.signing import canonical_json
from dedupe.errors import IntegrityError, KeyNotAvailable

BOX_WRAP_SIZE = 80  # sealed box of a 32-byte key
META_WRAP_SIZE = 72  # AEAD of a 32-byte key: nonce 24 + key 32 + tag 16
META_WRAP_CONTEXT = "dedupe 2026-12 key map meta wrap v2"
META_CHECK_CONTEXT = "dedupe 2026-12 epoch meta check v2"
_META_WRAP_AAD = b"dedupe-keymap-wrap v2\x00"


def box_public_of(secret: bytes) -> bytes:
    return bytes(crypto_scalarmult_base(secret))


def new_box_secret() -> bytes:
    return bytes(PrivateKey.generate())


def box_seal(public: bytes, secret: bytes) -> bytes:
    return bytes(SealedBox(PublicKey(public)).encrypt(secret))


def box_open(secret_key: bytes, sealed: bytes, what: str) -> bytes:
    try:
        return bytes(SealedBox(PrivateKey(secret_key)).decrypt(bytes(sealed)))
    except CryptoError:
        raise IntegrityError(f"{what} does not open: it is damaged or not for this key") from None


def meta_wrap_key(meta: bytes) -> bytes:
    return bytes(blake3.blake3(meta, derive_key_context=META_WRAP_CONTEXT).digest())


def meta_check(meta: bytes) -> str:
    """A fingerprint of an epoch's meta secret, published in the keyring so that a grant's
    secret can be checked against it (reveals nothing: a derived key of a random secret)."""
    return str(blake3.blake3(meta, derive_key_context=META_CHECK_CONTEXT).hexdigest())


def _meta_aad(kind: int, object_id: bytes, epoch: int) -> bytes:
    return _META_WRAP_AAD + struct.pack("<B", kind) + object_id + struct.pack("<I", epoch)


@dataclass(frozen=True)
class EpochKeys:
    """What one key holder has of one epoch: the read public key and the meta secret
    always; the read secret only for readers and admins."""

    number: int
    read_public: bytes
    read_secret: bytes | None = field(repr=False)
    meta: bytes = field(repr=False)

    @cached_property
    def meta_wrap(self) -> bytes:
        return meta_wrap_key(self.meta)

    def wrap_read(self, data_key: bytes) -> bytes:
        wrapped = box_seal(self.read_public, data_key)
        assert len(wrapped) == BOX_WRAP_SIZE
        return wrapped

    def unwrap_read(self, wrapped: bytes, what: str) -> bytes:
        if self.read_secret is None:
            raise KeyNotAvailable(
                f"this key cannot open {what}: a writer key opens no data",
                hint="use a key file with the reader or admin role",
            )
        return box_open(self.read_secret, wrapped, f"the data key of {what}")

    def wrap_meta(self, data_key: bytes, kind: int, object_id: bytes) -> bytes:
        return seal(self.meta_wrap, data_key, _meta_aad(kind, object_id, self.number))

    def unwrap_meta(self, wrapped: bytes, kind: int, object_id: bytes, what: str) -> bytes:
        return bytes(
            open_sealed(
                self.meta_wrap,
                wrapped,
                _meta_aad(kind, object_id, self.number),
                f"the data key of {what}",
            )
        )

    def secrets(self) -> EpochSecrets:
        """The epoch's secrets, to grant them to another key holder (admins only)."""
        if self.read_secret is None:
            raise KeyNotAvailable(f"this key does not hold the read secret of epoch {self.number}")
        return EpochSecrets(self.number, self.read_secret, self.meta)


@dataclass(frozen=True)
class EpochSecrets:
    """A new epoch's secrets, as its creator (an admin) holds them to grant them."""

    number: int
    read_secret: bytes = field(repr=False)
    meta: bytes = field(repr=False)

    @classmethod
    def generate(cls, number: int) -> EpochSecrets:
        return cls(number, new_box_secret(), os.urandom(32))

    @property
    def read_public(self) -> bytes:
        return box_public_of(self.read_secret)

    def keys(self, with_read: bool = True) -> EpochKeys:
        return EpochKeys(
            self.number, self.read_public, self.read_secret if with_read else None, self.meta
        )


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def seal_grant(
    box_public: bytes,
    repository_id: bytes,
    key_id: bytes,
    secrets: EpochSecrets,
    with_read: bool,
) -> bytes:
    """A grant: the epoch's secrets (the read secret only `with_read`) sealed to one key
    holder's box public key. It names repository, epoch and key, so that it cannot be
    moved to another."""
    payload = {
        "repository": repository_id.hex(),
        "epoch": secrets.number,
        "key": key_id.hex(),
        "meta": _b64(secrets.meta),
        "read": _b64(secrets.read_secret) if with_read else None,
    }
    return box_seal(box_public, canonical_json(payload))


def open_grant(
    box_secret: bytes,
    sealed: bytes,
    repository_id: bytes,
    key_id: bytes,
    epoch: int,
    read_public: bytes,
    check: str,
) -> EpochKeys:
    """The epoch keys a grant holds, every binding checked (docs/FORMAT.md 4.3)."""
    what = f"the grant of epoch {epoch} to key {key_id.hex()}"
    plain = box_open(box_secret, sealed, what)
    try:
        payload = json.loads(plain)
        if (
            payload["repository"] != repository_id.hex()
            or int(payload["epoch"]) != epoch
            or payload["key"] != key_id.hex()
        ):
            raise IntegrityError(f"{what} names another repository, epoch or key")
        meta = base64.b64decode(payload["meta"], validate=True)
        read = payload["read"]
        read_secret = base64.b64decode(read, validate=True) if read is not None else None
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{what} is malformed: {e}") from None
    if len(meta) != 32 or meta_check(meta) != check:
        raise IntegrityError(f"{what} holds a meta secret the keyring does not know")
    if read_secret is not None and (
        len(read_secret) != 32 or box_public_of(read_secret) != read_public
    ):
        raise IntegrityError(f"{what} holds a read secret that does not match the epoch")
    return EpochKeys(epoch, read_public, read_secret, meta)
