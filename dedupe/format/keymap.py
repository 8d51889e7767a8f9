"""Key map layout (docs/FORMAT.md section 4.5): signed lists of wrapped data keys.

    magic "DDPKMAP2" | u32 epoch | signer key id (16) | u32 count | entries | signature (64)

Each entry is `kind u8 | object id (32) | born u32` and then the wraps its kind carries.
This module only lays out bytes; the store signs, verifies and unwraps.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dedupe.errors import IntegrityError, TruncatedObject, UnsupportedFormat

KEYMAP_MAGIC = b"DDPKMAP2"
PACK = 1
INDEX = 2
GENERATION = 3
QUARANTINE = 4
DRILL = 5
DICTIONARY = 6
KIND_NAMES = {
    PACK: "pack",
    INDEX: "index object",
    GENERATION: "generation",
    QUARANTINE: "quarantine record",
    DRILL: "drill record",
    DICTIONARY: "dictionary",
}
SIGNATURE_SIZE = 64
READ_WRAP = 80
META_WRAP = 72
KEY_ID = 16
MAX_ENTRIES = 65536  # per key map, as writers make them (4.6)
MAX_KEYMAP_BYTES = 32 << 20  # a key map of MAX_ENTRIES entries is under 19 MiB

_HEAD = struct.Struct("<8sI16sI")  # magic, epoch, signer, count
_COMMON = struct.Struct("<B32sI")  # kind, object id, born
_FIELDS = {
    PACK: struct.Struct(f"<{READ_WRAP}s"),
    INDEX: struct.Struct(f"<{META_WRAP}s"),
    QUARANTINE: struct.Struct(f"<{META_WRAP}s"),
    DRILL: struct.Struct(f"<{META_WRAP}s"),
    GENERATION: struct.Struct(f"<{META_WRAP}s{READ_WRAP}s{KEY_ID}s{READ_WRAP}s"),
    DICTIONARY: struct.Struct(f"<{READ_WRAP}s{KEY_ID}s{READ_WRAP}s"),
}
# Kinds whose data key a writer key seals to itself as well (its own generations' bodies,
# its own dictionaries): the rest of the data they wrap is for readers only.
SELF_WRAPPED = (GENERATION, DICTIONARY)
_NO_SELF = bytes(KEY_ID)
_NO_WRAP = bytes(READ_WRAP)


@dataclass(frozen=True, slots=True)
class KeyMapEntry:
    """One object's wrapped data keys. `read_wrap`: packs, generation bodies and
    dictionaries; `meta_wrap`: index objects, quarantine records, generation headers;
    `self_key`: the writer key that made a generation or a dictionary (None: an admin);
    `self_wrap`: its body or dictionary key sealed to that writer (None once the writer
    is removed)."""

    kind: int
    object_id: bytes
    born: int
    read_wrap: bytes | None = None
    meta_wrap: bytes | None = None
    self_key: bytes | None = None
    self_wrap: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in _FIELDS:
            raise ValueError(f"unknown key map entry kind {self.kind}")
        if len(self.object_id) != 32:
            raise ValueError("an object id is 32 bytes")
        need_read = self.kind in (PACK, GENERATION, DICTIONARY)
        need_meta = self.kind not in (PACK, DICTIONARY)
        if (self.read_wrap is not None) != need_read or (self.meta_wrap is not None) != need_meta:
            raise ValueError(f"wrong wraps for a {KIND_NAMES[self.kind]} entry")
        if (self.self_wrap is not None and self.self_key is None) or (
            self.self_key is not None and self.kind not in SELF_WRAPPED
        ):
            raise ValueError(
                "a self-wrap needs its key id, and only generations and dictionaries have one"
            )


def encode_entry(e: KeyMapEntry) -> bytes:
    head = _COMMON.pack(e.kind, e.object_id, e.born)
    fields = _FIELDS[e.kind]
    if e.kind == PACK:
        return head + fields.pack(e.read_wrap)
    if e.kind == GENERATION:
        return head + fields.pack(
            e.meta_wrap,
            e.read_wrap,
            e.self_key or _NO_SELF,
            e.self_wrap or _NO_WRAP,
        )
    if e.kind == DICTIONARY:
        return head + fields.pack(e.read_wrap, e.self_key or _NO_SELF, e.self_wrap or _NO_WRAP)
    return head + fields.pack(e.meta_wrap)


def encode_unsigned(epoch: int, signer: bytes, entries: list[KeyMapEntry]) -> bytes:
    """Every byte of a key map before its signature."""
    if len(signer) != KEY_ID:
        raise ValueError("a signer key id is 16 bytes")
    return _HEAD.pack(KEYMAP_MAGIC, epoch, signer, len(entries)) + b"".join(
        encode_entry(e) for e in entries
    )


@dataclass(frozen=True)
class DecodedKeyMap:
    epoch: int
    signer: bytes
    entries: list[KeyMapEntry]
    signed: bytes  # the bytes the signature covers (before the repository id is prefixed)
    signature: bytes


def decode_keymap(data: bytes, what: str) -> DecodedKeyMap:
    """The layout of a key map; its signature is not checked here."""
    if len(data) < _HEAD.size + SIGNATURE_SIZE:
        raise TruncatedObject(f"{what} is too short to be a key map")
    magic, epoch, signer, count = _HEAD.unpack_from(data)
    if magic != KEYMAP_MAGIC:
        if magic.startswith(b"DDPKMAP"):
            raise UnsupportedFormat(f"{what} is a key map of another format version ({magic!r})")
        raise IntegrityError(f"{what} is not a key map (bad magic)")
    body_end = len(data) - SIGNATURE_SIZE
    pos = _HEAD.size
    entries: list[KeyMapEntry] = []
    mv = memoryview(data)
    try:
        for _ in range(count):
            if pos + _COMMON.size > body_end:
                raise struct.error("entry runs into the signature")
            kind, object_id, born = _COMMON.unpack_from(mv, pos)
            pos += _COMMON.size
            fields = _FIELDS.get(kind)
            if fields is None:
                raise IntegrityError(f"{what} has an entry of unknown kind {kind}")
            if pos + fields.size > body_end:
                raise struct.error("entry runs into the signature")
            values = fields.unpack_from(mv, pos)
            pos += fields.size
            if kind == PACK:
                entries.append(KeyMapEntry(kind, object_id, born, read_wrap=values[0]))
            elif kind in SELF_WRAPPED:  # a generation's meta wrap, then both's read and self
                read, self_key, self_wrap = values[-3:]
                entries.append(
                    KeyMapEntry(
                        kind,
                        object_id,
                        born,
                        read_wrap=read,
                        meta_wrap=values[0] if kind == GENERATION else None,
                        self_key=self_key if self_key != _NO_SELF else None,
                        self_wrap=self_wrap if self_wrap != _NO_WRAP else None,
                    )
                )
            else:
                entries.append(KeyMapEntry(kind, object_id, born, meta_wrap=values[0]))
    except struct.error:
        raise TruncatedObject(f"{what} is shorter than its {count} entries") from None
    if pos != body_end:
        raise IntegrityError(f"{what}: its length does not match its {count} entries")
    return DecodedKeyMap(epoch, signer, entries, bytes(data[:body_end]), bytes(data[body_end:]))


def keymap_name(epoch: int, keymap_id: str) -> str:
    return f"keymaps/{epoch:08d}/{keymap_id}"


def keymap_prefix(epoch: int) -> str:
    return f"keymaps/{epoch:08d}/"


def parse_keymap_name(name: str) -> tuple[int, str] | None:
    """(epoch, id) of `keymaps/<nnnnnnnn>/<id>`; None for any other name."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != "keymaps" or len(parts[1]) != 8 or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2]
