"""Key epochs: X25519 key pairs to which per-object data keys are wrapped.

Writing needs only an epoch's public key (a sealed box); reading needs its secret key,
which is stored sealed under `epoch_master` in the epoch record. Records are MACed with
`meta_key` so a repository holder cannot slip in a public key of their own.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from dedupe.crypto.aead import open_sealed, seal
from dedupe.crypto.mac import mac_hex, verify_mac
from dedupe.errors import IntegrityError, KeyNotAvailable

WRAPPED_KEY_SIZE = 80
_AAD = b"dedupe-epoch v1\x00"


@dataclass(frozen=True)
class EpochKeys:
    number: int
    public_key: bytes
    secret_key: bytes | None  # None for a key file that cannot read (writer role)

    def wrap(self, data_key: bytes) -> bytes:
        return wrap_key(self.public_key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        if self.secret_key is None:
            raise KeyNotAvailable(
                f"this key cannot read data of key epoch {self.number}",
                hint="use a key file with the admin or reader role",
            )
        return unwrap_key(self.secret_key, wrapped, self.number)


def wrap_key(public_key: bytes, data_key: bytes) -> bytes:
    wrapped = bytes(SealedBox(PublicKey(public_key)).encrypt(data_key))
    assert len(wrapped) == WRAPPED_KEY_SIZE
    return wrapped


def unwrap_key(secret_key: bytes, wrapped: bytes, epoch: int) -> bytes:
    try:
        return bytes(SealedBox(PrivateKey(secret_key)).decrypt(bytes(wrapped)))
    except CryptoError:
        raise IntegrityError(
            f"a data key wrapped for key epoch {epoch} does not open: the object is damaged"
        ) from None


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def new_epoch(
    number: int, epoch_master: bytes, meta_key: bytes
) -> tuple[dict[str, Any], EpochKeys]:
    """A fresh key pair and its JSON record (docs/FORMAT.md 4.3)."""
    sk = PrivateKey.generate()
    secret, public = bytes(sk), bytes(sk.public_key)
    record: dict[str, Any] = {
        "format": "dedupe-epoch",
        "version": 1,
        "epoch": number,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "public_key": _b64(public),
        "sealed_secret": _b64(seal(epoch_master, secret, _AAD + struct.pack("<I", number))),
    }
    record["mac"] = mac_hex(meta_key, record)
    return record, EpochKeys(number, public, secret)


def read_epoch_record(
    record: dict[str, Any], meta_key: bytes, epoch_master: bytes | None
) -> EpochKeys:
    if record.get("format") != "dedupe-epoch" or record.get("version") != 1:
        raise IntegrityError("an epoch record has an unknown format")
    number = int(record["epoch"])
    if not verify_mac(meta_key, record):
        raise IntegrityError(
            f"key epoch record {number} failed its MAC: it was damaged or tampered with"
        )
    public = base64.b64decode(record["public_key"])
    secret = None
    if epoch_master is not None:
        secret = bytes(
            open_sealed(
                epoch_master,
                base64.b64decode(record["sealed_secret"]),
                _AAD + struct.pack("<I", number),
                f"secret key of epoch {number}",
            )
        )
    return EpochKeys(number, public, secret)
