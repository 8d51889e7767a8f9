"""Drill records (docs/FORMAT.md section 15): that a key holder restored a generation to
prove it restores, when, how long it took, and whether it passed. The objectives module
writes one per drill and `status` reads the newest of each source name."""

from __future__ import annotations

import json
from typing import Any

from dedupe.errors import IntegrityError, UnsupportedFormat
from dedupe.store.sealed import open_record, seal_record

DRILL_PREFIX = "drills/"
DRILL_MAGIC = b"DDPDRL01"
DRILL_AAD = b"dedupe-drill v1"
DRILL_VERSION = 1
MAX_DRILL_BYTES = 1 << 20
DRILL_TARGETS = ("null", "directory", "database")
# What prune keeps of each name's drill records (FORMAT.md 15).
KEEP_DRILLS = 30
KEEP_DRILL_DAYS = 90

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "generation": str,
    "started": str,
    "seconds": (int, float),
    "bytes": int,
    "passed": bool,
    "target": str,
}


def encode_drill(data_key: bytes, record: dict[str, Any]) -> bytes:
    """The bytes of a drill record (its fields as FORMAT.md 15 lists them)."""
    checked = _checked({**record, "version": DRILL_VERSION}, "a drill record")
    plain = json.dumps(checked, sort_keys=True, separators=(",", ":")).encode()
    return seal_record(DRILL_MAGIC, DRILL_AAD, data_key, plain)


def decode_drill(data_key: bytes, name: str, data: bytes) -> dict[str, Any]:
    """The record of a drill whose key map entry gave `data_key`; IntegrityError when it
    is damaged or malformed, UnsupportedFormat for a magic or version not known here."""
    what = f"drill record {name}"
    plain = open_record(DRILL_MAGIC, DRILL_AAD, data_key, name, data, what)
    try:
        record = json.loads(plain)
    except ValueError as e:
        raise IntegrityError(f"{what} is malformed: {e}") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"{what} is malformed: not an object")
    if record.get("version") != DRILL_VERSION:
        raise UnsupportedFormat(f"{what} has version {record.get('version')}, unknown here")
    return _checked(record, what)


def _checked(record: dict[str, Any], what: str) -> dict[str, Any]:
    for field, types in _FIELDS.items():
        value = record.get(field)
        if not isinstance(value, types) or (types is int and isinstance(value, bool)):
            raise IntegrityError(f"{what} is malformed: {field} is {value!r}")
    if record["target"] not in DRILL_TARGETS:
        raise IntegrityError(f"{what} is malformed: target {record['target']!r}")
    rto = record.get("rto_seconds")
    if rto is not None and (isinstance(rto, bool) or not isinstance(rto, int | float)):
        raise IntegrityError(f"{what} is malformed: rto_seconds is {rto!r}")
    for field in ("reason", "check"):
        if record.get(field) is not None and not isinstance(record[field], str):
            raise IntegrityError(f"{what} is malformed: {field} is {record[field]!r}")
    return {
        "version": DRILL_VERSION,
        **{f: record[f] for f in _FIELDS},
        "rto_seconds": rto,
        "reason": record.get("reason"),
        "check": record.get("check"),
    }
