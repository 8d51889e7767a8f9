"""Sealing, signing and keys: XChaCha20-Poly1305 AEAD, Ed25519 signatures,
passphrase-protected key files (Argon2id), key epochs (X25519 read key pairs and meta
secrets), data-key wraps and grants.

Envelope encryption (docs/FORMAT.md section 4): every object is sealed under its own
random data key; that key is stored only wrapped for the current key epoch, in signed key
maps that live outside the object. This package knows nothing about packs, manifests or
key maps; it seals, signs and opens bytes, and decides no trust.
"""

from dedupe.crypto.aead import KEY_SIZE, OVERHEAD, new_key, open_sealed, seal
from dedupe.crypto.epochs import (
    BOX_WRAP_SIZE,
    META_WRAP_SIZE,
    EpochKeys,
    EpochSecrets,
    box_open,
    box_seal,
    meta_check,
    open_grant,
    seal_grant,
)
from dedupe.crypto.keyfile import (
    ROLES,
    HolderSecrets,
    KdfParams,
    KeyFileInfo,
    create_key_file,
    key_file_info,
    open_key_file,
)
from dedupe.crypto.passphrase import get_passphrase
from dedupe.crypto.signing import canonical_json, sign, sign_record, verify, verify_record

__all__ = [
    "BOX_WRAP_SIZE",
    "KEY_SIZE",
    "META_WRAP_SIZE",
    "OVERHEAD",
    "ROLES",
    "EpochKeys",
    "EpochSecrets",
    "HolderSecrets",
    "KdfParams",
    "KeyFileInfo",
    "box_open",
    "box_seal",
    "canonical_json",
    "create_key_file",
    "get_passphrase",
    "key_file_info",
    "meta_check",
    "new_key",
    "open_grant",
    "open_key_file",
    "open_sealed",
    "seal",
    "seal_grant",
    "sign",
    "sign_record",
    "verify",
    "verify_record",
]
