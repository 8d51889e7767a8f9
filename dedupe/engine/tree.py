"""Directory trees: back up a directory as one generation, restore it as a directory
(docs/FORMAT.md section 8.3).

Backup walks the tree first (lstat only, symlinks never followed, names sorted), then feeds
the files that must be read through the ordinary backup pipeline (`ingest`), each followed
by FILE_END, so a chunk never spans two files and each file gets its own digest. An
incremental or differential does not read a file whose size, mtime, ctime, inode and device
are those of its parent's entry: it keeps the parent's records and digest. Its manifest
lists only the entries that are new or changed, and the deleted paths.

Restore builds the tree in a new directory beside the target: directories, then every
file from one `restore_chunks` pipeline over the complete table (each file checked against
its digest), then symlinks, hard links, fifos and devices, then ownership (as root), modes
and times, deepest first. Everything is flushed (sync) before the directory is renamed into
place, so a failed or cancelled restore leaves no partial tree behind.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import os
import secrets
import shutil
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any

from dedupe._types import BackupStats, Progress, ProgressCallback, RestoreStats
from dedupe.chunking import BlockReader
from dedupe.crypto.aead import Buffer
from dedupe.engine.backup import (
    FILE_END,
    Item,
    commit,
    dry_run_stats,
    empty_source,
    index_only,
    ingest,
)
from dedupe.engine.outfile import writev_all
from dedupe.engine.restore import finish_in_thread, restore_chunks
from dedupe.engine.sources import READ_SIZE
from dedupe.errors import (
    IntegrityError,
    SourceError,
    TargetError,
)
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import (
    ROOT,
    Entry,
    complete_table,
    diff,
    encode_tree,
    expand,
    same_content,
)
from dedupe.hashing import StreamDigest
from dedupe.store import RepositoryStore
from dedupe.store.repository import BeforeWrite

_R = CHUNK_RECORD.size
UNREAD = -1  # in `sizes`: a file that could not be opened
_NAMED_SKIPS = 5  # skipped paths named in a backup's note
# A file changed this close before its backup began may change again with the same
# mtime and ctime (coarse file system clocks: a jiffy on ext4, 2 s on FAT); it is marked
# `reread` so that the next incremental reads it instead of trusting its times.
RACY_NS = 2_000_000_000

_TYPES = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
}


# --- reading a chain -----------------------------------------------------------------------


async def load_tree(store: RepositoryStore, gen_id: str) -> tuple[list[Entry], bytes]:
    """(expanded entries in entry order, complete chunk table) of tree generation `gen_id`,
    its chain resolved from the full downwards. MissingObject when a generation of the
    chain is gone, IntegrityError when one is not a tree or the result is inconsistent."""
    chain = [(meta, table) for _gid, meta, table, _header in await store.manifest_chain(gen_id)]
    chain.reverse()
    return await asyncio.to_thread(expand, chain, f"generation {gen_id}")


# --- backup --------------------------------------------------------------------------------


def _entry(path: str, st: os.stat_result, kind: str) -> Entry:
    return {
        "path": path,
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "size": st.st_size if kind == "file" else 0,
        "ino": st.st_ino,
        "dev": st.st_dev,
    }


class _Scan:
    """What a walk met besides entries: `skipped` (sockets and other unsupported types),
    `unreadable` (entries that could not be read; a strict walk raises instead)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.skipped: list[str] = []
        self.unreadable: list[str] = []

    def cannot(self, rel: str, message: str) -> None:
        if self.strict:
            raise SourceError(message, hint="without --strict, it is skipped and reported")
        self.unreadable.append(rel)


def _list_dir(abs_dir: str, rel: str, scan: _Scan) -> Iterator[tuple[str, str, os.stat_result]]:
    """(absolute path, entry path, lstat) of a directory's entries, sorted by name."""
    try:
        with os.scandir(abs_dir) as it:
            found = sorted((d.name, d.path) for d in it)
    except OSError as e:
        scan.cannot(rel, f"cannot read directory {abs_dir}: {e.strerror}")
        return
    for name, abs_path in found:
        path = name if rel == ROOT else f"{rel}/{name}"
        try:
            st = os.lstat(abs_path)
        except FileNotFoundError:
            continue  # gone since the listing: it is not part of this backup
        except OSError as e:
            scan.cannot(path, f"cannot stat {abs_path}: {e.strerror}")
            continue
        yield abs_path, path, st


def excluded(path: str, patterns: Sequence[str]) -> bool:
    """Whether an entry path matches an --exclude pattern: a pattern with a "/" matches
    the path from the root (a leading "/" is allowed: "/var/tmp"), one without matches
    the entry's name at any depth ("*.log", "node_modules")."""
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        if "/" in pattern:
            if fnmatch.fnmatchcase(path, pattern.strip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def scan_tree(
    root: str, exclude: Sequence[str] = (), strict: bool = True
) -> tuple[list[Entry], _Scan]:
    """Walk `root` (blocking; run it on a thread): entries in entry order, without file
    records or digests, and what the walk skipped. Symlinks are recorded, never followed;
    the second and later paths of a non-directory inode become hardlink entries; entries
    matching `exclude` (see excluded) are left out, a directory with its contents. An
    entry that cannot be read raises SourceError when `strict`, else is left out and
    listed in `unreadable` (a directory that cannot be listed is kept, empty)."""
    try:
        root_st = os.stat(root)
    except OSError as err:
        raise SourceError(f"cannot stat {root}: {err.strerror}") from None
    if not stat.S_ISDIR(root_st.st_mode):
        raise SourceError(f"{root} is not a directory")
    entries = [_entry(ROOT, root_st, "dir")]
    scan = _Scan(strict)
    first_path: dict[tuple[int, int], str] = {}
    stack = [_list_dir(root, ROOT, scan)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        abs_path, rel, st = item
        if exclude and excluded(rel, exclude):
            continue
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        if kind is None:
            scan.skipped.append(rel)
            continue
        if kind != "dir" and st.st_nlink > 1:
            first = first_path.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                e = _entry(rel, st, "hardlink")
                e["target"] = first
                entries.append(e)
                continue
        e = _entry(rel, st, kind)
        if kind == "symlink":
            try:
                e["target"] = os.readlink(abs_path)
            except OSError as err:
                scan.cannot(rel, f"cannot read symlink {abs_path}: {err.strerror}")
                continue
        elif kind in ("chardev", "blockdev"):
            e["rdev"] = st.st_rdev
        entries.append(e)
        if kind == "dir":
            stack.append(_list_dir(abs_path, rel, scan))
    return entries, scan


def _open_regular(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"{path} vanished during the backup") from None
    except OSError as e:
        raise SourceError(f"cannot open {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"{path} stopped being a regular file during the backup")
    return fd


async def _read_files(
    root: str, files: Sequence[Entry], sizes: list[int], scan: _Scan
) -> AsyncIterator[Item]:
    """The bytes of `files` in order, each followed by FILE_END; appends each file's length
    as read to `sizes`, or UNREAD for a file that could not be opened (not strict)."""
    reader = BlockReader(READ_SIZE)  # reused blocks, sliced by the chunker in place
    for e in files:
        path = os.path.join(root, e["path"])
        try:
            fd = await asyncio.to_thread(_open_regular, path)
        except SourceError as err:
            scan.cannot(e["path"], err.message)
            sizes.append(UNREAD)
            yield FILE_END
            continue
        n = 0
        try:
            while True:
                try:
                    block = await finish_in_thread(reader.read, fd)
                except OSError as err:
                    raise SourceError(f"reading {path} failed: {err.strerror}") from None
                if block is None:
                    break
                n += len(block)
                yield block
        finally:
            os.close(fd)
        sizes.append(n)
        yield FILE_END


async def backup_tree(
    store: RepositoryStore,
    root: str,
    *,
    name: str,
    kind: str,
    parent: tuple[str, list[Entry]] | None,
    executor: Executor,
    progress: ProgressCallback | None = None,
    before_commit: Callable[[], Awaitable[None]] | None = None,
    chunker: dict[str, Any] | str = "fastcdc",
    allow_empty: bool = False,
    exclude: Sequence[str] = (),
    strict: bool = False,
    labels: dict[str, Any] | None = None,
    dry_run: bool = False,
    before_write: BeforeWrite | None = None,
    store_only: bool = False,
    source_info: dict[str, Any] | None = None,
    dictionary: str | None = None,
) -> BackupStats:
    """Back up directory `root` as a tree generation of `name`. `parent` is (generation id,
    its expanded entries) for an incremental or differential, None for a full (which reads
    every file). Returns once the manifest is stored; `note` names skipped entries. A
    directory with nothing in it (an unmounted mount point looks like that) raises
    EmptySource unless `allow_empty`. `exclude`: patterns of entries to leave out (see
    excluded). An entry that cannot be read fails the backup when `strict`; otherwise it
    is left out, and `unreadable` lists it (a partial backup). `store_only`: store and
    index what the repository lacks, commit nothing (a repair from a replica).
    `source_info`: what the header's `source` records beside its type (default: the
    root as its label)."""
    if (kind == "full") != (parent is None):
        raise ValueError("a full has no parent; an incremental or differential needs one")
    started_ns = time.time_ns()
    entries, scan = await asyncio.to_thread(scan_tree, root, exclude, strict)
    if len(entries) == 1 and not allow_empty:  # the root alone
        raise empty_source(f"{root} is an empty directory", "an unmounted mount point")
    old = {e["path"]: e for e in parent[1]} if parent is not None else {}
    todo: list[Entry] = []
    for e in entries:
        if e["type"] != "file":
            continue
        before = old.get(e["path"])
        if before is not None and same_content(e, before):
            e["records"], e["digest"] = before["records"], before["digest"]
        else:
            todo.append(e)
            if max(e["mtime_ns"], e["ctime_ns"]) >= started_ns - RACY_NS:
                e["reread"] = True
    sizes: list[int] = []
    got = await ingest(
        store,
        _read_files(root, todo, sizes, scan),
        executor=executor,
        progress=progress,
        size_hint=sum(e["size"] for e in todo),
        chunker=chunker,
        before_salvage=before_commit,
        dry_run=dry_run,
        dictionary=dictionary,
    )
    if len(got.marks) != len(todo) or len(sizes) != len(todo):
        raise RuntimeError("the backup pipeline lost a file boundary")
    if dry_run:  # what would be read: the new and changed files
        return dry_run_stats(got, name, kind, parent[0] if parent is not None else None)
    if store_only:
        return await index_only(store, got, name, kind, before_commit)
    start = 0
    unread = set()
    for e, (end, digest), size in zip(todo, got.marks, sizes, strict=True):
        if size == UNREAD:
            unread.add(e["path"])
        e["records"] = bytes(got.table[start * _R : end * _R])
        e["digest"] = digest
        e["size"] = size  # what was read, which is what the records hold
        start = end
    if unread:  # files that could not be opened are not part of the generation
        entries = [e for e in entries if e["path"] not in unread]

    if parent is None:
        meta, literal = encode_tree(entries, [], None)
    else:
        changed, deleted = diff(parent[1], entries)
        meta, literal = encode_tree(changed, deleted, parent[0])
    # The header counts the chunks of the complete tree, as a stream generation's does.
    chunk_count = sum(len(e["records"]) for e in entries if e["type"] == "file") // _R
    with store.manifest_writer() as body:
        await asyncio.to_thread(body.add, literal)
        stats = await commit(
            store,
            got,
            name=name,
            kind=kind,
            parent=parent[0] if parent is not None else None,
            # What the tree is, when it stands for something else (the tablespace tars of
            # a PostgreSQL base backup); a tree all the same.
            source_info={"label": root, **(source_info or {}), "type": "tree"},
            meta=meta,
            body=body,
            chunk_count=chunk_count,
            size=sum(e["size"] for e in entries if e["type"] == "file"),
            progress=progress,
            before_commit=before_commit,
            labels=labels,
            before_write=before_write,
        )
    notes = []
    if scan.skipped:
        notes.append(
            f"skipped {len(scan.skipped)} socket(s) or other unsupported entries: "
            + _named(scan.skipped)
        )
    if scan.unreadable:
        notes.append(
            f"PARTIAL: {len(scan.unreadable)} entries could not be read and are "
            "not in this generation: " + _named(scan.unreadable)
        )
    if notes:
        stats = dataclasses.replace(stats, note="; ".join(notes), unreadable=tuple(scan.unreadable))
    return stats


def _named(paths: list[str]) -> str:
    return ", ".join(paths[:_NAMED_SKIPS]) + (", ..." if len(paths) > _NAMED_SKIPS else "")


# --- restore -------------------------------------------------------------------------------


def _join(top: str, path: str) -> str:
    return top if path == ROOT else os.path.join(top, *path.split("/"))


def _write_and_hash(fd: int, parts: list[Buffer], digest: StreamDigest) -> int:
    digest.update_many(parts)
    return writev_all(fd, parts)


class _FileSink:
    """Cuts the verified chunk stream of a tree's complete table into its files, in entry
    order, and checks each file against its digest when its last chunk is written."""

    def __init__(self, top: str, files: list[Entry], store: RepositoryStore, gen_id: str) -> None:
        self.top = top
        self.files = files
        self.hasher = store.hasher
        self.gen_id = gen_id
        self.pos = 0  # the file being written
        self.fd = -1
        self.left = 0  # its records still to come
        self.digest = store.hasher.stream_digest()

    async def begin(self) -> None:
        await self._open_next()

    async def feed(self, parts: list[Buffer]) -> int:
        written = 0
        i = 0
        while i < len(parts):
            if self.fd < 0:
                raise IntegrityError(f"generation {self.gen_id}: more chunks than its files hold")
            take = parts[i : i + self.left]
            written += await finish_in_thread(_write_and_hash, self.fd, take, self.digest)
            i += len(take)
            self.left -= len(take)
            if self.left == 0:
                await self._finish_current()
                await self._open_next()
        return written

    def done(self) -> bool:
        return self.pos == len(self.files)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def _open_next(self) -> None:
        # Empty files have no records: create and check them right away.
        while self.pos < len(self.files):
            e = self.files[self.pos]
            path = _join(self.top, e["path"])
            try:
                self.fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            except OSError as err:
                raise TargetError(f"cannot create {path}: {err.strerror}") from None
            self.left = len(e["records"]) // _R
            self.digest = self.hasher.stream_digest()
            if self.left:
                return
            await self._finish_current()

    async def _finish_current(self) -> None:
        e = self.files[self.pos]
        self.close()
        if self.digest.hexdigest() != e["digest"]:
            raise IntegrityError(
                f"file {e['path']} of generation {self.gen_id} does not match the digest "
                "recorded at backup"
            )
        self.pos += 1


def _make_dirs(top: str, entries: Sequence[Entry]) -> None:
    for e in entries:
        if e["type"] == "dir" and e["path"] != ROOT:
            os.mkdir(_join(top, e["path"]), 0o700)


def _make_specials(top: str, entries: Sequence[Entry]) -> None:
    """Symlinks, hard links, fifos and devices, in entry order (a hard link's target comes
    before it). TargetError names what cannot be created."""
    for e in entries:
        kind = e["type"]
        path = _join(top, e["path"])
        try:
            if kind == "symlink":
                os.symlink(e["target"], path)
            elif kind == "hardlink":
                os.link(_join(top, e["target"]), path, follow_symlinks=False)
            elif kind == "fifo":
                os.mkfifo(path, 0o600)
            elif kind in ("chardev", "blockdev"):
                fmt = stat.S_IFCHR if kind == "chardev" else stat.S_IFBLK
                os.mknod(path, 0o600 | fmt, e["rdev"])
        except OSError as err:
            raise TargetError(f"cannot create {kind} {e['path']}: {err.strerror}") from None


def _apply_metadata(top: str, entries: Sequence[Entry]) -> None:
    """Owner (as root), mode and times, in reverse entry order: a directory's contents
    before the directory, whose mtime they would otherwise change. Hard links share their
    target's inode; a symlink's mode is not settable on Linux."""
    as_root = os.geteuid() == 0
    for e in reversed(entries):
        kind = e["type"]
        if kind == "hardlink":
            continue
        path = _join(top, e["path"])
        try:
            if as_root:
                os.chown(path, e["uid"], e["gid"], follow_symlinks=False)
            if kind != "symlink":
                os.chmod(path, e["mode"])  # after chown, which clears setuid bits
            ns = (e["mtime_ns"], e["mtime_ns"])
            os.utime(path, ns=ns, follow_symlinks=False)
        except OSError as err:
            raise TargetError(
                f"cannot set owner, mode or times of {e['path']}: {err.strerror}"
            ) from None


def _remove_tree(path: str) -> None:
    """Remove a partial restore, making directories writable where that is needed."""

    def retry(fn: Callable[..., Any], p: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            fn(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


def _target_state(target: str, overwrite: bool) -> bool:
    """Whether `target` exists (then it is a directory, empty unless `overwrite`)."""
    if not os.path.lexists(target):
        return False
    if os.path.islink(target) or not os.path.isdir(target):
        raise TargetError(f"{target} exists and is not a directory")
    try:
        with os.scandir(target) as it:
            empty = next(it, None) is None
    except OSError as e:
        raise TargetError(f"cannot read {target}: {e.strerror}") from None
    if not empty and not overwrite:
        raise TargetError(
            f"{target} is not empty",
            hint="restore into a new or empty directory, or replace it with --overwrite",
        )
    return True


def _swap_in(tmp: str, target: str, exists: bool) -> str | None:
    """Rename the finished tree `tmp` to `target`. An existing empty target is removed
    first; a non-empty one (overwrite) is moved aside, and its new name returned for the
    caller to remove. If the final rename fails, the old target is put back."""
    old = None
    if exists:
        with os.scandir(target) as it:
            empty = next(it, None) is None
        if empty:
            os.rmdir(target)
        else:
            parent_dir, base = os.path.split(target)
            old = os.path.join(parent_dir, f".{base}.dedupe-old-{secrets.token_hex(4)}")
            os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    return old


async def _name_damaged_file(
    store: RepositoryStore,
    gen_id: str,
    files: Sequence[Entry],
    err: IntegrityError,
    executor: Executor,
) -> None:
    """Re-read the files from the one being written onwards, one by one, and raise the
    first failure again naming its file. The damage lies at most a few windows ahead, so
    this reads little; if nothing fails now, the caller re-raises the original error."""
    for e in files:
        try:
            async for _parts in restore_chunks(store, gen_id, [e["records"]], None, executor):
                pass
        except IntegrityError as again:
            raise type(again)(
                f"file {e['path']} of generation {gen_id}: {again.message}", hint=again.hint
            ) from err


async def _write_files(
    store: RepositoryStore,
    gen_id: str,
    top: str,
    entries: Sequence[Entry],
    executor: Executor,
    p: Progress,
    progress: ProgressCallback | None,
) -> None:
    files = [e for e in entries if e["type"] == "file"]
    sink = _FileSink(top, files, store, gen_id)
    stream = restore_chunks(store, gen_id, [complete_table(files)], None, executor, per_chunk=True)
    try:
        await sink.begin()
        while True:
            try:
                parts = await anext(stream)
            except StopAsyncIteration:
                break
            except IntegrityError as err:
                sink.close()
                await _name_damaged_file(store, gen_id, files[sink.pos :], err, executor)
                raise
            p.bytes_written += await sink.feed(parts)
            p.chunks += len(parts)
            if progress:
                progress(p)
        if not sink.done():
            raise IntegrityError(f"generation {gen_id}: its files hold more chunks than it has")
    finally:
        sink.close()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def restore_tree(
    store: RepositoryStore,
    gen_id: str,
    entries: list[Entry],
    target_dir: str,
    *,
    executor: Executor,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> RestoreStats:
    """Restore the expanded tree `entries` of generation `gen_id` to `target_dir`, which
    must not exist or be empty (with `overwrite`, a non-empty directory is replaced as a
    whole). Builds the tree in a new directory beside the target and renames it into place
    only when every file matched its digest and all is flushed to disk; on any failure that
    directory is removed and the target is untouched. IntegrityError names the damaged
    file; TargetError what could not be created (e.g. a device without the privilege)."""
    started = time.monotonic()
    target = os.path.abspath(target_dir)
    exists = _target_state(target, overwrite)
    parent_dir, base = os.path.split(target)
    tmp = os.path.join(parent_dir, f".{base}.dedupe-{secrets.token_hex(4)}")
    try:
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise TargetError(f"cannot create {tmp}: {e.strerror}") from None
    await store.refresh_index()
    total = sum(e["size"] for e in entries if e["type"] == "file")
    p = Progress("restore", "restoring", bytes_total=total)
    root = entries[0]
    try:
        try:
            await finish_in_thread(_make_dirs, tmp, entries)
            await _write_files(store, gen_id, tmp, entries, executor, p, progress)
            await finish_in_thread(_make_specials, tmp, entries)
            await finish_in_thread(_apply_metadata, tmp, entries)
            await finish_in_thread(os.sync)
            old = _swap_in(tmp, target, exists)
        except OSError as e:
            raise TargetError(f"restoring into {tmp} failed: {e.strerror}") from None
    except BaseException:
        await asyncio.shield(asyncio.to_thread(_remove_tree, tmp))
        raise
    # Renaming may touch the directory's own times on some file systems.
    os.utime(target, ns=(root["mtime_ns"], root["mtime_ns"]))
    if old is not None:
        await asyncio.to_thread(_remove_tree, old)
    p.stage = "done"
    if progress:
        progress(p)
    chunks = sum(len(e["records"]) // _R for e in entries if e["type"] == "file")
    return RestoreStats(gen_id, p.bytes_written, chunks, time.monotonic() - started)
