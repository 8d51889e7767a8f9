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

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any, TypeVar

from dedupe.errors import IntegrityError
from dedupe.format import _delta as _native
from dedupe.format.manifest import CHUNK_RECORD

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

_R = CHUNK_RECORD.size
COPY = 0
LITERAL = 1


DeltaBuilder = _native.DeltaBuilder
S = TypeVar("S")

# A table as pieces of other tables: parallel arrays of source (the caller's index of a
# table), first record there and record count, 8 bytes each. See compose.
if TYPE_CHECKING:
    Numbers = array[int]
else:
    Numbers = array  # not subscriptable at run time before Python 3.12
Pieces = tuple[Numbers, Numbers, Numbers]
# The pieces a reader lets a composed table count before it writes the table out and
# composes on from there (24 bytes of memory a piece; a chain of daily incrementals
# makes a few per day).
MAX_PIECES = 1 << 17
_MAX_INT64 = (1 << 63) - 1


class PackedOps:
    """A delta's ops in three arrays (kind, first operand, second operand: 0 for a
    LITERAL), 17 bytes an op where the lists json.loads makes take ~110: a day of
    scattered page writes on a large database file has hundreds of thousands of ops.
    Iterating gives each op as (kind, a, b), which delta_ranges reads as it reads a list."""

    __slots__ = ("kinds", "a", "b")

    def __init__(self) -> None:
        self.kinds: Numbers = array("b")
        self.a: Numbers = array("q")
        self.b: Numbers = array("q")

    @classmethod
    def of(cls, ops: object) -> PackedOps | None:
        """The ops packed, when every op has exactly the shape a writer gives it
        ([0, start, count] or [1, count], integers from 0 to 2^63 - 1: one definition of
        the shape, _shaped, for both paths); else None, and the caller keeps the ops as
        they are, for delta_ranges to refuse."""
        packed = cls()
        kinds, a, b = packed.kinds, packed.a, packed.b
        try:
            for kind, first, second in _shaped(ops, "ops"):
                if not (0 <= first <= _MAX_INT64 and 0 <= second <= _MAX_INT64):
                    return None
                kinds.append(kind)
                a.append(first)
                b.append(second)
        except IntegrityError:
            return None
        return packed

    def __len__(self) -> int:
        return len(self.kinds)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.kinds, self.a, self.b, strict=True)

    def as_lists(self) -> list[list[int]]:
        """The ops as the manifest's JSON has them."""
        return [[k, a, b] if k == COPY else [k, a] for k, a, b in self]

    def __eq__(self, other: object) -> bool:
        """Equal to the same ops, packed or as lists (a meta read either way compares
        equal)."""
        if isinstance(other, PackedOps):
            return (self.kinds, self.a, self.b) == (other.kinds, other.a, other.b)
        if isinstance(other, list):
            return self.as_lists() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value


class Ranges:
    """delta_ranges' result: parallel arrays of kind, start record and count (17 bytes a
    range). Iterating gives (kind, start, count)."""

    __slots__ = ("kinds", "starts", "counts")

    def __init__(self) -> None:
        self.kinds: Numbers = array("b")
        self.starts: Numbers = array("q")
        self.counts: Numbers = array("q")

    def __len__(self) -> int:
        return len(self.kinds)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.kinds, self.starts, self.counts, strict=True)


def make_delta(parent: Buffer, table: Buffer) -> tuple[bytes, list[list[Any]]]:
    """(literal table, ops) such that apply_delta(parent, literal, ops) == table.

    The native kernel (csrc/delta.c) with both tables in memory. A backup uses
    DeltaBuilder directly: the parent's table in a file, its own table fed as the
    pipeline produces it. The kernel keeps 6-byte slots of distinct parent records
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
    ops: list[Any] | PackedOps,
    n_parent: int,
    n_literal: int,
    what: str,
    expected: int | None = None,
) -> Ranges:
    """The ops as validated ranges (kind, start record, count), in order: COPY ranges of
    the parent's table, LITERAL ranges of the literal table. IntegrityError on an op that
    is not [0, start, count] or [1, count] with integer operands and a count of at least
    1, a range outside either table, literal records left unused at the end, or (with
    `expected`, the complete table's record count from the authenticated header) counts
    that do not add up to it. Everything is checked before anything is expanded: copy ops
    cannot make a table larger than its header says, and as every op counts one record
    or more, a delta has no more ops than its header has records (docs/FORMAT.md 8.1)."""
    ranges = Ranges()
    kinds, starts, counts = ranges.kinds, ranges.starts, ranges.counts
    limit = _MAX_INT64 if expected is None else expected
    lit = total = 0
    for kind, a, b in ops if isinstance(ops, PackedOps) else _shaped(ops, what):
        if kind == COPY:
            count = b
            if count < 1:
                raise IntegrityError(f"{what}: malformed delta: a copy of {count} records")
            if a < 0 or a + count > n_parent:
                raise IntegrityError(f"{what}: a delta copies past its parent's table")
            starts.append(a)
        else:
            count = a
            if count < 1:
                raise IntegrityError(f"{what}: malformed delta: a literal run of {count} records")
            if lit + count > n_literal:
                raise IntegrityError(f"{what}: a delta reads past its literal table")
            starts.append(lit)
            lit += count
        kinds.append(kind)
        counts.append(count)
        total += count
        if total > limit:
            raise IntegrityError(
                f"{what}: its delta makes more than the {limit} records its header says"
            )
    if lit != n_literal:
        raise IntegrityError(f"{what}: a delta leaves literal records unused")
    if expected is not None and total != expected:
        raise IntegrityError(f"{what}: its delta makes {total} records, its header says {expected}")
    return ranges


def _shaped(ops: object, what: str) -> Iterator[tuple[int, int, int]]:
    """Ops from a meta's JSON as (kind, a, b), b 0 for a LITERAL; IntegrityError for
    anything but a list of [0, start, count] and [1, count] with integer operands (no
    booleans, floats or strings: PackedOps.of packs exactly these shapes, and lists
    must be read as it reads them)."""
    if type(ops) is not list:
        raise IntegrityError(f"{what}: malformed delta: its ops are not a list")
    for op in ops:
        if type(op) is not list or not op or type(op[0]) is not int:
            raise IntegrityError(f"{what}: malformed delta: an op is not a list of integers")
        kind = op[0]
        if kind == COPY and len(op) == 3:
            a, b = op[1], op[2]
        elif kind == LITERAL and len(op) == 2:
            a, b = op[1], 0
        else:
            raise IntegrityError(f"{what}: unknown delta op {op!r:.40}")
        if type(a) is not int or type(b) is not int:
            raise IntegrityError(f"{what}: malformed delta: an op is not a list of integers")
        yield kind, a, b


def apply_delta(
    parent: bytes,
    literal: bytes,
    ops: list[Any] | PackedOps,
    what: str,
    expected: int | None = None,
) -> bytes:
    out = bytearray()
    for kind, start, count in delta_ranges(
        ops, len(parent) // _R, len(literal) // _R, what, expected
    ):
        source = parent if kind == COPY else literal
        out += source[start * _R : (start + count) * _R]
    return bytes(out)


def whole(records: int, source: int = 0) -> Pieces:
    """The pieces of a table that is all of source `source`'s `records` records."""
    if not records:
        return array("q"), array("q"), array("q")
    return array("q", [source]), array("q", [0]), array("q", [records])


def compose(parent: Pieces, ranges: Ranges, own: int) -> Pieces:
    """The pieces of the table that a delta's `ranges` (from delta_ranges, so checked
    against the parent's table and the literal table) make from the parent's table, held
    as `parent`, and from source `own`, the delta's literal table.

    Expanding a chain by composing its deltas costs its ops and the pieces they cut
    the table into, not a copy of the complete table per link: pieces in the middle of
    a copy are taken by list slices (no Python per piece), only a copy's first and last
    piece are cut, and a piece that continues the previous one in its source is merged
    into it. No piece is empty, so a table of n records has at most n pieces."""
    src, start, count = parent
    offsets = array("q", accumulate(count, initial=0))  # where each piece starts
    n_src: Numbers = array("q")
    n_start: Numbers = array("q")
    n_count: Numbers = array("q")

    def add(s: int, first: int, n: int) -> None:
        if n_src and n_src[-1] == s and n_start[-1] + n_count[-1] == first:
            n_count[-1] += n
        else:
            n_src.append(s)
            n_start.append(first)
            n_count.append(n)

    for kind, first, n in ranges:
        if not n:
            continue
        if kind != COPY:
            add(own, first, n)
            continue
        end = first + n
        i = bisect_right(offsets, first) - 1  # the piece the copy starts in
        j = bisect_left(offsets, end) - 1  # the piece it ends in
        skip = first - offsets[i]
        if i == j:
            add(src[i], start[i] + skip, n)
            continue
        add(src[i], start[i] + skip, count[i] - skip)
        if j > i + 1:
            add(src[i + 1], start[i + 1], count[i + 1])
            n_src += src[i + 2 : j]
            n_start += start[i + 2 : j]
            n_count += count[i + 2 : j]
        add(src[j], start[j], end - offsets[j])
    return n_src, n_start, n_count


def compose_chain(
    full: S,
    full_records: int,
    links: Iterable[tuple[S, Any, int, int, str]],
    flatten: Callable[[list[S], Pieces], S],
) -> tuple[list[S], Pieces]:
    """The complete table of a chain's last generation as pieces of `sources`: the
    full's own table (`full`, `full_records` records) and each link's literal table.
    `links`, from the full's child down: (literal table, delta ops, its records, the
    complete table's records from the header, what to call it in errors). Each delta is
    checked against the table below it (delta_ranges) before it is composed. Past
    MAX_PIECES pieces the table so far becomes one source (`flatten`, which writes it
    out), so that memory stays bounded however long the chain."""
    sources = [full]
    total = full_records
    pieces = whole(total)
    for literal, ops, n_literal, n_complete, what in links:
        ranges = delta_ranges(ops, total, n_literal, what, n_complete)
        if len(pieces[0]) > 1 and _spanned(pieces, ranges) > MAX_PIECES:
            # Composed on the table as it is, the delta would make more pieces than
            # MAX_PIECES (each copy takes every piece it spans): write the table out
            # first, so that each op makes one piece.
            sources = [flatten(sources, pieces)]
            pieces = whole(total)
        sources.append(literal)
        pieces = compose(pieces, ranges, len(sources) - 1)
        total = n_complete
        if len(pieces[0]) > MAX_PIECES:
            sources = [flatten(sources, pieces)]
            pieces = whole(total)
    return sources, pieces


def _spanned(parent: Pieces, ranges: Ranges) -> int:
    """At most how many pieces compose(parent, ranges, _) makes."""
    offsets = array("q", accumulate(parent[2], initial=0))
    n = 0
    for kind, first, count in ranges:
        if not count:
            continue
        if kind != COPY:
            n += 1
        else:
            n += bisect_left(offsets, first + count) - bisect_right(offsets, first) + 1
    return n


def join_pieces(sources: list[bytes], pieces: Pieces) -> bytes:
    """The records of `pieces`, in order, from tables held in memory."""
    views = [memoryview(t) for t in sources]
    return b"".join(views[s][a * _R : (a + n) * _R] for s, a, n in zip(*pieces, strict=True))
