"""XChaCha20-Poly1305-IETF with random 192-bit nonces: `nonce || ciphertext || tag`.

PyNaCl calls libsodium through cffi, which releases the GIL, so batches of seals run in
parallel on worker threads.
"""

from __future__ import annotations

import os

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt as _decrypt,
)
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_encrypt as _encrypt,
)
from nacl.exceptions import CryptoError

from dedupe.errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal(key: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_SIZE)
    return nonce + _encrypt(bytes(plaintext), aad, nonce, key)


def open_sealed(key: bytes, sealed: bytes | memoryview, aad: bytes, what: str) -> bytes:
    """Open a sealed item; `what` names it in the error ("chunk 1a2b..", "index object ..")."""
    if len(sealed) < OVERHEAD:
        raise IntegrityError(f"{what} is too short to be a sealed object ({len(sealed)} bytes)")
    mv = memoryview(sealed)
    try:
        return bytes(_decrypt(bytes(mv[NONCE_SIZE:]), aad, bytes(mv[:NONCE_SIZE]), key))
    except CryptoError:
        raise IntegrityError(
            f"{what} failed authentication: it is damaged or was tampered with",
            hint="run 'dedupe verify --read-data' to find every damaged object",
        ) from None
