"""Storage backends: one async interface (`Backend`) with written semantics, concrete
backends (a local directory; an S3-compatible store later), and wrappers for retries and
concurrency limits. Upper layers depend only on `Backend`."""

import re

from dedupe.backends.base import Backend
from dedupe.backends.local import LocalBackend
from dedupe.errors import UnsupportedLocation

__all__ = ["Backend", "LocalBackend", "open_backend"]

SUPPORTED = "a local directory path"

# What a location of another tool or a later version looks like: any URL ("scheme://"),
# and the "scheme:" prefixes restic and borg users type. Taken for a directory name, it
# would make a folder called "s3:https:" and back up into it. (A directory whose name
# starts like this is still reachable as ./s3:name.)
_SCHEME = re.compile(
    r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|(?:s3|sftp|ssh|rest|gs|azure|b2|swift|rclone):)"
)


def open_backend(location: str) -> Backend:
    """A backend for a repository location (a directory path for now)."""
    if _SCHEME.match(location):
        scheme = location.split(":", 1)[0]
        raise UnsupportedLocation(
            f"{location!r}: the location scheme {scheme!r} is not supported by this version",
            hint=f"supported: {SUPPORTED}; to use a directory named like this, write ./{location}",
        )
    return LocalBackend(location)
