"""Prune deletes nothing on the word of a keyring that does not vouch for every manifest
and index object (docs/FORMAT.md 14.3): only `--delete-unauthenticated`, given after
verify showed the objects to be planted, lets it. `key rotate --reencrypt` runs prune
(FORMAT.md 10.2) and never passes that: what it finds unauthenticated stays."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from conftest import PASSPHRASE, make_repo

import dedupe
from dedupe.errors import IntegrityError
from dedupe.hashing import object_id
from security.test_adversary import Run, files_under, random_bytes, restores

KiB = 1024


def test_prune_refuses_while_an_index_object_no_key_map_vouches_for_exists(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """One unauthenticated index object, and nothing else amiss (every manifest is
    authenticated, no key map is of an unknown epoch): prune refuses, naming it, and
    deletes nothing; told that it was planted, it deletes it."""

    async def go() -> None:
        content = random_bytes(100 * KiB, 63)
        async with await make_repo(repo_path) as repo:
            gen = await repo.backup(io.BytesIO(content), name="a", kind="full")
        blob = b"DDPIDX02" + os.urandom(300)
        planted = repo_path / "index" / object_id(blob)
        planted.write_bytes(blob)
        kept = {top: files_under(repo_path, top) for top in ("generations", "index", "packs")}
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            with pytest.raises(IntegrityError, match=f"{planted.name}.*prune deletes nothing"):
                await repo.prune()
            assert {top: files_under(repo_path, top) for top in kept} == kept
            await repo.prune(delete_unauthenticated=True)
            assert not planted.exists()
            assert await restores(repo, gen.id, content)

    run_asyncio(go())


def test_reencryption_refuses_to_delete_a_manifest_no_key_map_vouches_for(
    run_asyncio: Run[None], repo_path: Path
) -> None:
    """A manifest no key map vouches for (planted, or real but judged by a keyring that
    does not know its key map): re-encryption's prune refuses, deleting nothing (no
    manifest, index object or pack), and the generations restore. Deleting it is for
    `prune --delete-unauthenticated`, once verify showed it was planted."""

    async def go() -> None:
        data = {}
        async with await make_repo(repo_path) as repo:
            for i in range(2):
                content = random_bytes(100 * KiB, 61 + i)
                data[(await repo.backup(io.BytesIO(content), name=f"n{i}", kind="full")).id] = (
                    content
                )
        real = next(iter(data))
        planted = repo_path / "generations" / ("ab" * 32)
        planted.write_bytes((repo_path / "generations" / real).read_bytes()[:200])
        kept = {top: files_under(repo_path, top) for top in ("generations", "index", "packs")}
        async with await dedupe.Repository.open(repo_path, PASSPHRASE) as repo:
            with pytest.raises(IntegrityError, match=f"{planted.name}.*prune deletes nothing"):
                await repo.keys.rotate(reencrypt=True)
            assert {top: files_under(repo_path, top) for top in kept} == kept
            for gen_id, content in data.items():
                assert await restores(repo, gen_id, content)

    run_asyncio(go())
