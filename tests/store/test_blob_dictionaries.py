"""Blobs compressed with a zstd dictionary (compression byte 2, docs/FORMAT.md sections 6
and 16), through the native kernels (csrc/blobcodec.c) and their pure-Python twin: real
zstd, real sealing, a dictionary trained on the pages of a real SQLite database. Each
codec opens what the other framed; a blob whose dictionary the codec lacks raises
DictionaryNeeded naming that chunk and ref on every way of opening; a wrong, conflicting
or refused dictionary, a cut-short blob or a frame recording another size is refused,
never opened into wrong bytes; blobs without a dictionary are framed and opened exactly
as before."""

from __future__ import annotations

import json
import random
import sqlite3
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import zstandard

from dedupe.crypto import OVERHEAD, new_key
from dedupe.crypto.aead import open_sealed, seal_into
from dedupe.errors import DictionaryNeeded, IntegrityError
from dedupe.format.pack import (
    COMPRESSION_NONE,
    COMPRESSION_ZSTD,
    COMPRESSION_ZSTD_DICT,
    DICT_REF,
)
from dedupe.hashing import ChunkHasher
from dedupe.store import blobs as blobs_module
from dedupe.store.blobs import PLAN_ITEM, BlobCodec, Dictionary, seal_batch

HASHER = ChunkHasher(bytes(range(32)))
TRAILER = struct.Struct("<32sIII")
PAGE = 4096
both = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
Item = tuple[bytes, int, int, int]


def _sqlite_pages(path: Path) -> list[bytes]:
    """The 4 KiB pages of a ~1.5 MiB SQLite database: tables and indexes of generated
    customers and orders."""
    rnd = random.Random(11)
    words = [
        "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=rnd.randrange(3, 9)))
        for _ in range(400)
    ]
    db = sqlite3.connect(path)
    db.execute("pragma page_size=4096")
    db.execute(
        "create table customers(id integer primary key, name text, email text, city text,"
        " balance real)"
    )
    db.execute(
        "create table orders(id integer primary key, customer integer, sku text, qty integer,"
        " note text)"
    )
    db.execute("create index orders_customer on orders(customer)")
    for i in range(1, 6001):
        first, last = rnd.choice(words).title(), rnd.choice(words).title()
        db.execute(
            "insert into customers values(?, ?, ?, ?, ?)",
            (
                i,
                f"{first} {last}",
                f"{first}.{last}@{rnd.choice(words)}.com".lower(),
                rnd.choice(words[:40]).title(),
                round(rnd.uniform(-100, 10_000), 2),
            ),
        )
        db.execute(
            "insert into orders values(null, ?, ?, ?, ?)",
            (
                rnd.randrange(1, i + 1),
                f"SKU-{rnd.randrange(10**5):05d}",
                rnd.randrange(1, 9),
                " ".join(rnd.choices(words, k=rnd.randrange(0, 8))),
            ),
        )
    db.commit()
    db.close()
    data = path.read_bytes()
    return [data[i : i + PAGE] for i in range(0, len(data), PAGE)]


def _records(n: int, seed: int) -> list[bytes]:
    """Chunks of JSON event records: structured, and unlike SQLite pages."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        events = [
            {
                "ts": 1_700_000_000 + rnd.randrange(10**6),
                "level": rnd.choice(["info", "warn"]),
                "user": rnd.randrange(5000),
                "path": f"/api/v{rnd.randrange(3)}/items/{rnd.randrange(999)}",
                "ms": round(rnd.expovariate(0.05), 3),
            }
            for _ in range(30)
        ]
        out.append(json.dumps(events).encode()[:PAGE])
    return out


def _dictionary(samples: list[bytes], size: int) -> Dictionary:
    chosen: list[bytes | bytearray | memoryview] = list(samples)
    data = zstandard.train_dictionary(size, chosen).as_bytes()
    return Dictionary(HASHER.chunk_id(data)[:DICT_REF], data)


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    return _sqlite_pages(tmp_path_factory.mktemp("sqlite") / "shop.db")


@pytest.fixture(scope="module")
def pages_dict(pages: list[bytes]) -> Dictionary:
    """A dictionary trained on every other page (what backup trains on is a sample too)."""
    return _dictionary(pages[::2], 32 * 1024)


@pytest.fixture(scope="module")
def records_dict() -> Dictionary:
    return _dictionary(_records(400, 1), 16 * 1024)


def _seal(
    codec: BlobCodec, chunks: list[bytes], key: bytes, d: Dictionary | None
) -> tuple[bytes, list[Item]]:
    """Frame (with d) and seal chunks into one pack-like buffer: (its bytes, its items)."""
    batch = codec.frame(chunks, HASHER.chunk_ids(chunks), d)
    dst = bytearray(sum(len(c) + 1 + OVERHEAD for c in chunks))
    records = bytearray()
    end = seal_batch(key, batch, dst, 0, len(dst), records)
    assert batch.pending == 0
    return bytes(dst[:end]), list(TRAILER.iter_unpack(records))


def _sealed(key: bytes, plaintext: bytes, cid: bytes) -> bytes:
    out = bytearray(len(plaintext) + OVERHEAD)
    seal_into(key, plaintext, cid, out, 0)
    return bytes(out)


def _plaintexts(key: bytes, data: bytes, items: list[Item]) -> list[bytes]:
    return [bytes(open_sealed(key, data[off : off + st], cid, "b")) for cid, off, st, _ in items]


def _every_way(
    codec: BlobCodec, key: bytes, data: bytes, items: list[Item]
) -> dict[str, Callable[[], Any]]:
    """Every way a reader opens blobs, each returning the chunks (check_records: None)."""

    def planned() -> list[bytes]:
        places = [sum(it[3] for it in items[:i]) for i in range(len(items))]
        plan = b"".join(
            PLAN_ITEM.pack(0, off, st, raw, at)
            for (_c, off, st, raw), at in zip(items, places, strict=True)
        )
        out = codec.window_buffer(sum(it[3] for it in items))
        codec.open_planned(key, data, 0, b"".join(it[0] for it in items), plan, 0, len(items), out)
        window = memoryview(out)
        return [bytes(window[at : at + it[3]]) for it, at in zip(items, places, strict=True)]

    def joined() -> list[bytes]:
        view, ends = codec.open_joined(key, data, 0, items)
        return [bytes(view[s:e]) for s, e in zip([0, *ends], ends, strict=False)]

    return {
        "open": lambda: [codec.open(key, c, data[o : o + s], r) for c, o, s, r in items],
        "open_many": lambda: [bytes(c) for c in codec.open_many(key, data, 0, items)],
        "open_joined": joined,
        "check_records": lambda: codec.check_records(
            key, data, b"".join(TRAILER.pack(*it) for it in items), 0, len(items)
        ),
        "open_planned": planned,
        "open_as_stored": lambda: [bytes(c) for c in codec.open_as_stored(key, data, 0, items)[0]],
    }


def _opens_to(
    codec: BlobCodec, key: bytes, data: bytes, items: list[Item], chunks: list[bytes]
) -> None:
    for how, go in _every_way(codec, key, data, items).items():
        got = go()
        assert got is None if how == "check_records" else got == chunks, how


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("framer", [True, False], ids=["native-framed", "python-framed"])
@pytest.mark.parametrize("opener", [True, False], ids=["native-opened", "python-opened"])
def test_pages_round_trip_with_a_dictionary_across_both_codecs(
    pages: list[bytes], pages_dict: Dictionary, framer: bool, opener: bool
) -> None:
    key = new_key()
    chunks = pages[1::2][:150]  # pages the dictionary was not trained on
    data, items = _seal(BlobCodec(3, HASHER, native=framer), chunks, key, pages_dict)
    plain = _plaintexts(key, data, items)
    dict_blobs = [p for p in plain if p[0] == COMPRESSION_ZSTD_DICT]
    assert len(dict_blobs) > len(chunks) * 0.9  # nearly every page compresses with it
    assert {p[0] for p in plain} <= {COMPRESSION_NONE, COMPRESSION_ZSTD_DICT}
    for p, chunk in zip(plain, chunks, strict=True):
        if p[0] == COMPRESSION_ZSTD_DICT:
            assert p[1:9] == pages_dict.ref and len(p) < 1 + len(chunk)
            frame = zstandard.get_frame_parameters(p[9:])
            assert frame.content_size == len(chunk) and frame.dict_id == 0
        else:
            assert p == b"\x00" + chunk
    codec = BlobCodec(3, HASHER, native=opener)
    codec.add_dictionary(pages_dict)
    assert codec.dictionary(pages_dict.ref) is pages_dict
    _opens_to(codec, key, data, items, chunks)


@both
def test_open_as_stored_names_the_dictionary_of_each_blob(
    pages: list[bytes], pages_dict: Dictionary, native: bool
) -> None:
    """Prune's repack compresses a chunk again as it found it: open_as_stored gives each
    blob's dictionary ref (None for a blob stored raw or compressed without one)."""
    key = new_key()
    with_dict, without = pages[1::2][:40], pages[::2][:40]
    a, first = _seal(BlobCodec(3, HASHER, native=native), with_dict, key, pages_dict)
    b, second = _seal(BlobCodec(3, HASHER, native=native), without, key, None)
    data, items = a + b, first + [(c, off + len(a), st, raw) for c, off, st, raw in second]
    want = [
        bytes(p[1:9]) if p[0] == COMPRESSION_ZSTD_DICT else None
        for p in _plaintexts(key, data, items)
    ]
    assert want.count(None) >= 40 and want.count(pages_dict.ref) > 30
    codec = BlobCodec(3, HASHER, native=native)
    codec.add_dictionary(pages_dict)
    chunks, refs = codec.open_as_stored(key, data, 0, items)
    assert [bytes(c) for c in chunks] == with_dict + without
    assert refs == want


@both
def test_the_dictionary_pays_for_its_ref(
    pages: list[bytes], pages_dict: Dictionary, native: bool
) -> None:
    """On pages it was not trained on, the dictionary's frames, ref included, are smaller
    than frames without it (else it is not in use at all)."""
    codec = BlobCodec(3, HASHER, native=native)
    chunks = pages[1::2]
    ids = HASHER.chunk_ids(chunks)
    with_dict = codec.frame(chunks, ids, pages_dict).framed_bytes
    without = codec.frame(chunks, ids).framed_bytes
    assert with_dict < without * 0.95


@both
def test_blobs_of_two_dictionaries_and_none_open_in_one_call(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    """The kernel finds each blob's dictionary among several (not the first one's)."""
    key = new_key()
    sealer = BlobCodec(3, HASHER, native=native)
    parts = [
        (pages[1:40:2], pages_dict),
        (_records(20, 2), records_dict),
        (pages[41:60:2], None),
        (_records(10, 3), records_dict),
    ]
    data, items, chunks = b"", [], []
    for part, d in parts:
        more, its = _seal(sealer, part, key, d)
        items += [(c, o + len(data), s, r) for c, o, s, r in its]
        data += more
        chunks += part
    kinds = {p[0] for p in _plaintexts(key, data, items)}
    assert {COMPRESSION_ZSTD, COMPRESSION_ZSTD_DICT} <= kinds
    for opener in (True, False):
        codec = BlobCodec(3, HASHER, native=opener)
        codec.add_dictionary(records_dict)
        codec.add_dictionary(pages_dict)
        _opens_to(codec, key, data, items, chunks)


@both
def test_framing_with_and_without_a_dictionary_share_a_context_cleanly(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    """One thread's codec frames with a dictionary, then without, then with another:
    the batches without one are byte for byte what a codec that never saw a dictionary
    writes (no dictionary state is left in the zstd context)."""
    key = new_key()
    chunks = pages[3:80:2]
    fresh = BlobCodec(3, HASHER, native=native)
    mixed = BlobCodec(3, HASHER, native=native)
    mixed.add_dictionary(records_dict)  # registered dictionaries never touch framing
    expected = _plaintexts(key, *_seal(fresh, chunks, key, None))
    for d in (pages_dict, None, records_dict, None, pages_dict):
        data, items = _seal(mixed, chunks, key, d)
        got = _plaintexts(key, data, items)
        if d is None:
            assert got == expected
            continue
        assert {p[0] for p in got} == {COMPRESSION_ZSTD_DICT}
        only = BlobCodec(3, HASHER, native=not native)  # made with d, and d alone
        only.add_dictionary(d)
        _opens_to(only, key, data, items, chunks)


def test_each_level_frames_with_its_own_parameters(
    pages: list[bytes], pages_dict: Dictionary
) -> None:
    """One Dictionary serves codecs of several levels: each frames at its own level (a
    CDict is made per level), whichever level used it first. At the usual levels the
    kernel writes the twin's bytes; at 19 the CDicts the two make differ a little."""
    key = new_key()
    chunks = pages[1:120:2]
    sizes: dict[tuple[int, bool], int] = {}
    for level in (1, 19, 3, 1):
        framed = {
            n: _plaintexts(key, *_seal(BlobCodec(level, HASHER, native=n), chunks, key, pages_dict))
            for n in (True, False)
        }
        if level < 19:
            assert framed[True] == framed[False], level
        for n, plain in framed.items():
            assert sizes.setdefault((level, n), sum(map(len, plain))) == sum(map(len, plain))
    for n in (True, False):
        assert sizes[19, n] < sizes[3, n] < sizes[1, n]


# --- what is stored raw ----------------------------------------------------------------------


@both
def test_incompressible_and_tiny_chunks_are_stored_raw(
    pages_dict: Dictionary, native: bool
) -> None:
    key = new_key()
    rnd = random.Random(5)
    chunks = [rnd.randbytes(PAGE), rnd.randbytes(100), b"\x07", b"", b"123456789"]
    data, items = _seal(BlobCodec(3, HASHER, native=native), chunks, key, pages_dict)
    assert _plaintexts(key, data, items) == [b"\x00" + c for c in chunks]
    codec = BlobCodec(3, HASHER, native=not native)  # raw blobs need no dictionary
    _opens_to(codec, key, data, items, chunks)


def test_a_dictionary_frame_is_kept_only_when_it_beats_the_raw_blob(pages_dict: Dictionary) -> None:
    """2 || ref || frame is kept only when shorter than 0 || chunk: at the boundary (the
    frame 8 bytes shorter than the chunk, so as long as the raw blob) both codecs store
    the chunk raw. One byte shorter, the twin compresses it; the kernel may store it raw
    (zstd wants a few bytes of slack past the frame in the room it is given, as for
    byte 1 blobs), and what it compresses is the twin's frame, byte for byte."""
    native, pure = BlobCodec(3, HASHER, native=True), BlobCodec(3, HASHER, native=False)
    compress = zstandard.ZstdCompressor(
        level=3, dict_data=pages_dict.pure_frame(3), write_dict_id=False
    ).compress
    rnd = random.Random(9)
    equal: list[bytes] = []
    shorter: list[bytes] = []
    for _ in range(4000):
        n = rnd.randrange(12, 60)
        half = bytes(rnd.choices(b"abcdefgh", k=n // 2))
        chunk = half * 2 + bytes(rnd.choices(b"abcdefgh", k=n % 2))
        z = len(compress(chunk))
        if 9 + z == 1 + len(chunk) and len(equal) < 40:
            equal.append(chunk)
        elif 9 + z == len(chunk) and len(shorter) < 40:
            shorter.append(chunk)
    assert len(equal) == len(shorter) == 40  # the search found both sides of the boundary
    key = new_key()
    twin = _plaintexts(key, *_seal(pure, equal + shorter, key, pages_dict))
    kernel = _plaintexts(key, *_seal(native, equal + shorter, key, pages_dict))
    assert twin == [b"\x00" + c for c in equal] + [
        b"\x02" + pages_dict.ref + compress(c) for c in shorter
    ]
    assert kernel[: len(equal)] == twin[: len(equal)]
    for k, t, c in zip(kernel[len(equal) :], twin[len(equal) :], shorter, strict=True):
        assert k in (t, b"\x00" + c)


# --- a missing dictionary ------------------------------------------------------------------


@both
def test_a_missing_dictionary_is_named_on_every_way_of_opening(
    pages: list[bytes], pages_dict: Dictionary, native: bool
) -> None:
    """The blob that needs the dictionary comes after blobs that do not: DictionaryNeeded
    names its chunk and the ref its blob carries; once given the dictionary, it opens."""
    key = new_key()
    sealer = BlobCodec(3, HASHER, native=not native)
    raw_chunk = random.Random(1).randbytes(500)
    plain_data, plain_items = _seal(sealer, [pages[0], raw_chunk], key, None)
    dict_data, dict_items = _seal(sealer, [pages[5]], key, pages_dict)
    data = plain_data + dict_data
    items = plain_items + [(c, o + len(plain_data), s, r) for c, o, s, r in dict_items]
    chunks = [pages[0], raw_chunk, pages[5]]
    assert _plaintexts(key, data, items)[2][0] == COMPRESSION_ZSTD_DICT
    codec = BlobCodec(3, HASHER, native=native)
    for how, go in _every_way(codec, key, data, items).items():
        with pytest.raises(DictionaryNeeded) as info:
            go()
        assert info.value.chunk_id == items[2][0], how
        assert info.value.ref == pages_dict.ref, how
        assert pages_dict.ref.hex() in str(info.value), how
    # A job that starts past item 0 (restore's split of a window) names its own chunk.
    plan = b"".join(PLAN_ITEM.pack(0, o, s, r, 0) for _c, o, s, r in items)
    with pytest.raises(DictionaryNeeded) as info:
        codec.open_planned(
            key, data, 0, b"".join(i[0] for i in items), plan, 2, 3, codec.window_buffer(PAGE)
        )
    assert info.value.chunk_id == items[2][0]
    assert codec.dictionary(pages_dict.ref) is None
    codec.add_dictionary(pages_dict)
    _opens_to(codec, key, data, items, chunks)


@both
def test_a_dictionary_added_later_is_seen_by_every_thread(
    pages: list[bytes], pages_dict: Dictionary, native: bool
) -> None:
    """A worker thread's contexts (and kernel) made before add_dictionary see it after."""
    key = new_key()
    chunks = pages[7:30:2]
    data, items = _seal(BlobCodec(3, HASHER, native=native), chunks, key, pages_dict)
    codec = BlobCodec(3, HASHER, native=native)
    with ThreadPoolExecutor(2) as pool:
        barrier = threading.Barrier(2)

        def attempt() -> bool:
            barrier.wait()  # both threads make their contexts
            try:
                codec.open_many(key, data, 0, items)
            except DictionaryNeeded:
                return False
            return True

        assert list(pool.map(lambda _: attempt(), range(2))) == [False, False]
        codec.add_dictionary(pages_dict)

        def opened() -> list[bytes]:
            barrier.wait()
            return [bytes(c) for c in codec.open_many(key, data, 0, items)]

        assert list(pool.map(lambda _: opened(), range(2))) == [chunks, chunks]


# --- wrong, conflicting and refused dictionaries -------------------------------------------


@both
def test_a_wrong_dictionary_under_the_ref_never_gives_wrong_bytes(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    """Whatever the dictionary registered under a blob's ref holds, the blob opens to its
    own chunk or is refused: another trained dictionary or other raw content make frames
    that do not decompress; raw content of the same length, every byte changed, makes
    them decompress to the right length and the wrong bytes, which the keyed id refuses."""
    key = new_key()
    sealer = BlobCodec(3, HASHER, native=not native)
    chunks = pages[9:40:2]
    data, items = _seal(sealer, chunks, key, pages_dict)
    content = b"".join(pages[:4])  # raw content: a dictionary of no zstd format
    mine = Dictionary(HASHER.chunk_id(content)[:DICT_REF], content)
    echoes = [content[i : i + 3000] for i in range(0, len(content) - 3000, 1111)]
    echo_data, echo_items = _seal(sealer, echoes, key, mine)
    assert {p[0] for p in _plaintexts(key, echo_data, echo_items)} == {COMPRESSION_ZSTD_DICT}
    flipped = bytes(b ^ 0x55 for b in content)
    cases = [
        (pages_dict.ref, records_dict.data, data, items, "not decompress"),
        (pages_dict.ref, b"".join(pages[:16]), data, items, "not decompress"),
        (mine.ref, flipped, echo_data, echo_items, "does not match its id"),
    ]
    for ref, impostor, blobs, its, said in cases:
        codec = BlobCodec(3, HASHER, native=native)
        codec.add_dictionary(Dictionary(ref, impostor))
        for how, go in _every_way(codec, key, blobs, its).items():
            with pytest.raises(IntegrityError, match=said) as info:
                go()
            assert not isinstance(info.value, DictionaryNeeded), how
            assert its[0][0].hex()[:16] in str(info.value), how
    codec = BlobCodec(3, HASHER, native=native)
    codec.add_dictionary(mine)
    _opens_to(codec, key, echo_data, echo_items, echoes)


@both
def test_two_dictionaries_under_one_ref_make_it_unusable(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    key = new_key()
    chunks = pages[11:30:2]
    data, items = _seal(BlobCodec(3, HASHER, native=native), chunks, key, pages_dict)
    impostor = Dictionary(pages_dict.ref, records_dict.data)
    for first, second in ((pages_dict, impostor), (impostor, pages_dict)):
        codec = BlobCodec(3, HASHER, native=native)
        codec.add_dictionary(records_dict)  # another ref stays usable
        codec.add_dictionary(first)
        codec.add_dictionary(Dictionary(first.ref, first.data))  # the same bytes: no conflict
        codec.add_dictionary(second)
        codec.add_dictionary(pages_dict)  # once unusable, always
        assert codec.dictionary(pages_dict.ref) is None
        assert codec.dictionary(records_dict.ref) is records_dict
        for how, go in _every_way(codec, key, data, items).items():
            with pytest.raises(IntegrityError, match="two dictionaries have ref") as info:
                go()
            assert not isinstance(info.value, DictionaryNeeded), how
            assert pages_dict.ref.hex() in str(info.value), how
    # The same Dictionary, or equal bytes, added twice is no conflict.
    codec = BlobCodec(3, HASHER, native=native)
    codec.add_dictionary(pages_dict)
    codec.add_dictionary(Dictionary(pages_dict.ref, bytes(pages_dict.data)))
    _opens_to(codec, key, data, items, chunks)


@both
def test_dictionary_bytes_that_zstd_refuses_are_named(pages: list[bytes], native: bool) -> None:
    """A dictionary in zstd's format whose tables are garbage: refused when given to the
    codec and when framing with it, naming its ref; the codec is left as it was."""
    bad = Dictionary(b"\xba\xdd" * 4, struct.pack("<I", 0xEC30A437) + bytes(range(256)) * 4)
    codec = BlobCodec(3, HASHER, native=native)
    with pytest.raises(IntegrityError, match=bad.ref.hex()):
        codec.add_dictionary(bad)
    assert codec.dictionary(bad.ref) is None
    with pytest.raises(IntegrityError, match=bad.ref.hex()):
        codec.frame(pages[:2], HASHER.chunk_ids(pages[:2]), bad)
    key = new_key()
    cid = HASHER.chunk_id(pages[0])
    blob = _sealed(key, b"\x02" + bad.ref + b"\x28\xb5\x2f\xfd", cid)
    with pytest.raises(DictionaryNeeded):
        codec.open_many(key, blob, 0, [(cid, 0, len(blob), PAGE)])
    # Left as it was: a usable dictionary under the same ref is taken afterwards (a
    # refused one is not remembered as the ref's content).
    good = Dictionary(bad.ref, random.Random(3).randbytes(4096))
    codec.add_dictionary(good)
    assert codec.dictionary(bad.ref) is good


def test_a_dictionary_is_immutable_and_its_ref_8_bytes(pages_dict: Dictionary) -> None:
    with pytest.raises(ValueError):
        Dictionary(b"short", b"data")
    with pytest.raises(AttributeError):
        pages_dict.ref = bytes(8)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        pages_dict.data = b""  # type: ignore[misc]


# --- malformed blobs of byte 2 ---------------------------------------------------------------


@both
def test_a_byte_2_blob_too_short_for_its_ref_is_malformed(
    pages_dict: Dictionary, native: bool
) -> None:
    """Shorter than 2 || ref: refused as malformed, never taken for a missing dictionary
    (even with a ref registered that the few bytes present begin); 2 || ref and no frame
    does not decompress."""
    key = new_key()
    chunk = b"x" * 100
    cid = HASHER.chunk_id(chunk)
    codec = BlobCodec(3, HASHER, native=native)
    codec.add_dictionary(pages_dict)
    for plaintext in (b"\x02", b"\x02" + pages_dict.ref[:4], b"\x02" + pages_dict.ref[:7]):
        blob = _sealed(key, plaintext, cid)
        for how, go in _every_way(codec, key, blob, [(cid, 0, len(blob), len(chunk))]).items():
            with pytest.raises(IntegrityError) as info:
                go()
            assert not isinstance(info.value, DictionaryNeeded), (how, plaintext)
            assert "short" in str(info.value), (how, plaintext)
    blob = _sealed(key, b"\x02" + pages_dict.ref, cid)
    for go in _every_way(codec, key, blob, [(cid, 0, len(blob), len(chunk))]).values():
        with pytest.raises(
            IntegrityError, match="not a zstd frame|does not decompress|recorded length"
        ):
            go()


@both
def test_a_frame_recording_another_size_is_refused_before_it_is_decompressed(
    pages_dict: Dictionary, native: bool
) -> None:
    """Small authenticated byte-2 blobs whose frames record 64 MiB, or one byte more than
    the 4 KiB they are indexed as: the twin refuses them from the size the frame records,
    the kernel decompresses into the indexed length only, and zstd refuses a frame that
    does not fit it. A frame recording less than the index says is refused too."""
    key = new_key()
    compressor = zstandard.ZstdCompressor(
        level=3, dict_data=pages_dict.pure_frame(3), write_dict_id=False
    )
    cid = HASHER.chunk_id(bytes(PAGE))
    codec = BlobCodec(3, HASHER, native=native)
    codec.add_dictionary(pages_dict)
    for size in (64 << 20, PAGE + 1):
        frame = compressor.compress(bytes(size))
        assert len(frame) < 8192
        blob = _sealed(key, b"\x02" + pages_dict.ref + frame, cid)
        with pytest.raises(IntegrityError, match=f"would decompress to {size} bytes"):
            codec.open(key, cid, blob, PAGE)
        said = "does not decompress" if native else f"would decompress to {size} bytes"
        for how, go in _every_way(codec, key, blob, [(cid, 0, len(blob), PAGE)]).items():
            with pytest.raises(IntegrityError, match=said if how != "open" else "would decompress"):
                go()
    small = compressor.compress(bytes(PAGE - 1))
    blob = _sealed(key, b"\x02" + pages_dict.ref + small, cid)
    for how, go in _every_way(codec, key, blob, [(cid, 0, len(blob), PAGE)]).items():
        with pytest.raises(IntegrityError) as info:
            go()
        assert not isinstance(info.value, DictionaryNeeded), how


# --- blobs without a dictionary --------------------------------------------------------------


@both
def test_blobs_without_a_dictionary_are_untouched_by_dictionaries(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    """Byte 0 and 1 blobs frame and open the same on a codec holding dictionaries (one of
    them under a ref made unusable) as on one that never saw any."""
    key = new_key()
    chunks = pages[13:60:2] + [random.Random(3).randbytes(900)]
    fresh = BlobCodec(3, HASHER, native=native)
    busy = BlobCodec(3, HASHER, native=native)
    busy.add_dictionary(pages_dict)
    busy.add_dictionary(records_dict)
    busy.add_dictionary(Dictionary(records_dict.ref, pages_dict.data))
    data, items = _seal(busy, chunks, key, None)
    plain = _plaintexts(key, data, items)
    assert plain == _plaintexts(key, *_seal(fresh, chunks, key, None))
    assert {p[0] for p in plain} == {COMPRESSION_NONE, COMPRESSION_ZSTD}
    _opens_to(busy, key, data, items, chunks)
    _opens_to(BlobCodec(3, HASHER, native=not native), key, data, items, chunks)


# --- the loader hook and Dictionary.check --------------------------------------------------


@both
def test_a_loader_is_asked_for_a_missing_dictionary_once_per_ref(
    pages: list[bytes], pages_dict: Dictionary, records_dict: Dictionary, native: bool
) -> None:
    """With `loader` set, a missing dictionary is asked for (by its ref) and the opening
    tried again: on every way of opening. A loader that gives the wrong dictionary, or
    fails, leaves the error to the caller; it is never asked twice for one ref per call."""
    key = new_key()
    chunks = pages[15:50:2]
    data, items = _seal(BlobCodec(3, HASHER, native=not native), chunks, key, pages_dict)
    for how in _every_way(BlobCodec(3, HASHER, native=native), key, data, items):
        codec = BlobCodec(3, HASHER, native=native)
        asked: list[bytes] = []

        def load(ref: bytes, asked: list[bytes] = asked) -> Dictionary:
            asked.append(ref)
            return pages_dict

        codec.loader = load
        got = _every_way(codec, key, data, items)[how]()
        assert got is None if how == "check_records" else got == chunks, how
        assert asked == [pages_dict.ref], how
        assert codec.dictionary(pages_dict.ref) is pages_dict

        wrong = BlobCodec(3, HASHER, native=native)
        wrong.loader = lambda ref: records_dict
        with pytest.raises(DictionaryNeeded):
            _every_way(wrong, key, data, items)[how]()

        failing = BlobCodec(3, HASHER, native=native)

        def fail(ref: bytes) -> Dictionary:
            raise IntegrityError(f"dictionary {ref.hex()} is nowhere")

        failing.loader = fail
        with pytest.raises(IntegrityError, match="is nowhere"):
            _every_way(failing, key, data, items)[how]()


def test_check_names_a_dictionary_zstd_refuses(pages_dict: Dictionary) -> None:
    pages_dict.check()
    Dictionary(bytes(8), b"raw content is a dictionary too").check()
    bad = Dictionary(b"\xba\xdd" * 4, struct.pack("<I", 0xEC30A437) + bytes(range(256)) * 4)
    with pytest.raises(IntegrityError, match=bad.ref.hex()):
        bad.check()


# --- what a codec keeps (blobs.DICT_BUDGET) ----------------------------------------------


def _raw_dictionaries(n: int, size: int) -> list[Dictionary]:
    """n raw-content dictionaries of `size` bytes, each under the ref of its content."""
    out = []
    for i in range(n):
        content = random.Random(500 + i).randbytes(size)
        out.append(Dictionary(HASHER.chunk_id(content)[:DICT_REF], content))
    return out


@both
def test_a_codec_keeps_a_bounded_set_of_dictionaries_and_reloads_a_dropped_one(
    pages: list[bytes], native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past DICT_BUDGET bytes the oldest dictionaries go; a blob that names one again has
    it loaded again through `loader`, and opens."""
    monkeypatch.setattr(blobs_module, "DICT_BUDGET", 3 * (64 * 1024 + blobs_module.DICT_OVERHEAD))
    dicts = _raw_dictionaries(6, 64 * 1024)
    codec = BlobCodec(3, HASHER, native=native)
    for d in dicts:
        codec.add_dictionary(d)
    kept = [d for d in dicts if codec.dictionary(d.ref) is d]
    assert kept == dicts[-3:]  # the newest, within the budget
    key = new_key()
    chunks = [dicts[0].data[-PAGE:]]  # compresses with its own dictionary to a few bytes
    data, items = _seal(BlobCodec(3, HASHER, native=native), chunks, key, dicts[0])
    assert _plaintexts(key, data, items)[0][0] == COMPRESSION_ZSTD_DICT
    with pytest.raises(DictionaryNeeded):
        _every_way(codec, key, data, items)["open_many"]()
    asked: list[bytes] = []

    def load(ref: bytes) -> Dictionary:
        asked.append(ref)
        return {d.ref: d for d in dicts}[ref]

    codec.loader = load
    _opens_to(codec, key, data, items, chunks)
    assert asked == [dicts[0].ref]  # once: it stays while it is among the newest
    kept = [d for d in dicts if codec.dictionary(d.ref) is d]
    assert kept == [dicts[0], *dicts[4:]]  # the oldest (dicts[3]) made room for it
    # Once dropped, a dictionary is not kept by a thread's decompressors either (the
    # pure twin's per-thread cache follows the codec's set).
    for d in dicts[1:4]:
        codec.add_dictionary(d)
    assert codec.dictionary(dicts[0].ref) is None
    chunks = [dicts[3].data[-PAGE:]]
    data, items = _seal(BlobCodec(3, HASHER, native=native), chunks, key, dicts[3])
    _opens_to(codec, key, data, items, chunks)
    assert set(getattr(codec._local, "dict_dctx", {})) <= set(codec._dicts[0])


@both
def test_a_call_keeps_the_dictionaries_it_loaded_however_small_the_budget(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open call whose blobs name several dictionaries loads them one by one; each
    load must not drop the ones loaded before it in the same call, or the call could
    never open them all (it asks for a ref once)."""
    monkeypatch.setattr(blobs_module, "DICT_BUDGET", 1)  # every add drops all it may
    dicts = _raw_dictionaries(blobs_module.MAX_REFS_PER_CALL, 32 * 1024)
    key = new_key()
    sealer = BlobCodec(3, HASHER, native=native)
    data, items, chunks = b"", [], []
    for d in dicts:
        part = [d.data[-PAGE:]]
        more, its = _seal(sealer, part, key, d)
        items += [(c, o + len(data), s, r) for c, o, s, r in its]
        data += more
        chunks += part
    for how in _every_way(BlobCodec(3, HASHER, native=native), key, data, items):
        codec = BlobCodec(3, HASHER, native=native)
        codec.loader = {d.ref: d for d in dicts}.__getitem__
        got = _every_way(codec, key, data, items)[how]()
        assert got is None if how == "check_records" else got == chunks, how
        assert not codec._pinned, how  # released when the call ends
        # After the call, the budget holds again: only the last one added stays.
        assert [d for d in dicts if codec.dictionary(d.ref)] == [dicts[-1]], how
