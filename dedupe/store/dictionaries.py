"""Compression dictionaries of page blobs (docs/FORMAT.md section 16): the object's bytes,
its name, and what a backup does to get one (sample its first new pages, train).

Which dictionary a blob needs is named in the blob itself (an 8-byte ref, the start of the
keyed id of the dictionary's content); the store (RepositoryStore) loads dictionaries by
ref when a reader meets one, and writes the ones a backup trains.
"""

from __future__ import annotations

import re

import zstandard

from dedupe.backends.base import switched_off
from dedupe.errors import IntegrityError
from dedupe.store.blobs import NATIVE_AVAILABLE, Dictionary
from dedupe.store.sealed import open_record, seal_record

DICT_PREFIX = "dicts/"
DICT_MAGIC = b"DDPDICT1"
DICT_AAD = b"dedupe-dictionary v1"
REF_SIZE = 8
MAX_DICT_BYTES = 256 << 10  # 4x what a backup trains; the object adds magic and AEAD (48)
MAX_DICT_OBJECT = MAX_DICT_BYTES + 48

# What a backup trains (FORMAT.md 16). Measured on page files (bench/README.md,
# "Compression dictionaries"): 64 KiB trained by fastCover with fixed parameters on 2,048
# pages sampled from the first 32 MiB takes ~0.1 s and saves ~6% of stored bytes;
# sampling the whole file saved 0.4% more, training with parameter search 0.1% more for
# four times the time.
DICT_SIZE = 64 << 10
SAMPLE_EVERY = 4  # of the first new pages, every 4th is a sample
SAMPLES = 2048
MIN_SAMPLE_BYTES = 1 << 20  # a backup with fewer new page bytes trains none
_FASTCOVER = {"k": 1000, "d": 8}

_NAME = re.compile(r"dicts/([0-9a-f]{16})/([0-9a-f]{64})")


def enabled() -> bool:
    """Whether backups compress pages with a dictionary: unless DEDUPE_DICTIONARIES is 0
    (or false, no, off). Reading blobs that name one is not affected."""
    return not switched_off("DEDUPE_DICTIONARIES")


def dict_name(ref: bytes, dict_id: str) -> str:
    return f"{DICT_PREFIX}{ref.hex()}/{dict_id}"


def parse_dict_name(name: str) -> tuple[bytes, str] | None:
    """(ref, dict id) of a name under dicts/, or None for a name that is not one."""
    m = _NAME.fullmatch(name)
    return (bytes.fromhex(m.group(1)), m.group(2)) if m else None


def encode_dictionary(data_key: bytes, dictionary: bytes) -> bytes:
    if not 0 < len(dictionary) <= MAX_DICT_BYTES:
        raise ValueError(f"a dictionary is 1 to {MAX_DICT_BYTES} bytes")
    return seal_record(DICT_MAGIC, DICT_AAD, data_key, dictionary)


def decode_dictionary(data_key: bytes, name: str, data: bytes) -> bytes:
    """The dictionary in object `name`, opened with `data_key`. IntegrityError when the
    bytes do not hash to the name or do not open; the caller checks the ref."""
    what = f"dictionary {name}"
    if len(data) > MAX_DICT_OBJECT:
        raise IntegrityError(f"{what} is {len(data)} bytes, more than a dictionary can be")
    plain = open_record(DICT_MAGIC, DICT_AAD, data_key, name, data, what)
    if not plain:
        raise IntegrityError(f"{what} is empty")
    return bytes(plain)


def train(samples: list[bytes], level: int) -> bytes | None:
    """A dictionary trained on `samples` (pages) that zstd accepts for compressing at
    `level` and for reading, or None: zstd refuses to train on some inputs (too few, too
    alike), and a dictionary it would then refuse to use must not fail the backup that
    trained it (write_dictionary and every reader check it again)."""
    try:
        pieces: list[bytes | bytearray | memoryview] = list(samples)
        data = zstandard.train_dictionary(DICT_SIZE, pieces, level=level, **_FASTCOVER).as_bytes()
        usable = Dictionary(bytes(REF_SIZE), data)  # the ref does not matter to zstd
        usable.check()
        if NATIVE_AVAILABLE:
            usable.native_frame(level)
        else:
            usable.pure_frame(level)
    except (zstandard.ZstdError, IntegrityError):
        return None
    return data


class PageSampler:
    """Collects the training samples of a backup from its new pages as they come: every
    SAMPLE_EVERY-th page, copied, until SAMPLES of them. Not thread-safe (the event loop's
    dedupe stage feeds it)."""

    def __init__(self) -> None:
        self.samples: list[bytes] = []
        self._seen = 0
        self.closed = False

    @property
    def full(self) -> bool:
        return len(self.samples) >= SAMPLES

    @property
    def enough(self) -> bool:
        """Whether what was sampled is worth training on (at the end of a backup)."""
        return sum(map(len, self.samples)) * SAMPLE_EVERY >= MIN_SAMPLE_BYTES

    def feed(self, pages: list[memoryview]) -> None:
        if self.closed or self.full:
            return
        skip = (-self._seen) % SAMPLE_EVERY  # keep the global every-Nth rhythm
        for page in pages[skip::SAMPLE_EVERY]:
            self.samples.append(bytes(page))
            if self.full:
                break
        self._seen += len(pages)

    def take(self) -> list[bytes]:
        """The samples, once: the sampler is closed after."""
        self.closed = True
        samples, self.samples = self.samples, []
        return samples
