"""Records shared by every layer: progress events, the statistics operations return, and
the database sources and verify subsets the API takes.

Everything here is light (no engine, no native code): dedupe.api imports it at the top, so
its annotations can name what is here and resolve at run time (typing.get_type_hints),
while the modules that act on these records load only with the command that needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    """A progress event. Backups fill bytes_read/new/chunks; restores fill bytes_written."""

    operation: str  # "backup" | "restore"
    stage: str  # "reading" | "writing index" | "committing" | "restoring" | "done"
    bytes_read: int = 0
    bytes_new: int = 0
    bytes_stored: int = 0
    chunks: int = 0
    chunks_new: int = 0
    bytes_written: int = 0
    bytes_total: int | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class BackupStats:
    id: str
    name: str
    kind: str
    bytes_read: int
    bytes_new: int  # raw bytes of chunks this backup added
    bytes_stored: int  # bytes of the packs this backup wrote (compressed, sealed)
    chunks: int
    chunks_new: int
    packs: int
    seconds: float
    parent: str | None = None
    note: str | None = None  # e.g. why an incremental became a full
    # The chunking strategy used (a spec; a list when a tree's files used several).
    chunker: Any = None
    # Entries of a tree that could not be read and are not in the generation (a partial
    # backup; the command exits 3). Empty for a complete one.
    unreadable: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SpaceStats:
    """What a name (or, with name None, the whole repository) holds: `logical_bytes` its
    generations' sizes added up, `unique_bytes` the raw bytes of the distinct chunks they
    reference, `stored_bytes` those chunks as stored (compressed, sealed)."""

    name: str | None
    generations: int
    logical_bytes: int
    unique_bytes: int
    stored_bytes: int
    chunks: int
    missing_chunks: int  # referenced, but in no index object (verify says more)

    @property
    def dedupe_ratio(self) -> float:
        """Logical bytes over unique bytes: what deduplication saves."""
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        """Unique bytes over stored bytes: what compression saves, apart from dedupe."""
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dedupe_ratio"] = round(self.dedupe_ratio, 3)
        d["compression_ratio"] = round(self.compression_ratio, 3)
        return d


@dataclass(frozen=True)
class RestoreStats:
    id: str
    bytes_written: int
    chunks: int
    seconds: float
    note: str | None = None  # a restore that met damage and read from a replica says so

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """What `generations()` lists: the authenticated header of one manifest."""

    id: str
    name: str
    kind: str
    parent: str | None
    created: str
    size: int
    chunks: int
    new_chunks: int
    new_bytes: int
    stored_bytes: int
    seconds: float
    source: dict[str, Any]
    # The writer key that made it (hex id), from its key map entries; None for an admin.
    # A generation is listed only once authenticated, so this is never a header's claim.
    written_by: str | None = None
    # The chunking strategy it was cut with (a spec; a list when a tree used several).
    chunker: Any = None
    host: str | None = None  # the machine that made it
    tags: tuple[str, ...] = ()
    # "<repository id>/<generation id>" of the generation `copy` made this one from.
    copied_from: str | None = None
    # The compression dictionary its page blobs were compressed with or that it trained
    # (docs/FORMAT.md 16): the id the next backup of the name starts from.
    dictionary: str | None = None

    def copy_of(self, origin: Generation, repository: str) -> bool:
        """Whether this generation says it is a copy of `origin` (of repository id
        `repository`) and its header agrees: name, creation time, size, kind of source.
        The claim is as good as the keys of the repository holding this one (whoever may
        back up there can plant one that agrees); what it holds is checked by whoever
        reads it for the original (dedupe/replication.py)."""
        return (
            self.copied_from == f"{repository}/{origin.id}"
            and (self.name, self.created, self.size) == (origin.name, origin.created, origin.size)
            and self.source.get("type") == origin.source.get("type")
        )

    @property
    def dedupe_ratio(self) -> float:
        """Logical size over the bytes this generation added (inf when it added none)."""
        return self.size / self.stored_bytes if self.stored_bytes else float("inf")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dedupe_ratio"] = None if self.stored_bytes == 0 else round(self.dedupe_ratio, 3)
        return d

    @classmethod
    def from_header(cls, header: dict[str, Any], written_by: str | None = None) -> Generation:
        return cls(
            written_by=written_by,
            id=header["id"],
            name=header["name"],
            kind=header["kind"],
            parent=header.get("parent"),
            created=header["created"],
            size=int(header["size"]),
            chunks=int(header["chunks"]),
            new_chunks=int(header["new_chunks"]),
            new_bytes=int(header["new_bytes"]),
            stored_bytes=int(header["stored_bytes"]),
            seconds=float(header["seconds"]),
            source=dict(header.get("source", {})),
            chunker=header.get("chunker"),
            host=header.get("host") if isinstance(header.get("host"), str) else None,
            tags=tuple(t for t in header.get("tags") or () if isinstance(t, str)),
            copied_from=_str_or_none(header.get("copied_from")),
            dictionary=_object_id_or_none(header.get("dictionary")),
        )


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _object_id_or_none(value: Any) -> str | None:
    ok = isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    return value if ok else None


@dataclass(frozen=True)
class CopiedGeneration:
    source_id: str  # in the source repository
    target_id: str  # the copy, in the target
    name: str
    kind: str  # as made in the target (a full when the target had no parent for it)
    bytes_read: int
    bytes_new: int  # raw bytes of chunks the target did not have


@dataclass(frozen=True)
class CopyReport:
    """What `copy` did: the generations it copied, oldest first, and those the target
    already held copies of (a re-run after an interruption skips them)."""

    copied: list[CopiedGeneration]
    already_there: list[str]  # source generation ids
    bytes_read: int
    bytes_new: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- what backup() and verify() take besides streams and trees --------------------------------
# Defined here rather than beside the code that acts on them (dedupe.engine.databases,
# dedupe.engine.verify, which re-export them as the same objects): dedupe.api's Source alias
# and Repository.verify name them, and importing those modules would load sqlite3, zstandard
# and the verify pipeline into every command.


@dataclass(frozen=True)
class SQLiteDatabase:
    """A backup source: the live SQLite database at `path`, snapshotted with the online
    backup API (dedupe.engine.databases.sqlite_snapshot) into a temporary file under
    `scratch` (default: $TMPDIR), which is backed up and removed."""

    path: str
    scratch: str | None = None


@dataclass(frozen=True)
class PostgresBaseBackupTars:
    """A backup source: a physical backup of a cluster with tablespaces, which
    pg_basebackup cannot stream as one tar. `write_basebackup_tars` (engine/databases.py)
    has it write base.tar and one <oid>.tar per tablespace into a scratch directory (under
    `scratch`, default $TMPDIR: room for the whole cluster), which is backed up as a tree
    and removed. `info` is what the generation records; `tablespaces` maps each
    tablespace's oid to its location on the server."""

    info: Mapping[str, Any]
    tablespaces: Mapping[str, str]
    env: Mapping[str, str] | None = None
    scratch: str | None = None


# A fraction, an n/t slice, or the named packs themselves (a restore that met damage
# checks only the packs its generation reads: dedupe/replication.py).
SubsetSpec = float | tuple[int, int] | frozenset[bytes]
"""A fraction of the packs in (0, 1], read as a random sample; or (n, t), 1 <= n <= t: the
n-th of t deterministic slices (the packs whose id, as a big-endian integer of its first 8
bytes, is n - 1 modulo t), so that running 1/t .. t/t reads every pack once."""
