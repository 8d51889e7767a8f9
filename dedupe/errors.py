"""One error tree for everything dedupe reports to its users.

Every operational failure is a `DedupeError` subclass that carries a CLI exit code and a
message saying what happened and what to do next. Bugs are not hidden in here: a bad
argument stays `ValueError`, an OS failure we did not anticipate stays `OSError`.

Exit codes are part of the CLI contract (docs/API.md lists them); never reuse a number.
"""

from __future__ import annotations


class DedupeError(Exception):
    """Root of every error dedupe reports on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


# --- repository and configuration (10-19) -------------------------------------------------


class RepositoryNotFound(DedupeError):
    exit_code = 10


class RepositoryExists(DedupeError):
    exit_code = 11


class UnsupportedFormat(DedupeError):
    exit_code = 12


class RepositoryLocked(DedupeError):
    exit_code = 13


class LocationNotEmpty(DedupeError):
    """`init` at a location that holds other things: a repository is never mixed in."""

    exit_code = 14


class UnsupportedLocation(DedupeError):
    """A location in a form this version cannot open (a URL scheme it does not know)."""

    exit_code = 15


# --- keys (20-29) ---------------------------------------------------------------------------


class WrongPassphrase(DedupeError):
    exit_code = 20


class PassphraseMissing(DedupeError):
    exit_code = 21


class KeyNotAvailable(DedupeError):
    """The key file opened, but its role does not hold the key this operation needs."""

    exit_code = 22


class RoleNotPermitted(DedupeError):
    """The key's role may not run this command (a writer restoring, a reader pruning)."""

    exit_code = 23


class KeyRevoked(DedupeError):
    """The key file opened, but the repository's keyring no longer lists the key."""

    exit_code = 24


# --- stored objects (30-39) -----------------------------------------------------------------


class IntegrityError(DedupeError):
    """A stored object failed authentication or its content does not match its id."""

    exit_code = 30


class TruncatedObject(IntegrityError):
    """A stored object is shorter than the index or its own header says it must be."""

    exit_code = 31


class MissingObject(IntegrityError):
    """An object the repository refers to is not in the backend."""

    exit_code = 32


class RollbackDetected(IntegrityError):
    """The repository's keyring is older than one this client has already seen."""

    exit_code = 34


class DictionaryUnusable(IntegrityError):
    """A blob that authenticated names a compression dictionary (docs/FORMAT.md section
    16) that cannot be had here: missing, damaged, refused by zstd, two under one ref, one
    too many for a pack, or not loadable from this thread. The blob itself may be intact:
    with its dictionary back it opens again."""


class DictionaryNeeded(DictionaryUnusable):
    """A blob names a compression dictionary (docs/FORMAT.md section 16) that the codec has
    not been given. Readers load it and try again; one that does not reports the chunk
    copy as unreadable, which this is until the dictionary is found."""

    def __init__(self, chunk_id: bytes, ref: bytes) -> None:
        super().__init__(
            f"chunk {chunk_id.hex()[:16]} needs compression dictionary {ref.hex()},"
            " which is not loaded"
        )
        self.chunk_id = chunk_id
        self.ref = ref


class VerifyFailed(IntegrityError):
    """`dedupe verify` found damaged or missing objects (its report names them). Raised by
    the CLI only; the API returns the report."""

    exit_code = 33


# --- generations (40-49) --------------------------------------------------------------------


class GenerationNotFound(DedupeError):
    exit_code = 40


class AmbiguousGeneration(DedupeError):
    exit_code = 41


# --- sources and targets (50-59) ------------------------------------------------------------


class SourceError(DedupeError):
    """The data to back up could not be read (missing file, failing reader, dump failed)."""

    exit_code = 50


class TargetError(DedupeError):
    """The restore target could not be written (exists, not writable, disk full)."""

    exit_code = 51


class ReaderGone(TargetError):
    """The reader of a restored stream went away (`restore GEN - | head`): the command ends
    quietly, with the status a shell reports for a writer killed by SIGPIPE."""

    exit_code = 141


class ScratchError(DedupeError):
    """A temporary file dedupe needs (in TMPDIR) could not be written (disk full)."""

    exit_code = 52


class EmptySource(SourceError):
    """The source gave no bytes at all. Nothing was committed: an empty generation would
    become the newest of its name (the parent of the next incremental, a full that
    retention counts), and an empty stream is what a failed dump piped into dedupe looks
    like. Back up an empty stream on purpose with allow_empty."""

    exit_code = 53


# --- backends (60-69) -----------------------------------------------------------------------


class BackendError(DedupeError):
    """The storage backend failed in a way retrying did not mend."""

    exit_code = 60


class BackendTimeout(BackendError):
    """The storage did not answer a call within the deadline set for it (a replica on a
    network file system whose server is gone: dedupe.backends.deadline)."""


class ObjectChanged(BackendError):
    """A conditional write or delete found the object other than expected: it exists
    already (create_new), or holds other bytes than the caller last wrote (swap,
    delete_if). Nothing was changed."""


class ReplicaError(DedupeError):
    """A replica (docs/FORMAT.md 4.3.1) could not be opened or written: a backup with a
    sync replica then commits nothing; an async sync or a repair names the replica."""

    exit_code = 61


class Interrupted(DedupeError):
    """Ctrl-C (SIGINT): the command stopped where it was. What it had committed stays
    valid; a backup keeps and indexes the packs it stored (the next backup reuses them)."""

    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM (systemd stopping a unit, `timeout`): handled as Ctrl-C is."""

    exit_code = 143
