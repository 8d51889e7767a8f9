"""The embedding API: what other backup tools call, and what the CLI is built on.

    import asyncio, dedupe

    async def main():
        repo = await dedupe.Repository.init("/backups/repo", passphrase="correct horse")
        async with repo:
            stats = await repo.backup("/var/lib/app/db.sqlite", name="app-db")
            await repo.restore(stats.id, "/tmp/db.sqlite")

    asyncio.run(main())

Everything is async and cancellable; progress arrives through a callback; statistics are
returned as objects; failures are `DedupeError` subclasses (dedupe.errors).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterable, AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

from dedupe._types import BackupStats, Generation, Progress, ProgressCallback, RestoreStats
from dedupe.backends import Backend, open_backend
from dedupe.chunking import ChunkerParams
from dedupe.crypto import KdfParams, get_passphrase
from dedupe.engine import iter_source, restore_chunks, run_backup, write_to_fileobj, write_to_path
from dedupe.errors import AmbiguousGeneration, GenerationNotFound
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE
from dedupe.store import RepositoryStore

__all__ = ["BackupStats", "Generation", "Progress", "Repository", "RestoreStats"]

Location = str | os.PathLike[str] | Backend
Source = str | os.PathLike[str] | BinaryIO | AsyncIterable[bytes]
Target = str | os.PathLike[str] | BinaryIO
KINDS = ("full", "incremental", "differential")


def _backend(location: Location) -> Backend:
    return location if isinstance(location, Backend) else open_backend(os.fspath(location))


def _passphrase(passphrase: str | bytes | None, confirm: bool) -> bytes:
    if passphrase is None:
        return get_passphrase(confirm=confirm)
    return passphrase.encode() if isinstance(passphrase, str) else passphrase


class Repository:
    """An open repository. Create with `await Repository.init(...)` or open with
    `await Repository.open(...)`; close with `await repo.close()` or `async with repo`.

    Worker threads: CPU stages run on a private pool of `workers` threads (default: one per
    core). The event loop is whatever the caller runs; nothing here installs uvloop.
    """

    def __init__(self, store: RepositoryStore, workers: int | None = None) -> None:
        self._store = store
        self._executor = ThreadPoolExecutor(
            max_workers=workers or os.cpu_count() or 2, thread_name_prefix="dedupe"
        )

    # --- lifecycle -----------------------------------------------------------------------------

    @classmethod
    async def init(
        cls,
        location: Location,
        passphrase: str | bytes | None = None,
        *,
        chunker: ChunkerParams | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        kdf: KdfParams | None = None,
        workers: int | None = None,
    ) -> Repository:
        """Create a repository at `location` and return it open. The passphrase comes from
        the argument, else DEDUPE_PASSWORD / _FILE / _COMMAND, else a terminal prompt."""
        store = await RepositoryStore.create(
            _backend(location),
            _passphrase(passphrase, confirm=True),
            chunker=chunker,
            pack_size=pack_size,
            compression_level=compression_level,
            kdf=kdf,
        )
        return cls(store, workers)

    @classmethod
    async def open(
        cls,
        location: Location,
        passphrase: str | bytes | None = None,
        *,
        workers: int | None = None,
    ) -> Repository:
        store = await RepositoryStore.open(_backend(location), _passphrase(passphrase, False))
        return cls(store, workers)

    async def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        await self._store.backend.close()

    async def __aenter__(self) -> Repository:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- facts ---------------------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._store.repository_id.hex()

    @property
    def location(self) -> str:
        return self._store.backend.location

    @property
    def chunker(self) -> ChunkerParams:
        return self._store.chunker_params

    @property
    def config(self) -> dict[str, object]:
        """The repository config record (docs/FORMAT.md section 5), without its MAC."""
        return {k: v for k, v in self._store.config.items() if k != "mac"}

    # --- backup --------------------------------------------------------------------------------

    async def backup(
        self,
        source: Source,
        *,
        name: str,
        kind: str = "incremental",
        progress: ProgressCallback | None = None,
        label: str | None = None,
    ) -> BackupStats:
        """Back up a path, a binary file object or an async iterable of bytes as a new
        generation of `name`. Returns once the manifest is stored (the commit point).
        Cancelling the task leaves the repository valid and adds no generation.

        `kind`: "full" (no parent), "incremental" (parent: the latest generation of `name`,
        any kind) or "differential" (parent: the latest full of `name`). With no full of
        `name` yet, an incremental or differential is made as a full and `note` says so.
        A stream is always read whole; the manifest of an incremental or differential
        stores only its delta against the parent."""
        if not name or "/" in name or "@" in name:
            raise ValueError("name must be non-empty and contain neither '/' nor '@'")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        parent, note = await self._parent_for(name, kind)
        parent_chunks = None
        if parent is not None:
            _meta, table = await self._store.generation_chunks(parent.id)
            parent_chunks = (parent.id, table)
        size_hint = None
        if isinstance(source, str | os.PathLike):
            label = label or os.fspath(source)
            try:
                size_hint = os.stat(source).st_size
            except OSError:
                pass
        info = {"type": "stream", "label": label or ""}
        stats = await run_backup(
            self._store,
            iter_source(source),
            name=name,
            source_info=info,
            executor=self._executor,
            progress=progress,
            size_hint=size_hint,
            kind=kind if parent is not None else "full",
            parent=parent_chunks,
        )
        return dataclasses.replace(stats, note=note) if note else stats

    async def _parent_for(self, name: str, kind: str) -> tuple[Generation | None, str | None]:
        if kind == "full":
            return None, None
        gens = await self.generations(name)
        if kind == "differential":
            gens = [g for g in gens if g.kind == "full"]
        if not any(g.kind == "full" for g in gens):
            return None, f"no full generation of {name!r} yet: this {kind} was made as a full"
        return gens[-1], None

    # --- generations ---------------------------------------------------------------------------

    async def generations(self, name: str | None = None) -> list[Generation]:
        """Every generation (of `name`, if given), oldest first."""
        gens = [
            Generation.from_header(await self._store.read_manifest_header(gen_id))
            for gen_id in await self._store.generation_ids()
        ]
        if name is not None:
            gens = [g for g in gens if g.name == name]
        return sorted(gens, key=lambda g: (g.created, g.id))

    async def resolve(self, spec: str | Generation) -> Generation:
        """A generation from an id, a unique id prefix, "latest" or "NAME@latest"."""
        if isinstance(spec, Generation):
            return spec
        if spec == "latest" or spec.endswith("@latest"):
            name = None if spec == "latest" else spec[: -len("@latest")]
            gens = await self.generations(name)
            if not gens:
                where = f"named {name!r} " if name else ""
                raise GenerationNotFound(f"there is no generation {where}in this repository")
            return gens[-1]
        spec = spec.lower()
        if len(spec) < 4 or any(c not in "0123456789abcdef" for c in spec):
            raise GenerationNotFound(
                f"{spec!r} is not a generation id",
                hint="give an id or a unique prefix of at least 4 hex digits, 'latest' "
                "or 'NAME@latest'",
            )
        matches = [g for g in await self._store.generation_ids() if g.startswith(spec)]
        if not matches:
            raise GenerationNotFound(
                f"no generation id starts with {spec}", hint="list them with 'dedupe generations'"
            )
        if len(matches) > 1:
            raise AmbiguousGeneration(
                f"{len(matches)} generations start with {spec}", hint="give more digits"
            )
        return Generation.from_header(await self._store.read_manifest_header(matches[0]))

    # --- restore -------------------------------------------------------------------------------

    async def restore_stream(self, generation: str | Generation) -> AsyncIterator[bytes]:
        """The generation's bytes in order, verified chunk by chunk and as a whole; the
        iterator raises IntegrityError instead of yielding bad bytes."""
        async for parts in await self._chunks(generation):
            yield b"".join(parts)

    async def restore(
        self,
        generation: str | Generation,
        target: Target,
        *,
        overwrite: bool = False,
        progress: ProgressCallback | None = None,
    ) -> RestoreStats:
        """Restore to a path (written to a temporary name, renamed once verified) or to a
        binary file object."""
        started = time.monotonic()
        gen = await self.resolve(generation)
        stream = await self._chunks(gen)
        if progress is not None:
            stream = _report(stream, progress, gen.size)
        if isinstance(target, str | os.PathLike):
            written = await write_to_path(stream, os.fspath(target), overwrite)
        else:
            written = await write_to_fileobj(stream, target)
        return RestoreStats(gen.id, written, gen.chunks, time.monotonic() - started)

    # --- verify (engine/verify.py) -------------------------------------------------------------

    # --- forget and prune (engine/forget.py, engine/prune.py) ----------------------------------

    async def _chunks(self, generation: str | Generation) -> AsyncIterator[list[bytes]]:
        gen = await self.resolve(generation)
        await self._store.refresh_index()
        meta, table = await self._store.generation_chunks(gen.id)
        return restore_chunks(self._store, gen.id, table, meta["digest"], self._executor)


async def _report(
    stream: AsyncIterator[list[bytes]], progress: ProgressCallback, total: int
) -> AsyncIterator[list[bytes]]:
    p = Progress("restore", "restoring", bytes_total=total)
    async for parts in stream:
        p.bytes_written += sum(len(x) for x in parts)
        p.chunks += len(parts)
        progress(p)
        yield parts
    p.stage = "done"
    progress(p)
