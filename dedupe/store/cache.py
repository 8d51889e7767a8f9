"""A local cache of a repository's immutable objects (docs/FORMAT.md section 3.1).

Key maps, index objects and the headers of generation manifests are content-addressed:
each one's name ends in the BLAKE3 hash of its bytes (a manifest's id is the hash of its
prefix, which holds the header). The cache keeps them as they are stored, sealed, in a
directory per repository and key holder, so that an operation on an object store fetches
only the objects written since the last one and lists the rest (`dedupe generations` of
a repository with thousands of generations then reads no object at all).

Trust: each cached file is the object's bytes followed by a MAC (keyed BLAKE3 of the name
and the bytes, under a key derived from the holder's own secret key), and a copy is taken
only if the MAC holds and the bytes still hash to their name, and only for a name the
backend has just listed or stated. Index objects and manifest headers then go through
every check a fetched copy does. A key map is written to the cache only after it passed
every check, its signature included; the MAC, which no one without this key file can
make, is what lets a cached key map skip the signature (the rest of its checks run, as
they depend on the current keyring). So a damaged or altered cache file is a cache miss
(deleted and fetched again), and a planted one is never read. The cache holds nothing
the repository does not: whoever can read it could read the objects.

The cache is an optimisation and never a cause of failure: when its directory cannot be
written (read-only, full disk) a warning is logged once and the operation goes on
without it. Writes are atomic (a temporary name, then a rename) and not fsynced: a file
torn by a crash fails its MAC and is fetched again.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import blake3

from dedupe.crypto import HolderSecrets
from dedupe.hashing import object_id

log = logging.getLogger("dedupe")

CACHE_ENV = "DEDUPE_CACHE_DIR"
MAC_SIZE = 32
# The objects kept, by name prefix. Everything under these is content-addressed.
CACHED_PREFIXES = ("keymaps/", "index/", "generations/")
# Marks the directory as a cache for backup tools (bford.info/cachedir), so that backing
# up a home directory does not back up the cache.
CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by dedupe.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)

Fetch = Callable[[], Awaitable[bytes]]


def default_cache_root() -> Path:
    """$DEDUPE_CACHE_DIR, else $XDG_CACHE_HOME/dedupe, else ~/.cache/dedupe."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "dedupe"


def content_matches(name: str, data: bytes | bytearray | memoryview) -> bool:
    """Whether `data` hashes to the last component of `name` (every cached kind's rule)."""
    return object_id(data) == name.rsplit("/", 1)[-1]


class NoCache:
    """The cache's interface, keeping nothing: for local repositories (reading the object
    costs what reading a cached copy would) and when caching is turned off."""

    enabled = False

    async def get(self, name: str, fetch: Fetch) -> bytes:
        return await fetch()

    def read(self, name: str) -> bytes | None:
        return None

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        pass

    def retain(self, prefix: str, listed: Iterable[str]) -> int:
        return 0


class ObjectCache(NoCache):
    """Cached objects under `<root>/<repository id>/`, one file per object name."""

    enabled = True

    def __init__(self, root: Path, repository_id: bytes, key_id: bytes, mac_key: bytes) -> None:
        self.root = Path(root)
        self.directory = self.root / repository_id.hex() / key_id.hex()
        self._base = str(self.directory) + os.sep  # string paths: pathlib costs ~20 us a name
        self._mac_key = mac_key
        self._failed = False

    @classmethod
    def of_holder(cls, root: Path, holder: HolderSecrets) -> ObjectCache:
        """The cache of the repository and key holder that `holder` opened."""
        return cls(root, holder.repository_id, holder.key_id, holder.cache_key)

    def _mac(self, name: str, data: bytes | bytearray | memoryview) -> bytes:
        mac = blake3.blake3(name.encode(), key=self._mac_key)
        mac.update(b"\0")
        mac.update(data)
        return bytes(mac.digest())

    def _path(self, name: str) -> str:
        if not name.startswith(CACHED_PREFIXES) or "/../" in name or name.endswith("/.."):
            raise ValueError(f"{name!r} is not a cacheable object name")
        return self._base + name

    def _give_up(self, what: str, error: OSError) -> None:
        if not self._failed:
            log.warning(
                "the cache at %s cannot be used (%s %s); going on without it",
                self.directory,
                what,
                error.strerror or error,
            )
        self._failed = True

    async def get(self, name: str, fetch: Fetch) -> bytes:
        """The object `name`, which the caller has just seen listed or stated: the cached
        copy when it is intact, else fetched (and kept when it hashes to its name)."""
        data = self.read(name)
        if data is None:
            data = await fetch()
            if content_matches(name, data):
                self.write(name, data)
        return data

    def read(self, name: str) -> bytes | None:
        """The cached bytes of `name` if their MAC holds and they hash to it; a damaged
        copy is deleted."""
        if self._failed:
            return None
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self._give_up("reading", e)
            return None
        body = memoryview(data)[:-MAC_SIZE]
        if (
            len(data) > MAC_SIZE
            and hmac.compare_digest(self._mac(name, body), data[-MAC_SIZE:])
            and content_matches(name, body)
        ):
            return data[:-MAC_SIZE]
        with contextlib.suppress(OSError):
            os.unlink(path)
        return None

    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        if self._failed:
            return
        path = self._path(name)
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            if not self.root.exists():
                self.root.mkdir(parents=True, mode=0o700)
                (self.root / "CACHEDIR.TAG").write_bytes(CACHEDIR_TAG)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.write(self._mac(name, data))
            os.replace(tmp, path)
        except FileNotFoundError:
            pass  # another process's retain() took the temporary file: not a failure
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._give_up("writing", e)

    def retain(self, prefix: str, listed: Iterable[str]) -> int:
        """Delete the cached objects under `prefix` that the backend no longer lists (a
        prune or forget removed them); returns how many. `listed`: the backend's listing
        of `prefix`, complete (a partial one would only cost fetching again)."""
        if self._failed:
            return 0
        keep = set(listed)
        base = self._base
        removed = 0
        for dirpath, _dirs, files in os.walk(self._path(prefix)):
            folder = dirpath[len(base) :].replace(os.sep, "/").rstrip("/")
            for file in files:
                # Leftover temporaries of an interrupted write go too.
                if f"{folder}/{file}" not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, file))
                        removed += 1
        return removed
