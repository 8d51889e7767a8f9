"""Drill records (docs/FORMAT.md section 15): that a key holder restored a generation to
prove it restores, when, how long it took, and whether it passed. The objectives module
writes one per drill and `status` reads the newest of each source name."""

from __future__ import annotations

import json
import math
from datetime import datetime
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

MAX_TEXT = 4096  # a reason or a check's name


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
        record = json.loads(plain, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # a key holder may seal any bytes
        raise IntegrityError(f"{what} is malformed: {str(e)[:200]}") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"{what} is malformed: not an object")
    if record.get("version") != DRILL_VERSION:
        raise UnsupportedFormat(f"{what} has version {record.get('version')!r}, unknown here")
    return _checked(record, what)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def _number(value: Any) -> bool:
    """A JSON number that is not a bool, NaN or infinite."""
    return type(value) in (int, float) and math.isfinite(value)


def _checked(record: dict[str, Any], what: str) -> dict[str, Any]:
    """The record's fields, each of the type and range FORMAT.md 15 gives it (a reader
    key seals what it likes: nothing downstream may meet NaN, a negative size, an
    unparsable time or a path in a name)."""

    def bad(field: str) -> IntegrityError:
        return IntegrityError(f"{what} is malformed: {field} is {str(record.get(field))[:80]!r}")

    name, gen = record.get("name"), record.get("generation")
    if not isinstance(name, str) or not 1 <= len(name) <= 255 or not name.isprintable():
        raise bad("name")
    if not isinstance(gen, str) or len(gen) != 64 or not is_hex(gen):
        raise bad("generation")
    started = record.get("started")
    try:
        assert isinstance(started, str) and len(started) <= 40
        datetime.fromisoformat(started.replace("Z", "+00:00"))
    except (AssertionError, ValueError):
        raise bad("started") from None
    seconds: Any = record.get("seconds")
    size: Any = record.get("bytes")
    rto: Any = record.get("rto_seconds")
    if not _number(seconds) or seconds < 0:
        raise bad("seconds")
    if type(size) is not int or size < 0:
        raise bad("bytes")
    if rto is not None and (not _number(rto) or rto <= 0):
        raise bad("rto_seconds")
    if type(record.get("passed")) is not bool:
        raise bad("passed")
    if record.get("target") not in DRILL_TARGETS:
        raise bad("target")
    for field in ("reason", "check"):
        value = record.get(field)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
            raise bad(field)
    serial = record.get("keyring_serial")
    if serial is not None and (type(serial) is not int or serial < 0):
        raise bad("keyring_serial")
    return {
        "version": DRILL_VERSION,
        "name": name,
        "generation": gen,
        "started": started,
        "seconds": seconds,
        "bytes": size,
        "rto_seconds": rto,
        "passed": record["passed"],
        "target": record["target"],
        "reason": record.get("reason"),
        "check": record.get("check"),
        "keyring_serial": serial,
    }


def is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
