"""A local cache of a repository's immutable objects (docs/FORMAT.md section 3.1).

Key maps, index objects and the headers of generation manifests are content-addressed:
each one's name ends in the BLAKE3 hash of its bytes (a manifest's id is the hash of its
prefix, which holds the header). The cache keeps them as they are stored, sealed, in a
directory per repository and key holder, so that an operation on an object store fetches
only the objects written since the last one and lists the rest (`dedupe generations` of
a repository with thousands of generations then reads no object at all).

Trust: each cached file is the object's bytes, the object's size in the store, and a MAC
(keyed BLAKE3 of the name, the size and the bytes, under a key derived from the holder's
own secret key). A copy is taken only for a name the backend has just listed or stated
with that same size, and only if the MAC holds and the bytes still hash to their name:
a name planted in the store (an empty file under a forgotten generation's id) does not
bring a cached copy back. Index objects and manifest headers then go through
every check a fetched copy does. A key map is written to the cache only after it passed
every check, its signature included; the MAC, which no one without this key file can
make, is what lets a cached key map skip the signature (the rest of its checks run, as
they depend on the current keyring). So a damaged or altered cache file is a cache miss
(deleted and fetched again), and a planted one is never read. The cache holds nothing
the repository does not: whoever can read it could read the objects.

The cache is an optimisation and never a cause of failure: when its directory cannot be
written (read-only, full disk), or is not a directory of this user (a symbolic link, a
directory someone else made), a warning is logged once and the operation goes on without
it. Cached files are opened without following links and without blocking, and read only
when they are regular files no larger than their kind can be. Writes are atomic (a
temporary name, then a rename) and not fsynced: a file torn by a crash fails its MAC.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

import blake3

from dedupe.backends.base import Backend
from dedupe.crypto import HolderSecrets
from dedupe.hashing import object_id

log = logging.getLogger("dedupe")

CACHE_ENV = "DEDUPE_CACHE_DIR"
MAC_SIZE = 32
_SIZE = struct.Struct("<Q")  # the object's size in the store
TRAILER_SIZE = _SIZE.size + MAC_SIZE
# The names kept: every one content-addressed. Anything else a listing returns (a planted
# "keymaps/00000001/../x") is never looked up.
_CACHEABLE = re.compile(r"(?:keymaps/[0-9]{8}|index|generations|drills)/[0-9a-f]{64}")
_ENTRY = re.compile(r"[0-9a-f]{64}(?:\.[0-9a-f]{8}\.tmp)?")  # what retain() may delete
# Errors that mean the cache cannot be used at all (rather than this one entry).
_FATAL = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
# Marks the directory as a cache for backup tools (bford.info/cachedir), so that backing
# up a home directory does not back up the cache.
CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by dedupe.\n"
    b"# For information about cache directory tags, see https://bford.info/cachedir/\n"
)


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

    async def listing(self, backend: Backend, prefix: str) -> dict[str, int]:
        """The backend's names under `prefix`, each with the size read() must be given:
        none is needed here, so none is asked for (a directory would stat each name)."""
        return dict.fromkeys(await backend.list(prefix), -1)

    def read(self, name: str, size: int, limit: int) -> bytes | None:
        return None

    def write(self, name: str, data: bytes | bytearray | memoryview, size: int) -> None:
        pass

    def retain(self, prefix: str, listed: Iterable[str]) -> int:
        return 0


class ObjectCache(NoCache):
    """Cached objects under `<root>/<repository id>/<key id>/`, one file per object name."""

    def __init__(self, root: Path, repository_id: bytes, key_id: bytes, mac_key: bytes) -> None:
        self.root = Path(root)
        self.directory = self.root / repository_id.hex() / key_id.hex()
        self._base = str(self.directory) + os.sep  # string paths: pathlib costs ~20 us a name
        self._mac_key = mac_key
        self._checked = False
        self._failed = False
        self._real_folders: set[str] = set()  # folders seen to be directories, no link

    async def listing(self, backend: Backend, prefix: str) -> dict[str, int]:
        return await backend.list_sized(prefix)

    @classmethod
    def of_holder(cls, root: Path, holder: HolderSecrets) -> ObjectCache:
        """The cache of the repository and key holder that `holder` opened."""
        return cls(root, holder.repository_id, holder.key_id, holder.cache_key)

    def _mac(self, name: str, size: int, data: bytes | bytearray | memoryview) -> bytes:
        mac = blake3.blake3(name.encode(), key=self._mac_key)
        mac.update(b"\0" + _SIZE.pack(size))
        mac.update(data)
        return bytes(mac.digest())

    def _give_up(self, why: str) -> None:
        if not self._failed:
            log.warning("the cache at %s cannot be used (%s); going on without it", self.root, why)
        self._failed = True

    def _usable(self) -> bool:
        """Whether the cache directories are (or could be made) directories of this user,
        none of them a link; checked once."""
        if self._failed:
            return False
        if self._checked:
            return True
        self._checked = True
        try:
            os.makedirs(self.root.parent, exist_ok=True)  # ~/.cache on a new machine
        except OSError as e:
            self._give_up(f"creating {self.root.parent}: {e.strerror or e}")
            return False
        for directory in (self.root, self.directory.parent, self.directory):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                self._give_up(f"creating {directory}: {e.strerror or e}")
                return False
            try:
                st = os.lstat(directory)
            except OSError as e:
                self._give_up(f"{directory}: {e.strerror or e}")
                return False
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                self._give_up(f"{directory} is not a directory of this user")
                return False
        tag = self.root / "CACHEDIR.TAG"
        if not tag.exists():
            with contextlib.suppress(OSError):
                tag.write_bytes(CACHEDIR_TAG)
        return True

    def _path(self, name: str) -> str | None:
        return self._base + name if _CACHEABLE.fullmatch(name) else None

    def _in_real_folder(self, path: str) -> bool:
        """Whether every folder between the holder's directory and `path` (index/,
        keymaps/NNNNNNNN/, ...) is a directory and none a link: O_NOFOLLOW guards only a
        path's last component, and a linked folder would lead reads, and the deletion of
        a copy that fails, outside the cache."""
        folder = os.path.dirname(path)
        if folder in self._real_folders:
            return True
        at = self._base.rstrip(os.sep)
        for part in folder[len(self._base) :].split(os.sep):
            at = os.path.join(at, part)
            try:
                if not stat.S_ISDIR(os.lstat(at).st_mode):
                    return False
            except OSError:
                return False
        self._real_folders.add(folder)
        return True

    def read(self, name: str, size: int, limit: int) -> bytes | None:
        """The cached bytes of `name`, an object the store just listed or stated with
        `size` bytes, if their MAC holds and they hash to the name; `limit`: the most
        bytes such a copy can have. A copy that fails is deleted."""
        path = self._path(name)
        if path is None or not self._usable() or not self._in_real_folder(path):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:  # a link (ELOOP), a directory, ...: no copy of ours
            self._discard(path)
            return None
        try:
            st = os.fstat(fd)
            fits = TRAILER_SIZE < st.st_size <= limit + TRAILER_SIZE
            data = _read_exactly(fd, st.st_size) if stat.S_ISREG(st.st_mode) and fits else None
        except OSError:
            data = None
        finally:
            os.close(fd)
        if data is not None:
            body = memoryview(data)[:-TRAILER_SIZE]
            (stored_size,) = _SIZE.unpack_from(data, len(body))
            if (
                stored_size == size
                and hmac.compare_digest(self._mac(name, size, body), data[-MAC_SIZE:])
                and content_matches(name, body)
            ):
                return data[:-TRAILER_SIZE]
        self._discard(path)
        return None

    def _discard(self, path: str) -> None:
        with contextlib.suppress(OSError):
            if self._in_real_folder(path) and not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)

    def write(self, name: str, data: bytes | bytearray | memoryview, size: int) -> None:
        """Keep `data`, the object `name` of `size` bytes in the store (or the prefix of
        one: a manifest's)."""
        path = self._path(name)
        if path is None or not self._usable():
            return
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            folder = os.path.dirname(path)
            os.makedirs(folder, mode=0o700, exist_ok=True)
            if not self._in_real_folder(path):
                self._give_up(f"{folder} is, or is under, a symbolic link")
                return
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.write(_SIZE.pack(size))
                f.write(self._mac(name, size, data))
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if e.errno in _FATAL:
                self._give_up(f"writing {name}: {e.strerror or e}")
            # Anything else (a directory where the file goes, a temporary file another
            # process's retain() took) costs this entry only.

    def retain(self, prefix: str, listed: Iterable[str]) -> int:
        """Delete the cached objects under `prefix` that the backend no longer lists (a
        prune or forget removed them); returns how many. `listed`: the backend's listing
        of `prefix`, complete (a partial one would only cost fetching again). Only files
        named as cache entries are deleted, and no link is followed."""
        if not self._usable():
            return 0
        keep = set(listed)
        top = self._base + prefix.rstrip("/")
        try:
            if not stat.S_ISDIR(os.lstat(top).st_mode):
                return 0
        except OSError:
            return 0
        base = self._base
        removed = 0
        for dirpath, _dirs, files in os.walk(top):  # does not follow links to directories
            folder = dirpath[len(base) :].replace(os.sep, "/").rstrip("/")
            for file in files:
                # Leftover temporaries of an interrupted write go too.
                if _ENTRY.fullmatch(file) and f"{folder}/{file}" not in keep:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, file))
                        removed += 1
        return removed


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts = []
    while n > 0:
        piece = os.read(fd, n)
        if not piece:
            return None  # it shrank: not a copy to trust
        parts.append(piece)
        n -= len(piece)
    return b"".join(parts)
