"""What is in a repository, read-only: space per name (`dedupe stats`), the entries of one
generation (`dedupe ls`) and what changed between two (`dedupe diff`).

Everything here reads authenticated manifests and the in-memory index; nothing is written
and no pack is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typing_extensions import Buffer

from dedupe._types import Generation, SpaceStats
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.format.tree import ROOT, Entry, is_below, records_size
from dedupe.store import RepositoryStore
from dedupe.store._chunkindex import ChunkTable
from dedupe.store.tables import each_generation_table

# What `ls` shows of a tree entry, and what `diff` compares (besides content).
SHOWN = ("path", "type", "mode", "size", "mtime_ns", "target")
COMPARED = ("type", "mode", "uid", "gid", "size", "mtime_ns", "target")


class _Tally:
    """The distinct chunks of a group of generations, counted as they first appear: their
    ids in a native chunk table (~48 bytes an id, no Python object per chunk), their raw
    and stored bytes added up."""

    def __init__(self) -> None:
        self.seen = ChunkTable()
        self.unique = self.stored = self.missing = 0

    def add(self, store: RepositoryStore, piece: Buffer) -> None:
        """Count the chunks of a piece of a chunk table that were not counted yet."""
        flags = self.seen.contains_records(piece, CHUNK_RECORD.size)
        at = flags.find(0)
        while at >= 0:
            chunk_id, length = CHUNK_RECORD.unpack_from(piece, at * CHUNK_RECORD.size)
            if self.seen.put(chunk_id, 0, 0, 0, length):  # not a repeat within the piece
                self.unique += length
                where = store.index.get(chunk_id)
                if where is None:
                    self.missing += 1
                else:
                    self.stored += where.stored_length
            at = flags.find(0, at + 1)

    def stats(self, name: str | None, generations: int, logical: int) -> SpaceStats:
        return SpaceStats(
            name=name,
            generations=generations,
            logical_bytes=logical,
            unique_bytes=self.unique,
            stored_bytes=self.stored,
            chunks=len(self.seen),
            missing_chunks=self.missing,
        )


async def space_stats(store: RepositoryStore, gens: Iterable[Generation]) -> list[SpaceStats]:
    """One SpaceStats per name, then the total (name None), over `gens`. A chunk that many
    generations or names share counts once in each group's unique and stored bytes, so
    the per-name figures add up to more than the total when names share data."""
    by_id = {g.id: g for g in gens}
    names = {g.name for g in by_id.values()}
    tallies = {name: _Tally() for name in names}
    # With one name the total is that name's tally: no second table of the same ids.
    total = _Tally() if len(names) > 1 else None
    counts: dict[str, tuple[int, int]] = {}
    # Each manifest read once and each delta applied once, parents first (generation_chunks
    # for each generation would read a chain of n incrementals n(n+1)/2 times).
    async for gen_id, outcome in each_generation_table(store, list(by_id)):
        if isinstance(outcome, Exception):
            raise outcome
        _meta, table = outcome
        g = by_id[gen_id]
        for piece in table:
            tallies[g.name].add(store, piece)
            if total is not None:
                total.add(store, piece)
        n, logical = counts.get(g.name, (0, 0))
        counts[g.name] = (n + 1, logical + g.size)
    result = [tallies[name].stats(name, *counts[name]) for name in sorted(counts)]
    n_all = sum(n for n, _ in counts.values())
    logical_all = sum(size for _, size in counts.values())
    everything = total if total is not None else next(iter(tallies.values()), _Tally())
    result.append(everything.stats(None, n_all, logical_all))
    return result


def tree_listing(entries: list[Entry], path: str | None) -> list[dict[str, Any]]:
    """The entries at or below `path` (all when None), with the fields `ls` shows."""
    top = ROOT if path in (None, "", ".", "/") else str(path).strip("/")
    shown = []
    for e in entries:
        if is_below(e["path"], top):
            row = {k: e[k] for k in SHOWN if k in e}
            if e["type"] == "file":
                row["size"] = records_size(e["records"])
            shown.append(row)
    return shown


def stream_listing(gen: Generation, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """A stream generation as one entry: its label, size, chunk count and digest."""
    row: dict[str, Any] = {
        "path": gen.source.get("label") or "",
        "type": "stream",
        "size": gen.size,
        "chunks": gen.chunks,
        "digest": meta.get("digest"),
    }
    for key in ("mode", "mtime_ns"):
        if key in gen.source:
            row[key] = gen.source[key]
    return [row]


def diff_trees(old: list[Entry], new: list[Entry]) -> dict[str, list[dict[str, Any]]]:
    """Entries added, removed and changed (content, or any of COMPARED) from old to new."""
    before = {e["path"]: e for e in old}
    after = {e["path"]: e for e in new}
    changed = []
    for path in sorted(before.keys() & after.keys()):
        a, b = before[path], after[path]
        what = [k for k in COMPARED if k != "size" and a.get(k) != b.get(k)]
        if a.get("records") != b.get("records"):
            what.append("content")
        if what:
            changed.append({"path": path, "type": b["type"], "changed": what})
    return {
        "added": [_brief(after[p]) for p in sorted(after.keys() - before.keys())],
        "removed": [_brief(before[p]) for p in sorted(before.keys() - after.keys())],
        "changed": changed,
    }


def _brief(e: Entry) -> dict[str, Any]:
    size = records_size(e["records"]) if e["type"] == "file" else e.get("size", 0)
    return {"path": e["path"], "type": e["type"], "size": size}


def diff_streams(old_table: bytes, new_table: bytes) -> dict[str, Any]:
    """Byte ranges of the new stream whose chunks the old one does not have, merged where
    they touch, and how many bytes that is (what the newer stream added)."""
    known = {chunk_id for chunk_id, _ in CHUNK_RECORD.iter_unpack(old_table)}
    ranges: list[list[int]] = []
    offset = new_bytes = 0
    for chunk_id, length in CHUNK_RECORD.iter_unpack(new_table):
        if chunk_id not in known:
            new_bytes += length
            if ranges and ranges[-1][1] == offset:
                ranges[-1][1] = offset + length
            else:
                ranges.append([offset, offset + length])
        offset += length
    return {
        "old_size": records_size(old_table),
        "new_size": offset,
        "new_bytes": new_bytes,
        "changed_ranges": [(a, b) for a, b in ranges],
    }
