"""XChaCha20-Poly1305-IETF with random 192-bit nonces: `nonce || ciphertext || tag`.

The hot paths call libsodium through PyNaCl's compiled cffi module directly: `seal_into`
writes the sealed item straight into a caller's buffer (a pack being built) and `open_`
decrypts into a fresh bytearray, avoiding the zero-fill and the two copies PyNaCl's
public wrapper makes per call. cffi releases the GIL for these calls, so batches run in
parallel on worker threads. Should the private module move, the public wrapper is used.
"""

from __future__ import annotations

import os

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt as _public_decrypt,
)
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_encrypt as _public_encrypt,
)
from nacl.exceptions import CryptoError

from dedupe.errors import IntegrityError

try:  # PyNaCl's compiled binding to its bundled libsodium
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
except ImportError:  # pragma: no cover - only if PyNaCl reorganises its internals
    _ffi = _lib = None

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE

Buffer = bytes | bytearray | memoryview


def new_key() -> bytes:
    return os.urandom(KEY_SIZE)


def seal(key: bytes, plaintext: Buffer, aad: bytes) -> bytes:
    out = bytearray(len(plaintext) + OVERHEAD)
    seal_into(key, plaintext, aad, out, 0)
    return bytes(out)


def seal_into(key: bytes, plaintext: Buffer, aad: bytes, out: bytearray, pos: int) -> int:
    """Write `nonce || ciphertext || tag` into out[pos:]; returns the position after it.
    `out` must have room for len(plaintext) + OVERHEAD bytes from `pos`."""
    n = len(plaintext)
    end = pos + n + OVERHEAD
    if end > len(out):
        raise ValueError("seal_into: output buffer too small")
    nonce = os.urandom(NONCE_SIZE)
    out[pos : pos + NONCE_SIZE] = nonce
    if _lib is None:
        out[pos + NONCE_SIZE : end] = _public_encrypt(bytes(plaintext), aad, nonce, key)
        return end
    # The buffer exports are released on leaving the block, not whenever the GC gets to
    # the cdata: a lingering export keeps the buffers pinned (and breaks at shutdown).
    with _ffi.from_buffer(out) as dst, _ffi.from_buffer(plaintext) as src:
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            dst + pos + NONCE_SIZE, _ffi.NULL, src, n, aad, len(aad), _ffi.NULL, nonce, key
        )
    if rc != 0:  # libsodium only fails on absurd lengths
        raise ValueError("sealing failed")
    return end


def open_sealed(key: bytes, sealed: Buffer, aad: bytes, what: str) -> bytearray:
    """Open a sealed item; `what` names it in the error ("chunk 1a2b..", "index object ..")."""
    n = len(sealed)
    if n < OVERHEAD:
        raise IntegrityError(f"{what} is too short to be a sealed object ({n} bytes)")
    if _lib is None:
        mv = memoryview(sealed)
        try:
            return bytearray(
                _public_decrypt(bytes(mv[NONCE_SIZE:]), aad, bytes(mv[:NONCE_SIZE]), key)
            )
        except CryptoError:
            raise _damaged(what) from None
    out = bytearray(max(n - OVERHEAD, 1))  # cffi cannot point into an empty buffer
    with _ffi.from_buffer(out) as dst, _ffi.from_buffer(sealed) as src:
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            dst, _ffi.NULL, _ffi.NULL, src + NONCE_SIZE, n - NONCE_SIZE, aad, len(aad), src, key
        )
    del out[n - OVERHEAD :]
    if rc != 0:
        raise _damaged(what)
    return out


def _damaged(what: str) -> IntegrityError:
    return IntegrityError(
        f"{what} failed authentication: it is damaged or was tampered with",
        hint="run 'dedupe verify --read-data' to find every damaged object",
    )
