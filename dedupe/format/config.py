"""The repository config record (docs/FORMAT.md section 5)."""

from __future__ import annotations

import json
from typing import Any

from dedupe.errors import IntegrityError, UnsupportedFormat

FORMAT_VERSION = 2
# A new repository's pack target. A backup holds two pack buffers (the pack being
# sealed and the one being written), so this sets ~17 MiB of its peak memory: 8 MiB
# packs brought a 4 GiB backup of pages back under the 150 MiB bar, and at 1 GiB cost
# no measurable time (bench/README.md, "Peak memory at 4 GiB"). An existing repository
# keeps the size its config records.
DEFAULT_PACK_SIZE = 8 * 1024 * 1024
DEFAULT_COMPRESSION_LEVEL = 1
MAX_CONFIG_BYTES = 1 << 20

_ALGORITHMS = {
    "chunk_id": "blake3-keyed",
    "object_id": "blake3",
    "aead": "xchacha20poly1305-ietf",
    "key_wrap": "x25519-sealedbox",
    "signature_algorithm": "ed25519",
}


def new_config(
    repository_id: bytes,
    created: str,
    chunker: dict[str, Any],
    pack_size: int,
    compression_level: int,
) -> dict[str, Any]:
    """The config record without its signature (the store signs it)."""
    return {
        "format": "dedupe-repository",
        "version": FORMAT_VERSION,
        "id": repository_id.hex(),
        "created": created,
        "chunker": chunker,
        "compression": {"algorithm": "zstd", "level": compression_level},
        "pack_size": pack_size,
        **_ALGORITHMS,
    }


def parse_config(data: bytes) -> dict[str, Any]:
    """The config's fields, checked for version and algorithms; its signature is the
    caller's to check once a key file has opened (it pins the admin verify key)."""
    try:
        cfg: dict[str, Any] = json.loads(data)
    except ValueError:
        raise IntegrityError("the repository config is not valid JSON: it is damaged") from None
    if not isinstance(cfg, dict) or cfg.get("format") != "dedupe-repository":
        raise UnsupportedFormat("this is not a dedupe repository config")
    if cfg.get("version") != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"repository format version {cfg.get('version')} is not supported by this dedupe "
            f"(it reads version {FORMAT_VERSION})",
            hint="this dedupe reads no older repository: make a new one with 'dedupe init'"
            if isinstance(cfg.get("version"), int) and cfg["version"] < FORMAT_VERSION
            else "upgrade dedupe",
        )
    for field, value in _ALGORITHMS.items():
        if cfg.get(field) != value:
            raise UnsupportedFormat(f"unsupported {field} {cfg.get(field)!r} in repository config")
    if cfg.get("compression", {}).get("algorithm") != "zstd":
        raise UnsupportedFormat("unsupported compression in repository config")
    try:
        bytes.fromhex(cfg["id"])
        int(cfg["pack_size"])
        int(cfg["compression"]["level"])
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"the repository config is malformed: {e}") from None
    return cfg
