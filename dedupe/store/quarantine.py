"""Quarantine records (docs/FORMAT.md section 12): chunk copies verify found damaged or
missing. Verify writes them; the store reads them before loading the index, so that a
backup stores such chunks again and readers prefer any other copy."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from dedupe.crypto import open_sealed, seal
from dedupe.errors import IntegrityError, MissingObject, UnsupportedFormat
from dedupe.hashing import object_id

if TYPE_CHECKING:
    from dedupe.backends.base import Backend

# --- record constants -------------------------------------------------------------

QUARANTINE_PREFIX = "quarantine/"
QUARANTINE_MAGIC = b"DDPQUA01"
QUARANTINE_AAD = b"dedupe-quarantine v1"
QUARANTINE_VERSION = 1

# --- records -----------------------------------------------------------------------


def encode_quarantine(
    meta_key: bytes, created: str, chunks: list[tuple[bytes, bytes, str]]
) -> bytes:
    """The bytes of a quarantine record listing (chunk id, pack id, reason) triples."""
    record = {
        "version": QUARANTINE_VERSION,
        "created": created,
        "chunks": [{"id": c.hex(), "pack": p.hex(), "reason": r} for c, p, r in chunks],
    }
    plain = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return QUARANTINE_MAGIC + seal(meta_key, plain, QUARANTINE_AAD)


def decode_quarantine(meta_key: bytes, name: str, data: bytes) -> list[tuple[bytes, bytes, str]]:
    """(chunk id, pack id, reason) triples of a quarantine record; IntegrityError when it is
    damaged, UnsupportedFormat for a magic or version this code does not know."""
    what = f"quarantine record {name}"
    if object_id(data) != name.rsplit("/", 1)[-1]:
        raise IntegrityError(f"{what} does not match its name: it is damaged")
    if data[:8] != QUARANTINE_MAGIC:
        raise UnsupportedFormat(f"{what} has an unknown magic")
    plain = open_sealed(meta_key, memoryview(data)[8:], QUARANTINE_AAD, what)
    try:
        record = json.loads(plain)
        if int(record["version"]) != QUARANTINE_VERSION:
            raise UnsupportedFormat(f"{what} has version {record['version']}, unknown here")
        return [
            (bytes.fromhex(c["id"]), bytes.fromhex(c["pack"]), str(c["reason"]))
            for c in record["chunks"]
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{what} is malformed: {e}") from None


async def read_quarantine(
    backend: Backend, meta_key: bytes, strict: bool = True
) -> set[tuple[bytes, bytes]]:
    """Every (chunk id, pack id) pair that quarantine records name: chunk copies verify
    found damaged or missing. A backup must not reference such a copy; it stores the chunk
    again. Raises IntegrityError naming a damaged record (delete it and run verify again)."""
    pairs: set[tuple[bytes, bytes]] = set()
    for name in sorted(await backend.list(QUARANTINE_PREFIX)):
        try:
            data = await backend.get(name)
        except MissingObject:  # removed meanwhile (prune): nothing to honour
            continue
        try:
            triples = await asyncio.to_thread(decode_quarantine, meta_key, name, data)
        except (IntegrityError, UnsupportedFormat):
            if strict:
                raise
            continue  # verify reports it; a damaged record must not block backups

        pairs.update((c, p) for c, p, _ in triples)
    return pairs
