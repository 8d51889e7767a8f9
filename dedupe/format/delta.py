"""Delta chunk tables: an incremental or differential stream generation stores only how
its chunk list differs from its parent's (docs/FORMAT.md section 8.1).

A delta is a list of ops over two tables: the parent's complete chunk table and this
generation's own (literal) table.

    [0, start, count]   copy `count` records of the parent's table from record `start`
    [1, count]          take the next `count` records of the literal table

Pure functions over CHUNK_RECORD tables; no I/O. make_delta is native (dedupe.format._delta,
csrc/delta.c) and required, like the chunker; make_delta_py is its spec and twin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dedupe.errors import IntegrityError
from dedupe.format import _delta as _native
from dedupe.format.manifest import CHUNK_RECORD

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

_R = CHUNK_RECORD.size
COPY = 0
LITERAL = 1


DeltaBuilder = _native.DeltaBuilder


def make_delta(parent: Buffer, table: Buffer) -> tuple[bytes, list[list[Any]]]:
    """(literal table, ops) such that apply_delta(parent, literal, ops) == table.

    The native kernel (csrc/delta.c) with both tables in memory. A backup uses
    DeltaBuilder directly: the parent's table in a file, its own table fed as the
    pipeline produces it. The kernel keeps 8-byte slots of distinct parent records
    (make_delta_py's dict costs ~140 bytes per record) and runs no Python per record."""
    builder = DeltaBuilder(parent)
    literal = builder.feed(table)
    return literal, builder.ops()


def make_delta_py(parent: bytes, table: bytes) -> tuple[bytes, list[list[int]]]:
    """The spec of make_delta, in Python.

    Greedy and linear: follow the parent while records match; on a mismatch jump to where
    the record first occurs in the parent (content-defined chunks re-synchronise right
    after a change); records the parent never had become literals."""
    first: dict[bytes, int] = {}
    for i in range(len(parent) // _R - 1, -1, -1):
        first[parent[i * _R : (i + 1) * _R]] = i
    n_parent = len(parent) // _R
    ops: list[list[int]] = []
    literal = bytearray()
    expect = -1  # parent index the current copy run would continue with
    for i in range(len(table) // _R):
        rec = table[i * _R : (i + 1) * _R]
        if 0 <= expect < n_parent and parent[expect * _R : (expect + 1) * _R] == rec:
            ops[-1][2] += 1
            expect += 1
            continue
        pos = first.get(rec)
        if pos is not None:
            ops.append([COPY, pos, 1])
            expect = pos + 1
            continue
        literal += rec
        expect = -1
        if ops and ops[-1][0] == LITERAL:
            ops[-1][1] += 1
        else:
            ops.append([LITERAL, 1])
    return bytes(literal), ops


def delta_ranges(
    ops: list[Any], n_parent: int, n_literal: int, what: str, expected: int | None = None
) -> list[tuple[int, int, int]]:
    """The ops as validated ranges (kind, start record, count), in order: COPY ranges of
    the parent's table, LITERAL ranges of the literal table. IntegrityError on a range
    outside either table, an unknown op, literal records left unused at the end, or (with
    `expected`, the complete table's record count from the authenticated header) counts
    that do not add up to it. Everything is checked before anything is expanded: copy ops
    cannot make a table larger than its header says (docs/FORMAT.md 8.1)."""
    ranges: list[tuple[int, int, int]] = []
    lit = total = 0
    try:
        for op in ops:
            if op[0] == COPY:
                start, count = int(op[1]), int(op[2])
                if start < 0 or count < 0 or start + count > n_parent:
                    raise IntegrityError(f"{what}: a delta copies past its parent's table")
                ranges.append((COPY, start, count))
            elif op[0] == LITERAL:
                count = int(op[1])
                if count < 0 or lit + count > n_literal:
                    raise IntegrityError(f"{what}: a delta reads past its literal table")
                ranges.append((LITERAL, lit, count))
                lit += count
            else:
                raise IntegrityError(f"{what}: unknown delta op {op[0]!r}")
            total += count
    except (IndexError, TypeError, ValueError) as e:
        raise IntegrityError(f"{what}: malformed delta: {e}") from None
    if lit != n_literal:
        raise IntegrityError(f"{what}: a delta leaves literal records unused")
    if expected is not None and total != expected:
        raise IntegrityError(f"{what}: its delta makes {total} records, its header says {expected}")
    return ranges


def apply_delta(
    parent: bytes, literal: bytes, ops: list[Any], what: str, expected: int | None = None
) -> bytes:
    out = bytearray()
    for kind, start, count in delta_ranges(
        ops, len(parent) // _R, len(literal) // _R, what, expected
    ):
        source = parent if kind == COPY else literal
        out += source[start * _R : (start + count) * _R]
    return bytes(out)
