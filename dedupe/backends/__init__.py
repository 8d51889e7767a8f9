"""Storage backends: one async interface (`Backend`) with written semantics, concrete
backends (a local directory; an S3-compatible store later), and wrappers for retries and
concurrency limits. Upper layers depend only on `Backend`."""

from dedupe.backends.base import Backend
from dedupe.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend", "open_backend"]


def open_backend(location: str) -> Backend:
    """A backend for a repository location (a directory path for now)."""
    return LocalBackend(location)
