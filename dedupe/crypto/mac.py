"""MACs over JSON records (config, epoch records): keyed BLAKE3 over canonical JSON."""

from __future__ import annotations

import hmac
import json
from typing import Any

import blake3


def canonical_json(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def mac_hex(key: bytes, record: dict[str, Any]) -> str:
    """MAC of every field of `record` except "mac"."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return str(blake3.blake3(canonical_json(body), key=key).hexdigest())


def verify_mac(key: bytes, record: dict[str, Any]) -> bool:
    return hmac.compare_digest(str(record.get("mac", "")), mac_hex(key, record))
