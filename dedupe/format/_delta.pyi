"""Types of the native delta kernel (built from _delta.pyx + csrc/delta.c)."""

from typing import Any

from typing_extensions import Buffer

MAX_PARENT_RECORDS: int

def make_delta(parent: Buffer, table: Buffer) -> tuple[bytes, list[list[Any]]]:
    """(literal table, ops), exactly as dedupe.format.delta.make_delta_py computes them."""
