"""ChunkerParams validation, masks, config round trip; the keyed gear table."""

from __future__ import annotations

import pytest

from dedupe.chunking import DEFAULT_PARAMS, ChunkerParams, gear_table
from dedupe.chunking.params import mask


def test_default_params_are_valid_and_documented_shape() -> None:
    p = DEFAULT_PARAMS
    assert p.min_size < p.avg_size < p.max_size
    assert ChunkerParams.from_dict(p.to_dict()) == p


def test_to_dict_names_the_algorithm() -> None:
    d = ChunkerParams(1024, 4096, 16384, 1).to_dict()
    assert d == {
        "algorithm": "fastcdc-2020",
        "min_size": 1024,
        "avg_size": 4096,
        "max_size": 16384,
        "normalization": 1,
    }


@pytest.mark.parametrize(
    "d",
    [
        {
            "algorithm": "rabin",
            "min_size": 1024,
            "avg_size": 4096,
            "max_size": 16384,
            "normalization": 2,
        },
        {"algorithm": "fastcdc-2020", "min_size": 1024, "avg_size": 4096, "max_size": 16384},
        {
            "algorithm": "fastcdc-2020",
            "min_size": 1024,
            "avg_size": 4096,
            "max_size": 16384,
            "normalization": 2,
            "extra": 1,
        },
    ],
)
def test_from_dict_rejects(d: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChunkerParams.from_dict(d)


@pytest.mark.parametrize(
    "args, words",
    [
        ((63, 256, 1024), "below 64"),
        ((64, 256, (16 << 20) + 1), "16 MiB"),
        ((256, 256, 1024), "min_size < avg_size < max_size"),
        ((64, 1024, 1024), "min_size < avg_size < max_size"),
        ((64, 1000, 4096), "power of two"),
        ((64, 128, 4096), "outside"),
        ((64, 8 << 20, 16 << 20), "outside"),
        ((64, 256, 1024, 4), "normalization"),
        ((64, 256, 1024, -1), "normalization"),
        ((64.0, 256, 1024), "int"),
        ((True, 256, 1024), "int"),
    ],
)
def test_invalid_params_say_why(args: tuple[int, ...], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ChunkerParams(*args)


@pytest.mark.parametrize("k", [1, 5, 16, 26, 62])
def test_masks_leave_bit_63_clear(k: int) -> None:
    m = mask(k)
    assert bin(m).count("1") == k
    assert m >> 63 == 0
    assert (m << 1) >> 64 == 0  # mask << 1 loses no bit: the two-byte step is exact


def test_mask_counts_follow_normalization() -> None:
    p = ChunkerParams(4096, 16384, 65536, 3)
    assert bin(p.mask_s).count("1") == 14 + 3
    assert bin(p.mask_l).count("1") == 14 - 3


def test_gear_table_is_keyed_and_deterministic() -> None:
    a = gear_table(bytes(32))
    assert len(a) == 2048
    assert a == gear_table(bytearray(32))
    assert a != gear_table(b"\x01" + bytes(31))


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_gear_table_wants_a_32_byte_key(key: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        gear_table(key)
