"""Tree generations (docs/FORMAT.md section 8.3): a directory's entries as JSON objects in
the body meta, its files' chunk records back to back in the literal table.

In memory an entry is the JSON object of the format, except that a file entry carries
`records` (its CHUNK_RECORDs, bytes) instead of `chunks` (a position in one manifest's
table): positions are an encoding detail, records are what the entry means.

Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dedupe.errors import IntegrityError
from dedupe.format.manifest import CHUNK_RECORD

_R = CHUNK_RECORD.size
Entry = dict[str, Any]

TYPES = frozenset({"file", "dir", "symlink", "hardlink", "fifo", "chardev", "blockdev"})
ROOT = "."
# Fields of every entry (besides path and type), and the extra ones per type.
COMMON = ("mode", "uid", "gid", "mtime_ns", "ctime_ns", "size", "ino", "dev")
# A file whose content key is unchanged against its parent entry is not read again.
CONTENT_KEY = ("size", "mtime_ns", "ctime_ns", "ino", "dev")


def sort_key(path: str) -> tuple[str, ...]:
    """Entry order: by path components, so a directory is followed by its contents (the
    order of a depth-first walk with sorted names); the root "." comes first."""
    return () if path == ROOT else tuple(path.split("/"))


def check_path(path: object, what: str) -> str:
    """`path` if it is a safe relative path of the format, else IntegrityError: restore
    joins it under the target, so nothing may climb out of it."""
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"{what}: an entry has no path")
    if path == ROOT:
        return path
    if path.startswith("/") or "\0" in path:
        raise IntegrityError(f"{what}: entry path {path!r} is not relative")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise IntegrityError(f"{what}: entry path {path!r} has an empty, '.' or '..' part")
    return path


def is_below(path: str, top: str) -> bool:
    """Whether `path` is `top` or lies below it."""
    return top == ROOT or path == top or path.startswith(top + "/")


def records_size(records: bytes) -> int:
    """The logical bytes a run of CHUNK_RECORDs stands for."""
    return sum(length for _id, length in CHUNK_RECORD.iter_unpack(records))


def complete_table(entries: Iterable[Entry]) -> bytes:
    """The concatenation of the file entries' records, in entry order."""
    return b"".join(e["records"] for e in entries if e["type"] == "file")


def same_content(entry: Entry, parent: Entry | None) -> bool:
    """Whether `entry` (fresh from lstat, no records yet) may reuse `parent`'s records and
    digest without being read: both files with equal size, mtime, ctime, inode and device,
    and the parent not marked `reread` (its times were too close to its backup to prove
    that no later change has the same times)."""
    return (
        parent is not None
        and entry["type"] == "file"
        and parent["type"] == "file"
        and not parent.get("reread", False)
        and all(entry[k] == parent[k] for k in CONTENT_KEY)
    )


def encode_tree(
    entries: Sequence[Entry], deleted: Sequence[str], parent: str | None
) -> tuple[dict[str, Any], bytes]:
    """(body meta, literal table) for `entries` (in entry order, files with `records`),
    `deleted` paths and the parent generation id (None for a full)."""
    literal = bytearray()
    out: list[Entry] = []
    for entry in entries:
        e = {k: v for k, v in entry.items() if k != "records"}
        if entry["type"] == "file":
            records: bytes = entry["records"]
            e["chunks"] = [len(literal) // _R, len(records) // _R]
            literal += records
        out.append(e)
    meta: dict[str, Any] = {
        "type": "tree",
        "chunk_count": len(literal) // _R,
        "entries": out,
        "deleted": list(deleted),
        "delta": {"parent": parent} if parent is not None else None,
    }
    return meta, bytes(literal)


def decode_tree(meta: dict[str, Any], literal: bytes, what: str) -> tuple[list[Entry], list[str]]:
    """(entries with `records`, deleted paths) of one manifest's body; IntegrityError if it
    is not a well-formed tree body."""
    if meta.get("type") != "tree":
        raise IntegrityError(f"{what} is not a tree generation")
    try:
        raw_entries = meta["entries"]
        deleted = [check_path(p, what) for p in meta["deleted"]]
        entries: list[Entry] = []
        for raw in raw_entries:
            e = dict(raw)
            check_path(e["path"], what)
            if e["type"] not in TYPES:
                raise IntegrityError(f"{what}: {e['path']} has unknown type {e['type']!r}")
            for k in COMMON:
                if not isinstance(e[k], int):
                    raise IntegrityError(f"{what}: {e['path']} has a bad {k!r}")
            if e["type"] == "file":
                start, count = (int(x) for x in e.pop("chunks"))
                if start < 0 or count < 0 or (start + count) * _R > len(literal):
                    raise IntegrityError(f"{what}: {e['path']} has chunks past the table")
                e["records"] = literal[start * _R : (start + count) * _R]
                if not isinstance(e["digest"], str) or len(e["digest"]) != 64:
                    raise IntegrityError(f"{what}: {e['path']} has a bad digest")
            elif e["type"] in ("symlink", "hardlink"):
                if not isinstance(e["target"], str) or not e["target"]:
                    raise IntegrityError(f"{what}: {e['path']} has no target")
            elif e["type"] in ("chardev", "blockdev") and not isinstance(e["rdev"], int):
                raise IntegrityError(f"{what}: {e['path']} has a bad rdev")
            entries.append(e)
    except (KeyError, TypeError, ValueError) as err:
        raise IntegrityError(f"{what}: malformed tree entry: {err!r}") from None
    return entries, deleted


def apply_tree_delta(
    tree: dict[str, Entry], entries: Iterable[Entry], deleted: Iterable[str]
) -> None:
    """Apply one delta to `tree` (path -> entry) in place: remove every deleted path and
    everything below it, then insert or replace the entries by path."""
    gone = list(deleted)
    if gone:
        for path in [p for p in tree if any(is_below(p, top) for top in gone)]:
            del tree[path]
    for e in entries:
        tree[e["path"]] = e


def expand(chain: Sequence[tuple[dict[str, Any], bytes]], what: str) -> tuple[list[Entry], bytes]:
    """Expand a chain of (body meta, literal table), from its full down to the generation,
    into (entries in entry order with their `records`, complete chunk table).

    IntegrityError if the chain does not start with a full, or the result is inconsistent
    (a file whose records do not add up to its size, a hardlink whose target is not an
    earlier non-directory entry)."""
    if not chain or chain[0][0].get("delta"):
        raise IntegrityError(f"{what}: its chain does not start with a full")
    tree: dict[str, Entry] = {}
    for meta, literal in chain:
        entries, deleted = decode_tree(meta, literal, what)
        apply_tree_delta(tree, entries, deleted)
    ordered = ordered_entries(tree, what)
    return ordered, complete_table(ordered)


def ordered_entries(tree: dict[str, Entry], what: str) -> list[Entry]:
    """The entries of an expanded tree (path -> entry) in entry order, checked as `expand`
    checks them."""
    ordered = [tree[p] for p in sorted(tree, key=sort_key)]
    check_tree(ordered, what)
    return ordered


def check_tree(entries: Sequence[Entry], what: str) -> None:
    """IntegrityError unless the expanded tree is consistent (see `expand`)."""
    seen: dict[str, str] = {}
    for e in entries:
        path = e["path"]
        parent = ROOT if "/" not in path else path.rsplit("/", 1)[0]
        if path == ROOT:
            if e["type"] != "dir":
                raise IntegrityError(f"{what}: the root of the tree is not a directory")
        elif seen.get(parent) != "dir":
            raise IntegrityError(f"{what}: {path} is not inside a directory of the tree")
        if e["type"] == "file" and records_size(e["records"]) != e["size"]:
            raise IntegrityError(f"{what}: the chunks of {path} do not add up to its size")
        if e["type"] == "hardlink" and seen.get(e["target"]) in (None, "dir", "hardlink"):
            raise IntegrityError(f"{what}: hardlink {path} points to no earlier entry")
        seen[path] = e["type"]
    if not entries or entries[0]["path"] != ROOT:
        raise IntegrityError(f"{what}: the tree has no root directory")


def diff(parent: Sequence[Entry], current: Sequence[Entry]) -> tuple[list[Entry], list[str]]:
    """(entries of `current` that are new or differ from `parent`, paths of `parent` that
    `current` lacks, without those below another deleted path). Both in entry order; file
    entries compare with their records and digest."""
    old = {e["path"]: e for e in parent}
    now = {e["path"] for e in current}
    changed = [e for e in current if old.get(e["path"]) != e]
    deleted: list[str] = []
    for e in parent:
        path = e["path"]
        if path not in now and not (deleted and is_below(path, deleted[-1])):
            deleted.append(path)
    return changed, deleted
