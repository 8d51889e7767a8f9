"""Encoders and decoders of docs/FORMAT.md agree with each other and reject damage."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest

from dedupe.errors import IntegrityError, TruncatedObject, UnsupportedFormat
from dedupe.format.index import (
    IndexEntry,
    PackRecord,
    decode_index,
    encode_entry_records,
    encode_index,
)
from dedupe.format.keymap import (
    GENERATION,
    INDEX,
    PACK,
    QUARANTINE,
    KeyMapEntry,
    decode_keymap,
    encode_unsigned,
    parse_keymap_name,
)
from dedupe.format.keyring import ACTIVE, RETIRED, EpochRecord, KeyHolder, Keyring
from dedupe.format.manifest import GEN_MAGIC, encode_prefix, header_span
from dedupe.format.pack import (
    FOOTER_SIZE,
    PackEntry,
    decode_footer,
    decode_trailer,
    encode_footer,
    encode_trailer,
)


def test_pack_trailer_and_footer() -> None:
    entries = [PackEntry(os.urandom(32), 8 + i * 100, 100, 250) for i in range(5)]
    assert decode_trailer(encode_trailer(entries), "p") == entries
    footer = encode_footer(1234)
    assert len(footer) == FOOTER_SIZE == 12
    assert decode_footer(100_000, footer, "p") == 1234
    with pytest.raises(TruncatedObject):
        decode_footer(100_000, footer[:-1] + b"X", "p")
    with pytest.raises(UnsupportedFormat):  # a version 1 footer ends in DDPKEND1
        decode_footer(100_000, footer[:-1] + b"1", "p")


def test_index_round_trip_and_bad_pack_number() -> None:
    packs = [PackRecord(os.urandom(32), 123456) for _ in range(3)]
    entries = [IndexEntry(os.urandom(32), i % 3, i * 10, 10, 20) for i in range(50)]
    got_packs, got_entries = decode_index(encode_index(packs, encode_entry_records(entries)), "i")
    assert got_packs == packs
    assert got_entries == [
        (e.chunk_id, e.pack_no, e.offset, e.stored_length, e.raw_length) for e in entries
    ]
    bad = encode_index(packs[:1], encode_entry_records(entries))
    with pytest.raises(IntegrityError):
        decode_index(bad, "i")


def _entries() -> list[KeyMapEntry]:
    r = os.urandom
    return [
        KeyMapEntry(PACK, r(32), 1, read_wrap=r(80)),
        KeyMapEntry(INDEX, r(32), 2, meta_wrap=r(72)),
        KeyMapEntry(GENERATION, r(32), 2, read_wrap=r(80), meta_wrap=r(72)),
        KeyMapEntry(
            GENERATION, r(32), 3, read_wrap=r(80), meta_wrap=r(72), self_key=r(16), self_wrap=r(80)
        ),
        KeyMapEntry(QUARANTINE, r(32), 3, meta_wrap=r(72)),
    ]


def test_key_map_layout_round_trips_and_rejects_damage() -> None:
    entries = _entries()
    signer = os.urandom(16)
    unsigned = encode_unsigned(7, signer, entries)
    data = unsigned + b"S" * 64
    km = decode_keymap(data, "k")
    assert (km.epoch, km.signer, km.entries) == (7, signer, entries)
    assert km.signed == unsigned and km.signature == b"S" * 64
    # 117 + 109 + 285 * 2 + 109 bytes of entries after a 32-byte head
    assert len(unsigned) == 32 + 117 + 109 + 2 * 285 + 109
    with pytest.raises(TruncatedObject):  # one entry short
        decode_keymap(unsigned[:-109] + b"S" * 64, "k")
    with pytest.raises(IntegrityError):  # a byte too many
        decode_keymap(unsigned + b"x" + b"S" * 64, "k")
    with pytest.raises(UnsupportedFormat):
        decode_keymap(b"DDPKMAP1" + data[8:], "k")
    bad_kind = bytearray(data)
    bad_kind[32] = 9
    with pytest.raises(IntegrityError, match="unknown kind"):
        decode_keymap(bytes(bad_kind), "k")
    with pytest.raises(ValueError):  # a pack entry carries no meta wrap
        KeyMapEntry(PACK, os.urandom(32), 1, read_wrap=os.urandom(80), meta_wrap=os.urandom(72))
    assert parse_keymap_name("keymaps/00000007/ab") == (7, "ab")
    assert parse_keymap_name("keymaps/7/ab") is None


def _keyring() -> Keyring:
    a, w = os.urandom(16), os.urandom(16)
    keys = (
        KeyHolder(a, "default", "admin", "t", os.urandom(32), os.urandom(32)),
        KeyHolder(w, "w", "writer", "t", os.urandom(32), os.urandom(32)),
    )
    epochs = (
        EpochRecord(1, "t", RETIRED, os.urandom(32), "ab" * 32, {}, "t2"),
        EpochRecord(2, "t", ACTIVE, os.urandom(32), "cd" * 32, {a: b"g1", w: b"g2"}),
    )
    return Keyring(os.urandom(32), 3, "t", keys, epochs, 2)


def test_keyring_record_round_trips_and_checks_its_structure() -> None:
    ring = _keyring()
    assert Keyring.from_record(ring.to_record()) == ring
    with_policy = dict(ring.to_record(), policies=[_POLICY])
    assert Keyring.from_record(with_policy).to_record() == with_policy
    assert "policies" not in ring.to_record()  # a keyring without any keeps its bytes
    record = ring.to_record()
    record["current_epoch"] = 1  # a retired epoch cannot be current
    with pytest.raises(IntegrityError, match="current epoch"):
        Keyring.from_record(record)
    record = ring.to_record()
    del record["epochs"][1]["grants"][ring.keys[1].key_id.hex()]
    with pytest.raises(IntegrityError, match="does not grant every key holder"):
        Keyring.from_record(record)
    record = ring.to_record()
    record["keys"][0]["role"] = "writer"
    with pytest.raises(IntegrityError, match="no admin"):
        Keyring.from_record(record)
    record = ring.to_record()
    record["epochs"][0]["grants"] = {ring.keys[0].key_id.hex(): "AAAA"}
    with pytest.raises(IntegrityError, match="retired epoch 1 still holds grants"):
        Keyring.from_record(record)
    with pytest.raises(UnsupportedFormat):
        Keyring.from_record(dict(ring.to_record(), version=1))


def test_manifest_prefix_and_older_versions() -> None:
    prefix = encode_prefix(b"h" * 100)
    assert prefix[:8] == GEN_MAGIC and header_span(prefix, "g") == (12, 112)
    for old in (b"DDPGEN01", b"DDPGEN02"):
        with pytest.raises(UnsupportedFormat, match="another format version"):
            header_span(old + prefix[8:], "g")
    with pytest.raises(IntegrityError, match="claims a header"):
        header_span(GEN_MAGIC + (2 << 20).to_bytes(4, "little"), "g")


def _key_twice(r: dict[str, Any]) -> None:
    r["keys"].append(dict(r["keys"][1], name="w again"))


def _epoch_twice(r: dict[str, Any]) -> None:
    r["epochs"].append(dict(r["epochs"][1]))


def _newer_active_epoch(r: dict[str, Any]) -> None:
    r["epochs"].append(dict(r["epochs"][1], number=3))


def _grant_to_a_stranger(r: dict[str, Any]) -> None:
    r["epochs"][1]["grants"][os.urandom(16).hex()] = base64.b64encode(b"g3").decode()


def _current_retired(r: dict[str, Any]) -> None:
    r["epochs"][1].update(state="retired", retired="t3", grants={})


def _epoch_zero(r: dict[str, Any]) -> None:
    r["epochs"][0]["number"] = 0


def _short_key_id(r: dict[str, Any]) -> None:
    grants = r["epochs"][1]["grants"]
    short = os.urandom(8).hex()
    grants[short] = grants.pop(r["keys"][1]["id"])
    r["keys"][1]["id"] = short


_POLICY = {
    "name": "orders",
    "rpo_seconds": 3600,
    "rto_seconds": 900,
    "drill_max_age_seconds": 604800,
    "set": "t",
}


def _policy_twice(r: dict[str, Any]) -> None:
    r["policies"] = [_POLICY, dict(_POLICY, rpo_seconds=60)]


def _policy_of_no_time(r: dict[str, Any]) -> None:
    r["policies"] = [dict(_POLICY, rto_seconds=0)]


def _policy_of_a_float(r: dict[str, Any]) -> None:
    r["policies"] = [dict(_POLICY, rpo_seconds=3600.5)]


def _policy_unnamed(r: dict[str, Any]) -> None:
    r["policies"] = [dict(_POLICY, name="")]


STRUCTURE = {
    "two policies for one name": (_policy_twice, "two policies are for the same name"),
    "an objective of 0 s": (_policy_of_no_time, "objectives are whole seconds"),
    "an objective of a fraction of a second": (_policy_of_a_float, "objectives are whole"),
    "a policy without a name": (_policy_unnamed, "1 to 255 printable"),
    "a key listed twice": (_key_twice, "a key id appears twice"),
    "an epoch listed twice": (_epoch_twice, "an epoch appears twice"),
    "a newer active epoch than the current": (_newer_active_epoch, "not the newest active"),
    "a grant to a key not in the keyring": (_grant_to_a_stranger, "grants a key that is not"),
    "an epoch 0": (_epoch_zero, "epoch numbers start at 1"),
    "the current epoch retired, none active": (_current_retired, "is not an active epoch"),
    "a key id of 8 bytes": (_short_key_id, "a key id is 16 bytes"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE))
def test_a_keyring_of_inconsistent_structure_is_refused(case: str) -> None:
    """Keyring.problem, EpochRecord and KeyHolder parsing (docs/FORMAT.md 4.3): shapes an
    admin must never sign, refused when read (the rules test_format does not already
    cover)."""
    edit, why = STRUCTURE[case]
    record = _keyring().to_record()
    edit(record)
    with pytest.raises(IntegrityError, match=why):
        Keyring.from_record(record)
