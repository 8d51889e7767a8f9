"""Chunker parameters: validation, masks, and the form stored in the repository config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ALGORITHM = "fastcdc-2020"

#: Bounds on the parameters (the C kernel checks the same ones, csrc/fastcdc.h).
MIN_SIZE_LOWER = 64
AVG_SIZE_LOWER = 256
AVG_SIZE_UPPER = 4 << 20
MAX_SIZE_UPPER = 16 << 20
NORMALIZATION_UPPER = 3

_KEYS = ("algorithm", "min_size", "avg_size", "max_size", "normalization")


def mask(one_bits: int) -> int:
    """The cut mask with `one_bits` one-bits: the contiguous run of bits 63-k .. 62.

    Bit 63 stays clear, which keeps the kernel's two-bytes-per-step evaluation exact.
    Part of the on-disk format.
    """
    if not 1 <= one_bits <= 62:
        raise ValueError(f"a mask needs 1..62 one-bits, not {one_bits}")
    return ((1 << one_bits) - 1) << (63 - one_bits)


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC 2020 parameters (sizes in bytes).

    Every chunk but the last of a stream has between ``min_size + 1`` and ``max_size``
    bytes. Bounds: ``64 <= min_size < avg_size < max_size <= 16 MiB``, ``avg_size`` a
    power of two in [256 B, 4 MiB], ``normalization`` in 0..3 and
    ``log2(avg_size) - normalization >= 1``. Invalid values raise ``ValueError``.
    """

    min_size: int
    avg_size: int
    max_size: int
    normalization: int = 2

    def __post_init__(self) -> None:
        for name in ("min_size", "avg_size", "max_size", "normalization"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ValueError(f"chunker {name} must be an int, not {value!r}")
        if self.min_size < MIN_SIZE_LOWER:
            raise ValueError(f"chunker min_size {self.min_size} is below {MIN_SIZE_LOWER}")
        if self.max_size > MAX_SIZE_UPPER:
            raise ValueError(f"chunker max_size {self.max_size} is above {MAX_SIZE_UPPER} (16 MiB)")
        if not self.min_size < self.avg_size < self.max_size:
            raise ValueError(
                "chunker sizes must satisfy min_size < avg_size < max_size, got "
                f"{self.min_size}, {self.avg_size}, {self.max_size}"
            )
        if self.avg_size & (self.avg_size - 1):
            raise ValueError(f"chunker avg_size {self.avg_size} is not a power of two")
        if not AVG_SIZE_LOWER <= self.avg_size <= AVG_SIZE_UPPER:
            raise ValueError(
                f"chunker avg_size {self.avg_size} is outside [{AVG_SIZE_LOWER}, {AVG_SIZE_UPPER}]"
            )
        if not 0 <= self.normalization <= NORMALIZATION_UPPER:
            raise ValueError(
                f"chunker normalization {self.normalization} is outside 0..{NORMALIZATION_UPPER}"
            )
        if self.bits - self.normalization < 1:
            raise ValueError(
                f"chunker normalization {self.normalization} is too large for avg_size "
                f"{self.avg_size}"
            )

    @property
    def bits(self) -> int:
        """log2(avg_size)."""
        return self.avg_size.bit_length() - 1

    @property
    def mask_s(self) -> int:
        """Mask used for bytes at index < avg_size of a chunk (harder to match)."""
        return mask(self.bits + self.normalization)

    @property
    def mask_l(self) -> int:
        """Mask used for bytes at index >= avg_size of a chunk (easier to match)."""
        return mask(self.bits - self.normalization)

    def to_dict(self) -> dict[str, Any]:
        """The form stored in the repository config JSON."""
        return {
            "algorithm": ALGORITHM,
            "min_size": self.min_size,
            "avg_size": self.avg_size,
            "max_size": self.max_size,
            "normalization": self.normalization,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChunkerParams:
        """Inverse of `to_dict`; raises ValueError on another algorithm or unknown keys."""
        if d.get("algorithm") != ALGORITHM:
            raise ValueError(f"chunker algorithm {d.get('algorithm')!r} is not {ALGORITHM!r}")
        missing = [k for k in _KEYS if k not in d]
        extra = sorted(set(d) - set(_KEYS))
        if missing or extra:
            raise ValueError(f"chunker config: missing keys {missing}, unknown keys {extra}")
        return cls(d["min_size"], d["avg_size"], d["max_size"], d["normalization"])


#: Chosen by measurement: see docs/CHUNKING.md. Changing it only affects new repositories
#: (each repository records its own parameters).
DEFAULT_PARAMS = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536, normalization=2)
