"""Quarantine records (docs/FORMAT.md section 12): chunk copies verify found damaged or
missing. Verify writes them; the store reads them before loading the index, so that a
backup stores such chunks again and readers prefer any other copy."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from dedupe.errors import IntegrityError, MissingObject, UnsupportedFormat
from dedupe.store.sealed import open_record, seal_record

if TYPE_CHECKING:
    from dedupe.backends.base import Backend

# --- record constants -------------------------------------------------------------

QUARANTINE_PREFIX = "quarantine/"
QUARANTINE_MAGIC = b"DDPQUA02"
QUARANTINE_AAD = b"dedupe-quarantine v2"
QUARANTINE_VERSION = 1
MAX_QUARANTINE_BYTES = 64 << 20

# --- records -----------------------------------------------------------------------


def encode_quarantine(
    data_key: bytes, created: str, chunks: list[tuple[bytes, bytes, str]]
) -> bytes:
    """The bytes of a quarantine record listing (chunk id, pack id, reason) triples."""
    record = {
        "version": QUARANTINE_VERSION,
        "created": created,
        "chunks": [{"id": c.hex(), "pack": p.hex(), "reason": r} for c, p, r in chunks],
    }
    plain = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return seal_record(QUARANTINE_MAGIC, QUARANTINE_AAD, data_key, plain)


def decode_quarantine(data_key: bytes, name: str, data: bytes) -> list[tuple[bytes, bytes, str]]:
    """(chunk id, pack id, reason) triples of a quarantine record whose key map entry gave
    `data_key`; IntegrityError when it is damaged, UnsupportedFormat for a magic or version
    this code does not know."""
    what = f"quarantine record {name}"
    plain = open_record(QUARANTINE_MAGIC, QUARANTINE_AAD, data_key, name, data, what)
    try:
        record = json.loads(plain)
        if int(record["version"]) != QUARANTINE_VERSION:
            raise UnsupportedFormat(f"{what} has version {record['version']}, unknown here")
        return [
            (bytes.fromhex(c["id"]), bytes.fromhex(c["pack"]), str(c["reason"]))
            for c in record["chunks"]
        ]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise IntegrityError(f"{what} is malformed: {str(e)[:200]}") from None


Opener = Callable[[str, bytes], Awaitable[list[tuple[bytes, bytes, str]]]]


async def read_quarantine(
    backend: Backend,
    opener: Opener,
    strict: bool = True,
    report: Callable[[str], None] | None = None,
) -> set[tuple[bytes, bytes]]:
    """Every (chunk id, pack id) pair that quarantine records name: chunk copies verify
    found damaged or missing. A backup must not reference such a copy; it stores the chunk
    again. `opener(name, data)` authenticates and decodes a record (the store's
    open_quarantine: its key map entries give its key). A record that cannot be read
    raises IntegrityError naming it when `strict` (prune, which deletes); otherwise it is
    passed to `report` and left out (a backup goes on: verify lists it, and a new verify
    recreates what it held)."""
    pairs: set[tuple[bytes, bytes]] = set()
    for name in sorted(await backend.list(QUARANTINE_PREFIX)):
        try:
            data = await backend.get_small(name, MAX_QUARANTINE_BYTES)
        except MissingObject:  # removed meanwhile (prune): nothing to honour
            continue
        try:
            triples = await opener(name, data)
        except (IntegrityError, UnsupportedFormat) as e:
            if strict:
                raise
            if report is not None:
                report(f"{e.message}; its quarantined chunk copies are not honoured")
            continue
        pairs.update((c, p) for c, p, _ in triples)
    return pairs
