"""Sealing and keys: XChaCha20-Poly1305 AEAD, passphrase-protected key files (Argon2id),
key epochs (X25519 key pairs) and the wrapping of per-object data keys.

Envelope encryption (docs/FORMAT.md section 4): every pack and every manifest body is
sealed under its own random data key; that key is stored only wrapped to the public key
of the current key epoch. Rotation adds an epoch and re-wraps keys; nothing else changes.
This package knows nothing about packs or manifests; it seals and opens bytes.
"""

from dedupe.crypto.aead import KEY_SIZE, OVERHEAD, new_key, open_sealed, seal
from dedupe.crypto.epochs import EpochKeys, new_epoch, read_epoch_record, unwrap_key, wrap_key
from dedupe.crypto.keyfile import KdfParams, RepositoryKeys, create_key_file, open_key_file
from dedupe.crypto.mac import canonical_json, mac_hex, verify_mac
from dedupe.crypto.passphrase import get_passphrase

__all__ = [
    "KEY_SIZE",
    "OVERHEAD",
    "EpochKeys",
    "KdfParams",
    "RepositoryKeys",
    "canonical_json",
    "create_key_file",
    "get_passphrase",
    "mac_hex",
    "new_epoch",
    "new_key",
    "open_key_file",
    "open_sealed",
    "read_epoch_record",
    "seal",
    "unwrap_key",
    "verify_mac",
    "wrap_key",
]
