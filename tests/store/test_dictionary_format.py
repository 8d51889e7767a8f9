"""The bytes of compression dictionaries (docs/FORMAT.md section 16): key map entries of
kind 6, dictionary objects and their names, and how a backup samples its pages."""

from __future__ import annotations

import os

import pytest

from dedupe.crypto import new_key
from dedupe.errors import IntegrityError, UnsupportedFormat
from dedupe.format.keymap import DICTIONARY, GENERATION, KeyMapEntry, decode_keymap, encode_unsigned
from dedupe.hashing import object_id
from dedupe.store import dictionaries
from dedupe.store.dictionaries import (
    MAX_DICT_BYTES,
    PageSampler,
    decode_dictionary,
    dict_name,
    encode_dictionary,
    parse_dict_name,
)


def test_dictionary_entries_round_trip_with_and_without_an_author() -> None:
    r = os.urandom
    entries = [
        KeyMapEntry(DICTIONARY, r(32), 4, read_wrap=r(80)),
        KeyMapEntry(DICTIONARY, r(32), 5, read_wrap=r(80), self_key=r(16), self_wrap=r(80)),
        KeyMapEntry(GENERATION, r(32), 5, read_wrap=r(80), meta_wrap=r(72)),
    ]
    unsigned = encode_unsigned(5, r(16), entries)
    # kind, id, born (37) + read_wrap, self_key, self_wrap (176): 213 bytes an entry
    assert len(unsigned) == 32 + 2 * 213 + 285
    assert decode_keymap(unsigned + b"S" * 64, "k").entries == entries
    with pytest.raises(ValueError):  # a dictionary's key is for readers: no meta wrap
        KeyMapEntry(DICTIONARY, r(32), 1, read_wrap=r(80), meta_wrap=r(72))
    with pytest.raises(ValueError):
        KeyMapEntry(DICTIONARY, r(32), 1)
    with pytest.raises(ValueError):  # a self-wrap names its author
        KeyMapEntry(DICTIONARY, r(32), 1, read_wrap=r(80), self_wrap=r(80))


def test_dictionary_objects_open_only_intact_and_under_their_name() -> None:
    key = new_key()
    data = encode_dictionary(key, b"a dictionary" * 100)
    name = dict_name(b"\x01" * 8, object_id(data))
    assert name == f"dicts/{'01' * 8}/{object_id(data)}"
    assert decode_dictionary(key, name, data) == b"a dictionary" * 100
    with pytest.raises(IntegrityError, match="match its name"):
        decode_dictionary(key, name, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(IntegrityError):
        decode_dictionary(new_key(), name, data)
    other = b"DDPDICT9" + data[8:]
    with pytest.raises(UnsupportedFormat):
        decode_dictionary(key, dict_name(b"\x01" * 8, object_id(other)), other)
    big = b"x" * (MAX_DICT_BYTES + 100)
    with pytest.raises(IntegrityError, match="more than a dictionary"):
        decode_dictionary(key, dict_name(b"\x01" * 8, object_id(big)), big)
    with pytest.raises(ValueError):
        encode_dictionary(key, b"x" * (MAX_DICT_BYTES + 1))
    with pytest.raises(ValueError):
        encode_dictionary(key, b"")


def test_names_parse_only_as_written() -> None:
    oid = "ab" * 32
    assert parse_dict_name(dict_name(b"\xff" * 8, oid)) == (b"\xff" * 8, oid)
    for bad in (
        f"dicts/{'ff' * 8}/{oid}x",
        f"dicts/{'ff' * 7}/{oid}",
        f"dicts/{'FF' * 8}/{oid}",
        f"dicts/{oid}",
        f"packs/{'ff' * 8}/{oid}",
        f"dicts/{'ff' * 8}/x/{oid}",
    ):
        assert parse_dict_name(bad) is None, bad


def test_the_sampler_takes_every_fourth_page_across_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dictionaries, "SAMPLES", 10)
    pages = [memoryview(bytes([i]) * 4096) for i in range(100)]
    s = PageSampler()
    for start, end in ((0, 3), (3, 10), (10, 11), (11, 100)):
        s.feed(pages[start:end])
    assert [p[0] for p in s.samples] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert s.full and s.enough is (10 * 4096 * 4 >= dictionaries.MIN_SAMPLE_BYTES)
    assert len(s.take()) == 10 and s.closed
    s.feed(pages)
    assert s.samples == []


def test_training_makes_a_dictionary_or_says_it_cannot() -> None:
    import random

    rnd = random.Random(5)
    words = [bytes(rnd.choice(b"abcdefgh") for _ in range(6)) for _ in range(50)]
    pages = [b" ".join(rnd.choice(words) for _ in range(700))[:4096] for _ in range(300)]
    d = dictionaries.train(pages, 1)
    assert d is not None and 0 < len(d) <= dictionaries.DICT_SIZE
    assert dictionaries.train([b"x"], 1) is None
