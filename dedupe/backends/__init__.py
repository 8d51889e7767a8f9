"""Storage backends: one async interface (`Backend`) with written semantics and concrete
backends (a local directory; an S3-compatible object store, `s3://bucket/prefix`). Upper
layers depend only on `Backend`."""

import re

from dedupe.backends.base import Backend
from dedupe.backends.local import LocalBackend
from dedupe.errors import UnsupportedLocation

__all__ = ["Backend", "LocalBackend", "open_backend"]

SUPPORTED = "a local directory path, or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)"

# What a location of another tool or a later version looks like: any URL ("scheme://"),
# and the "scheme:" prefixes restic and borg users type. Taken for a directory name, it
# would make a folder called "s3:https:" and back up into it. (A directory whose name
# starts like this is still reachable as ./s3:name.)
_SCHEME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|(?:s3|sftp|ssh|rest|gs|azure|b2|swift|rclone):)"
)


def open_backend(location: str, io_timeout: float | None = None) -> Backend:
    """A backend for a repository location: `s3://bucket/prefix`, else a directory.
    `io_timeout`: for a directory, the seconds each call may take before it fails with
    BackendTimeout (dedupe.backends.deadline); an object store's calls are bounded by its
    client's connect and read timeouts and retries (backends/s3.py) instead."""
    if location.startswith("s3://"):
        from dedupe.backends.s3 import S3Backend, parse_s3_location

        try:
            parse_s3_location(location)
        except ValueError as e:
            raise UnsupportedLocation(
                f"{location!r}: this location is not supported ({e})",
                hint=f"supported: {SUPPORTED}",
            ) from None
        return S3Backend(location)
    if _SCHEME.match(location):
        scheme = location.split(":", 1)[0]
        raise UnsupportedLocation(
            f"{location!r}: the location scheme {scheme!r} is not supported by this version",
            hint=f"supported: {SUPPORTED}; to use a directory named like this, write ./{location}",
        )
    return LocalBackend(location, io_timeout=io_timeout)
