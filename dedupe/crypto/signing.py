"""Ed25519 signatures with domain separation (docs/FORMAT.md section 2).

`sign(seed, domain, data)` signs `domain || 0x00 || data`, so a signature made for one kind
of object (a key map) is never valid for another (a keyring). Signed JSON records carry
their signature in a "signature" field over the canonical JSON of every other field.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from nacl.exceptions import BadSignatureError
from nacl.exceptions import ValueError as NaclValueError
from nacl.signing import SigningKey, VerifyKey

SEED_SIZE = 32
PUBLIC_SIZE = 32
SIGNATURE_SIZE = 64

CONFIG_DOMAIN = "dedupe-config v2"
KEYRING_DOMAIN = "dedupe-keyring v2"
KEYMAP_DOMAIN = "dedupe-keymap v2"


def canonical_json(record: dict[str, Any]) -> bytes:
    """Keys sorted, no whitespace, UTF-8 (docs/FORMAT.md section 1)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def new_signing_seed() -> bytes:
    return os.urandom(SEED_SIZE)


def verify_key_of(seed: bytes) -> bytes:
    return bytes(SigningKey(seed).verify_key)


def _message(domain: str, data: bytes | bytearray | memoryview) -> bytes:
    return domain.encode("ascii") + b"\x00" + bytes(data)


def sign(seed: bytes, domain: str, data: bytes | bytearray | memoryview) -> bytes:
    return bytes(SigningKey(seed).sign(_message(domain, data)).signature)


def verify(
    public: bytes, domain: str, data: bytes | bytearray | memoryview, signature: bytes
) -> bool:
    if len(public) != PUBLIC_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        VerifyKey(public).verify(_message(domain, data), signature)
    except (BadSignatureError, NaclValueError):
        return False
    return True


def _unsigned(record: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in record.items() if k != "signature"})


def sign_record(seed: bytes, domain: str, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with a "signature" over every other field."""
    signature = sign(seed, domain, _unsigned(record))
    return dict(record, signature=base64.b64encode(signature).decode())


def verify_record(public: bytes, domain: str, record: dict[str, Any]) -> bool:
    try:
        signature = base64.b64decode(str(record.get("signature", "")), validate=True)
    except ValueError:
        return False
    return verify(public, domain, _unsigned(record), signature)
