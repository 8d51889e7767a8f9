"""The `dedupe` command end to end: real repositories in tmp dirs, the real command in child
processes (`python -m dedupe`), as an operator would run it.

Repositories are made through the API with the weakest KDF (or `init` with tiny KDF limits)
so that each command costs about one interpreter start-up.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, dedupe_cli, default_sigint, make_repo

import dedupe
from dedupe import Repository
from dedupe.errors import (
    AmbiguousGeneration,
    DedupeError,
    EmptySource,
    GenerationNotFound,
    IntegrityError,
    Interrupted,
    MissingObject,
    PassphraseMissing,
    ReaderGone,
    RepositoryExists,
    RepositoryNotFound,
    SourceError,
    TargetError,
    TruncatedObject,
    WrongPassphrase,
)
from dedupe.format.manifest import CHUNK_RECORD
from dedupe.store.repository import pack_name

PROJECT_ROOT = Path(dedupe.__file__).resolve().parents[1]
MiB = 1024 * 1024
USAGE_EXIT = 2  # click's exit code for usage errors

BACKUP_FIELDS = {"id", "bytes_read", "bytes_new", "bytes_stored", "chunks", "chunks_new", "seconds"}
RESTORE_FIELDS = {"id", "bytes_written", "chunks", "seconds"}
GENERATION_FIELDS = {
    "id",
    "name",
    "kind",
    "parent",
    "created",
    "size",
    "chunks",
    "new_chunks",
    "new_bytes",
    "stored_bytes",
    "seconds",
    "source",
    "dedupe_ratio",
}

# The failures of the error matrix: every one must have its own, non-zero exit code.
MATRIX: list[type[DedupeError]] = [
    WrongPassphrase,
    RepositoryNotFound,
    IntegrityError,
    TruncatedObject,
    MissingObject,
    PassphraseMissing,
    GenerationNotFound,
    AmbiguousGeneration,
    SourceError,
    TargetError,
    RepositoryExists,
]


# --- helpers ----------------------------------------------------------------------------------


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def env_for(repo: Path | None, passphrase: str | None = PASSPHRASE, **extra: str) -> dict[str, str]:
    """A hermetic environment for the command: no DEDUPE_* but what is given here, and the
    work tree on the import path whatever the current directory is."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DEDUPE_") or k == "DEDUPE_STATE_DIR"
    }
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    if repo is not None:
        env["DEDUPE_REPO"] = str(repo)
    if passphrase is not None:
        env["DEDUPE_PASSWORD"] = passphrase
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str], input: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Standard input is always a pipe (never the terminal pytest may have been started
    from), so a missing passphrase can never turn into a prompt that hangs the test."""
    return dedupe_cli(*args, env=env, input=input)


def ok(proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]!r}\nstderr: {proc.stderr.decode()}"
    )
    assert b"Traceback" not in proc.stderr
    return proc


def ok_json(proc: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(ok(proc).stdout)


def assert_fails_with(proc: subprocess.CompletedProcess[bytes], error: type[DedupeError]) -> str:
    """The failure is reported as `error`: its exit code, one `dedupe: error:` line (and at
    most a hint line) on stderr, and no traceback or stray warning."""
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == error.exit_code, (
        f"expected {error.__name__} (exit {error.exit_code}), got exit {proc.returncode}:\n{stderr}"
    )
    lines = stderr.splitlines()
    assert lines and lines[0].startswith("dedupe: error: "), stderr
    assert len(lines[0]) > len("dedupe: error: "), stderr
    assert all(line.startswith("  hint: ") for line in lines[1:]), stderr
    assert len(lines) <= 2, stderr
    return lines[0]


async def _init(path: Path, **kw: Any) -> None:
    async with await make_repo(path, **kw):
        pass


async def _backup(path: Path, data: bytes, name: str) -> str:
    async with await Repository.open(path, PASSPHRASE) as repo:
        return (await repo.backup(io.BytesIO(data), name=name)).id


def api_init(path: Path, **kw: Any) -> None:
    asyncio.run(_init(path, **kw))


def api_backup(path: Path, data: bytes, name: str) -> str:
    return asyncio.run(_backup(path, data, name))


@dataclass(frozen=True)
class Blob:
    stream_offset: int  # where the chunk starts in the backed-up stream
    raw_length: int
    pack: Path  # the pack file holding its blob
    offset: int  # of the blob in the pack
    stored_length: int


def blobs_of(repo_path: Path, gen_id: str) -> list[Blob]:
    """Where each chunk of a generation is stored, in stream order (read with the API's
    store, which is how a test finds the bytes to damage)."""

    async def go() -> list[Blob]:
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            store = repo._store
            await store.refresh_index()
            _header, _meta, table = await store.read_manifest(gen_id)
            out = []
            pos = 0
            for chunk_id, length in CHUNK_RECORD.iter_unpack(table):
                loc = store.index.get(chunk_id)
                assert loc is not None
                pack = repo_path / pack_name(store.index.packs[loc.pack_no].pack_id)
                out.append(Blob(pos, length, pack, loc.offset, loc.stored_length))
                pos += length
            return out

    return asyncio.run(go())


def flip_byte(path: Path, offset: int) -> None:
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


# --- fixtures ---------------------------------------------------------------------------------

SOURCE = random_bytes(300 * 1024 + 123, seed=1)  # several 64 KiB packs, incompressible


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One repository with one generation of SOURCE, built once and copied per test."""
    path = tmp_path_factory.mktemp("pristine") / "repo"
    api_init(path)
    return path, api_backup(path, SOURCE, "src")


@pytest.fixture
def populated(pristine: tuple[Path, str], tmp_path: Path) -> Iterator[tuple[Path, str]]:
    repo_path = tmp_path / "repo"
    shutil.copytree(pristine[0], repo_path)
    yield repo_path, pristine[1]


# --- round trip -------------------------------------------------------------------------------


def test_round_trip_through_the_command(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = env_for(repo)
    src = tmp_path / "db.bin"
    data = random_bytes(700 * 1024, seed=2) + bytes(200 * 1024)  # some of it compresses
    src.write_bytes(data)
    piped = random_bytes(150 * 1024, seed=3)

    init = ok_json(
        run_cli(
            "init",
            "--kdf-memlimit",
            "8",
            "--kdf-opslimit",
            "1",
            "--pack-size",
            "1",
            "--json",
            env=env,
        )
    )
    assert {"id", "location", "config"} <= init.keys()
    assert len(init["id"]) == 64
    assert init["config"]["pack_size"] == MiB
    assert "mac" not in init["config"]
    assert (repo / "config").is_file()

    # a file source
    b1 = ok_json(run_cli("backup", str(src), "--name", "db", "--json", env=env))
    assert BACKUP_FIELDS <= b1.keys()
    assert b1["bytes_read"] == len(data)
    # the zero tail repeats itself: its chunks are stored once
    assert len(data) - 200 * 1024 < b1["bytes_new"] < len(data)
    assert 1 < b1["chunks_new"] < b1["chunks"]
    assert 0 < b1["bytes_stored"]
    assert b1["seconds"] >= 0

    # standard input
    b2 = ok_json(run_cli("backup", "-", "--name", "x", "--json", env=env, input=piped))
    assert BACKUP_FIELDS <= b2.keys()
    assert b2["bytes_read"] == len(piped)
    assert b2["chunks_new"] == b2["chunks"]

    # the same file again: everything deduplicates
    b3 = ok_json(run_cli("backup", str(src), "--name", "db", "--json", env=env))
    assert b3["bytes_read"] == len(data)
    assert b3["chunks"] == b1["chunks"]
    assert b3["chunks_new"] == 0
    assert b3["bytes_new"] == 0
    assert b3["bytes_stored"] == 0
    assert b3["id"] != b1["id"]

    gens = ok_json(run_cli("generations", "--json", env=env))
    assert [g["id"] for g in gens] == [b1["id"], b2["id"], b3["id"]]  # oldest first
    for g in gens:
        assert GENERATION_FIELDS <= g.keys()
    assert [g["name"] for g in gens] == ["db", "x", "db"]
    assert [g["size"] for g in gens] == [len(data), len(piped), len(data)]
    assert gens[0]["chunks"] == b1["chunks"] and gens[0]["new_chunks"] == b1["chunks_new"]
    assert gens[2]["new_bytes"] == 0
    only_x = ok_json(run_cli("generations", "--name", "x", "--json", env=env))
    assert [g["id"] for g in only_x] == [b2["id"]]

    out = tmp_path / "out"
    out.mkdir()

    # a full id, to a path
    r = ok_json(run_cli("restore", b1["id"], str(out / "full.bin"), "--json", env=env))
    assert RESTORE_FIELDS <= r.keys()
    assert r["id"] == b1["id"] and r["bytes_written"] == len(data) and r["chunks"] == b1["chunks"]
    assert (out / "full.bin").read_bytes() == data

    # a unique prefix
    ok(run_cli("restore", b2["id"][:12], str(out / "prefix.bin"), env=env))
    assert (out / "prefix.bin").read_bytes() == piped
    ok(run_cli("restore", b2["id"][:12].upper(), str(out / "upper.bin"), env=env))
    assert (out / "upper.bin").read_bytes() == piped

    # latest is refused with two names (it could restore the other source's data);
    # NAME@latest says which
    msg = assert_fails_with(
        run_cli("restore", "latest", str(out / "latest.bin"), env=env), AmbiguousGeneration
    )
    assert "(db, x)" in msg
    assert not (out / "latest.bin").exists()
    r = ok_json(run_cli("restore", "db@latest", str(out / "latest.bin"), "--json", env=env))
    assert r["id"] == b3["id"]
    assert (out / "latest.bin").read_bytes() == data
    r = ok_json(run_cli("restore", "x@latest", str(out / "x.bin"), "--json", env=env))
    assert r["id"] == b2["id"]
    assert (out / "x.bin").read_bytes() == piped

    # standard output: only the stream on stdout; --json goes to stderr then
    proc = ok(run_cli("restore", "x@latest", "-", env=env))
    assert proc.stdout == piped
    proc = ok(run_cli("restore", "db@latest", "-", "--json", env=env))
    assert proc.stdout == data
    r = json.loads(proc.stderr)
    assert RESTORE_FIELDS <= r.keys() and r["id"] == b3["id"] and r["bytes_written"] == len(data)

    # --overwrite replaces an existing target
    (out / "x.bin").write_bytes(b"old")
    ok(run_cli("restore", b1["id"], str(out / "x.bin"), "--overwrite", env=env))
    assert (out / "x.bin").read_bytes() == data

    # the original file is byte-equal to what came back, by the system's cmp as well
    if shutil.which("cmp"):
        assert subprocess.run(["cmp", str(src), str(out / "full.bin")]).returncode == 0

    # nothing but the targets in the output directory: no temporary files left behind
    assert sorted(os.listdir(out)) == sorted(
        ["full.bin", "prefix.bin", "upper.bin", "latest.bin", "x.bin"]
    )


def test_human_output_of_every_command(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = env_for(repo)
    src = tmp_path / "a.bin"
    src.write_bytes(random_bytes(100_000, seed=4))
    proc = ok(run_cli("init", "--kdf-memlimit", "8", "--kdf-opslimit", "1", env=env))
    assert b"created repository" in proc.stdout
    proc = ok(run_cli("generations", env=env))
    assert b"no generations" in proc.stdout
    proc = ok(run_cli("backup", str(src), "--name", "a", env=env))
    assert proc.stdout.startswith(b"full generation ")
    proc = ok(run_cli("generations", env=env))
    assert b"a" in proc.stdout
    proc = ok(run_cli("restore", "latest", str(tmp_path / "b.bin"), env=env))
    assert b"restored generation" in proc.stdout
    assert (tmp_path / "b.bin").read_bytes() == src.read_bytes()


def test_empty_stdin_backs_up_with_allow_empty_and_restores_empty(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    api_init(repo)
    env = env_for(repo)
    assert_fails_with(run_cli("backup", "-", "--name", "empty", env=env, input=b""), EmptySource)
    b = ok_json(
        run_cli("backup", "-", "--name", "empty", "--allow-empty", "--json", env=env, input=b"")
    )
    assert b["bytes_read"] == 0 and b["bytes_new"] == 0
    proc = ok(run_cli("restore", b["id"], "-", env=env))
    assert proc.stdout == b""
    ok(run_cli("restore", "empty@latest", str(tmp_path / "e.bin"), env=env))
    assert (tmp_path / "e.bin").read_bytes() == b""


# --- the error matrix ---------------------------------------------------------------------------


def test_matrix_exit_codes_are_distinct_and_not_usage_errors() -> None:
    codes = [cls.exit_code for cls in MATRIX]
    assert len(set(codes)) == len(codes), {cls.__name__: cls.exit_code for cls in MATRIX}
    assert all(code not in (0, USAGE_EXIT) for code in codes)


def test_wrong_passphrase(populated: tuple[Path, str]) -> None:
    repo, _ = populated
    proc = run_cli("generations", env=env_for(repo, passphrase="not the passphrase"))
    assert_fails_with(proc, WrongPassphrase)


def test_wrong_passphrase_json_error(populated: tuple[Path, str]) -> None:
    repo, _ = populated
    proc = run_cli("generations", "--json", env=env_for(repo, passphrase="nope"))
    assert proc.returncode == WrongPassphrase.exit_code
    assert b"Traceback" not in proc.stderr
    err = json.loads(proc.stderr)
    assert err["error"] == "WrongPassphrase"
    assert err["exit_code"] == WrongPassphrase.exit_code
    assert err["message"]
    assert proc.stdout == b""


def test_missing_repository(tmp_path: Path) -> None:
    env = env_for(tmp_path / "nowhere")
    assert_fails_with(run_cli("generations", env=env), RepositoryNotFound)
    assert_fails_with(
        run_cli("restore", "latest", str(tmp_path / "o"), env=env), RepositoryNotFound
    )
    assert not (tmp_path / "nowhere").exists()  # looking must not create anything


def test_flipped_byte_in_a_blob(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    blob = blobs_of(repo, gen)[3]
    flip_byte(blob.pack, blob.offset + blob.stored_length // 2)
    proc = run_cli("restore", gen, str(tmp_path / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, IntegrityError)
    assert not (tmp_path / "out.bin").exists()


def test_flipped_nonce_byte_in_a_blob(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    blob = blobs_of(repo, gen)[0]
    flip_byte(blob.pack, blob.offset + 1)
    proc = run_cli("restore", gen, "-", env=env_for(repo))
    assert_fails_with(proc, IntegrityError)
    assert proc.stdout == b""  # the damaged chunk is the first: nothing may come out


def test_truncated_pack(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    blob = blobs_of(repo, gen)[-1]
    os.truncate(blob.pack, blob.offset + blob.stored_length // 2)
    proc = run_cli("restore", gen, str(tmp_path / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, TruncatedObject)
    assert not (tmp_path / "out.bin").exists()


def test_missing_pack(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    blobs_of(repo, gen)[1].pack.unlink()
    proc = run_cli("restore", gen, str(tmp_path / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, MissingObject)
    assert not (tmp_path / "out.bin").exists()


def test_no_passphrase_at_all(populated: tuple[Path, str]) -> None:
    repo, _ = populated
    assert_fails_with(run_cli("generations", env=env_for(repo, passphrase=None)), PassphraseMissing)


def test_no_passphrase_for_init(tmp_path: Path) -> None:
    env = env_for(tmp_path / "repo", passphrase=None)
    proc = run_cli("init", "--kdf-memlimit", "8", "--kdf-opslimit", "1", env=env)
    assert_fails_with(proc, PassphraseMissing)
    assert not (tmp_path / "repo" / "config").exists()


@pytest.mark.parametrize("spec", ["deadbeef", "nosuch@latest", "zz", "abc"])
def test_unknown_generation(populated: tuple[Path, str], tmp_path: Path, spec: str) -> None:
    repo, gen = populated
    assert not gen.startswith("deadbeef")
    proc = run_cli("restore", spec, str(tmp_path / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, GenerationNotFound)
    assert not (tmp_path / "out.bin").exists()


def test_latest_of_an_empty_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    api_init(repo)
    proc = run_cli("restore", "latest", "-", env=env_for(repo))
    assert_fails_with(proc, GenerationNotFound)
    assert proc.stdout == b""


@pytest.mark.slow
def test_ambiguous_prefix(tmp_path: Path) -> None:
    """Generations until two ids share their first 4 hex digits (by the birthday bound
    that takes ~320 of 65536 prefixes; capped far above): one empty backup, then copies of
    its manifest committed through the store as a backup commits them (a key map, then
    the manifest), each with another creation time, so each has another id."""
    repo = tmp_path / "repo"

    async def collide() -> str | None:
        async with await make_repo(repo) as r:
            first = await r.backup(io.BytesIO(b""), name="tiny", allow_empty=True)
            store = r._store
            header, meta, table = await store.read_manifest(first.id)
            header = {k: v for k, v in header.items() if k not in ("id", "version", "body")}
            seen = {first.id[:4]: first.id}
            for i in range(4000):
                again = dict(header, created=f"{header['created']}.{i:04d}")
                gen_id = await store.write_manifest(again, meta, table)
                other = seen.setdefault(gen_id[:4], gen_id)
                if other != gen_id:
                    return os.path.commonprefix([gen_id, other])
        return None

    prefix = asyncio.run(collide())
    if prefix is None:
        pytest.skip("no two generation ids shared a 4-digit prefix")
    proc = run_cli("restore", prefix, str(tmp_path / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, AmbiguousGeneration)
    assert not (tmp_path / "out.bin").exists()


def test_source_does_not_exist(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = populated
    before = sorted(os.listdir(repo / "generations"))
    proc = run_cli("backup", str(tmp_path / "no-such-file"), "--name", "x", env=env_for(repo))
    assert_fails_with(proc, SourceError)
    assert sorted(os.listdir(repo / "generations")) == before


def test_source_is_a_socket(populated: tuple[Path, str], tmp_path: Path) -> None:
    # (A directory is a valid source: tests/integration/test_tree_cli.py.)
    repo, _ = populated
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(path))
        proc = run_cli("backup", str(path), "--name", "x", env=env_for(repo))
    finally:
        server.close()
    assert_fails_with(proc, SourceError)


def test_restore_target_exists(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    target = tmp_path / "out.bin"
    target.write_bytes(b"keep me")
    proc = run_cli("restore", gen, str(target), env=env_for(repo))
    assert_fails_with(proc, TargetError)
    assert target.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["out.bin", "repo"]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--tablespace-map", "a=@b", "@out"), "--tablespace-map goes with --into-datadir"),
        (("--into-datadir", "@d", "--tablespace-map", "nope"), "give OLD=NEW"),
        (("--into-datadir", "@d", "--tablespace-map", "=@b"), "give OLD=NEW"),
        (("--into-datadir", "@d", "--tablespace-map", "a=@b", "--tablespace-map", "a=@c"), "once"),
    ],
)
def test_restore_tablespace_map_is_checked_before_anything(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    """A malformed --tablespace-map is a usage error before the repository is opened
    (there is none here) and before anything is made. ("@" stands for tmp_path.)"""
    args = tuple(a.replace("@", f"{tmp_path}/") for a in args)
    proc = run_cli("restore", "cluster@latest", *args, env=env_for(tmp_path / "none"))
    assert proc.returncode == 2 and said in proc.stderr.decode(), proc.stderr.decode()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_restore_target_in_a_missing_directory(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    proc = run_cli("restore", gen, str(tmp_path / "no" / "such" / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, TargetError)


def test_restore_into_a_file_that_cannot_grow(populated: tuple[Path, str], tmp_path: Path) -> None:
    """The target's file system fills up (here: a file size limit, RLIMIT_FSIZE, which fails
    writes past it with EFBIG as a full disk fails them with ENOSPC): a clear TargetError,
    and neither the target nor the temporary file is left behind."""
    import resource

    repo, gen = populated
    target = tmp_path / "out.bin"
    limit = (len(SOURCE) // 2) & ~0xFFFF  # half the stream, on a 64 KiB boundary

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-m", "dedupe", "restore", gen, str(target)],
        env=env_for(repo),
        input=b"",
        capture_output=True,
        timeout=600,
        preexec_fn=limit_file_size,
    )
    message = assert_fails_with(proc, TargetError)
    assert "too large" in message.lower(), message  # EFBIG's own words reach the user
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_init_on_an_existing_repository(populated: tuple[Path, str]) -> None:
    repo, gen = populated
    config = (repo / "config").read_bytes()
    proc = run_cli("init", "--kdf-memlimit", "8", "--kdf-opslimit", "1", env=env_for(repo))
    assert_fails_with(proc, RepositoryExists)
    assert (repo / "config").read_bytes() == config
    assert os.listdir(repo / "generations") == [gen]


@pytest.mark.parametrize(
    "args",
    [("generations",), ("backup", "-", "--name", "x"), ("restore", "latest", "-"), ("init",)],
)
def test_no_repository_given_is_a_usage_error(args: tuple[str, ...]) -> None:
    proc = run_cli(*args, env=env_for(None))
    assert proc.returncode == USAGE_EXIT, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    assert b"no repository given" in proc.stderr


# --- a damaged chunk is never written out ------------------------------------------------------


@pytest.fixture(scope="module")
def big_damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, bytes, Blob]:
    """A generation larger than one restore window (16 MiB) whose last chunk is damaged, so a
    restore hands out verified bytes before it meets the damage."""
    path = tmp_path_factory.mktemp("damaged") / "repo"
    data = random_bytes(20 * MiB + 4321, seed=5)
    api_init(path, pack_size=MiB)
    gen = api_backup(path, data, "big")
    victim = blobs_of(path, gen)[-1]
    assert victim.stream_offset > 16 * MiB
    flip_byte(victim.pack, victim.offset + victim.stored_length // 2)
    return path, gen, data, victim


def test_damaged_chunk_restore_to_path_leaves_nothing(
    big_damaged: tuple[Path, str, bytes, Blob], tmp_path: Path
) -> None:
    repo, gen, _data, _victim = big_damaged
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = run_cli("restore", gen, str(out_dir / "out.bin"), env=env_for(repo))
    assert_fails_with(proc, IntegrityError)
    assert os.listdir(out_dir) == []  # neither the target nor a temporary file


def test_damaged_chunk_restore_over_existing_target_keeps_it(
    big_damaged: tuple[Path, str, bytes, Blob], tmp_path: Path
) -> None:
    repo, gen, _data, _victim = big_damaged
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "out.bin").write_bytes(b"previous good copy")
    proc = run_cli("restore", gen, str(out_dir / "out.bin"), "--overwrite", env=env_for(repo))
    assert_fails_with(proc, IntegrityError)
    assert os.listdir(out_dir) == ["out.bin"]
    assert (out_dir / "out.bin").read_bytes() == b"previous good copy"


def test_damaged_chunk_restore_to_stdout_writes_a_strict_prefix(
    big_damaged: tuple[Path, str, bytes, Blob],
) -> None:
    repo, gen, data, victim = big_damaged
    proc = run_cli("restore", gen, "-", env=env_for(repo))
    assert_fails_with(proc, IntegrityError)
    out = proc.stdout
    assert len(out) < len(data)
    assert out == data[: len(out)]
    # not a byte of the damaged chunk (nor of anything after it) came out
    assert len(out) <= victim.stream_offset


# --- passphrase sources -------------------------------------------------------------------------


def test_passphrase_from_file(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_FILE=str(pw))
    gens = ok_json(run_cli("generations", "--json", env=env))
    assert [g["id"] for g in gens] == [gen]
    proc = ok(run_cli("restore", gen, "-", env=env))
    assert proc.stdout == SOURCE


def test_passphrase_file_with_wrong_passphrase(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = populated
    pw = tmp_path / "pw"
    pw.write_text("wrong\n")
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_FILE=str(pw))
    assert_fails_with(run_cli("generations", env=env), WrongPassphrase)


def test_passphrase_file_missing(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = populated
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_FILE=str(tmp_path / "absent"))
    assert_fails_with(run_cli("generations", env=env), PassphraseMissing)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o700)
    return shlex.quote(str(path))


@pytest.mark.skipif(os.name != "posix", reason="uses a shell script")
def test_passphrase_from_command(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    cmd = _script(tmp_path / "pw.sh", f"echo {shlex.quote(PASSPHRASE)}")
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_COMMAND=cmd)
    gens = ok_json(run_cli("generations", "--json", env=env))
    assert [g["id"] for g in gens] == [gen]


@pytest.mark.skipif(os.name != "posix", reason="uses a shell script")
@pytest.mark.skipif(shutil.which("cat") is None, reason="needs cat")
def test_passphrase_command_with_arguments(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, gen = populated
    pw = tmp_path / "secret.txt"
    pw.write_text(PASSPHRASE + "\n")
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_COMMAND=f"cat {shlex.quote(str(pw))}")
    ok(run_cli("restore", gen, str(tmp_path / "out.bin"), env=env))
    assert (tmp_path / "out.bin").read_bytes() == SOURCE


def test_passphrase_sources_are_one_at_a_time(populated: tuple[Path, str], tmp_path: Path) -> None:
    """Each source works alone; two or more set at once are refused (which one did the
    operator mean?) rather than silently ranked."""
    repo, _ = populated
    good = tmp_path / "good"
    good.write_text(PASSPHRASE)
    ok(run_cli("generations", env=env_for(repo, passphrase=None, DEDUPE_PASSWORD_FILE=str(good))))
    command = f"cat {good}"
    ok(run_cli("generations", env=env_for(repo, passphrase=None, DEDUPE_PASSWORD_COMMAND=command)))
    for extra in (
        {"DEDUPE_PASSWORD_FILE": str(good)},
        {"DEDUPE_PASSWORD_COMMAND": command},
        {"DEDUPE_PASSWORD_FILE": str(good), "DEDUPE_PASSWORD_COMMAND": command},
    ):
        msg = assert_fails_with(
            run_cli("generations", env=env_for(repo, **extra)), PassphraseMissing
        )
        assert "set together" in msg


@pytest.mark.skipif(os.name != "posix", reason="uses a shell script")
def test_failing_passphrase_command(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = populated
    cmd = _script(tmp_path / "fail.sh", "echo oops >&2; exit 3")
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_COMMAND=cmd)
    assert_fails_with(run_cli("generations", env=env), PassphraseMissing)


def test_passphrase_command_not_found(populated: tuple[Path, str], tmp_path: Path) -> None:
    repo, _ = populated
    env = env_for(repo, passphrase=None, DEDUPE_PASSWORD_COMMAND=str(tmp_path / "no-such-command"))
    assert_fails_with(run_cli("generations", env=env), PassphraseMissing)


# --- the reader goes away; the operator presses Ctrl-C -------------------------------------------


def _popen(*args: str, env: dict[str, str], stdin: Any = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dedupe", *args],
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,  # some tests stop it with SIGINT
    )


def test_restore_to_a_closed_pipe(tmp_path: Path) -> None:
    """`dedupe restore GEN - | head -c 10`: the reader leaves early; the command ends
    quietly, with the status of a writer killed by SIGPIPE, and releases its lock."""
    repo = tmp_path / "repo"
    api_init(repo)
    data = random_bytes(18 * MiB, seed=6)
    gen = api_backup(repo, data, "big")
    proc = _popen("restore", gen, "-", env=env_for(repo))
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=120)
    assert head == data[:10]
    assert proc.returncode == ReaderGone.exit_code
    assert stderr == b""
    assert os.listdir(repo / "locks") == []


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT")
def test_interrupted_backup(populated: tuple[Path, str], tmp_path: Path) -> None:
    """Ctrl-C during `backup -`: exit code of Interrupted, one message, no traceback, no new
    generation, and the repository keeps working."""
    repo, gen = populated
    env = env_for(repo)
    packs_before = _count_files(repo / "packs")
    proc = _popen("backup", "-", "--name", "int", env=env, stdin=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    # more than one 4 MiB read block, and the stream is never ended: the backup can only
    # stop because it is interrupted
    try:
        proc.stdin.write(random_bytes(9 * MiB, seed=7))
        proc.stdin.flush()
    except BrokenPipeError:
        proc.wait(timeout=120)
        pytest.fail(f"the backup ended early: {proc.stderr.read().decode()}")
    deadline = 300
    waited = 0.0
    while _count_files(repo / "packs") <= packs_before:  # it is busy storing packs
        assert proc.poll() is None, proc.stderr.read().decode()
        assert waited < deadline, "the backup never wrote a pack"
        time.sleep(0.02)
        waited += 0.02
    proc.send_signal(signal.SIGINT)
    proc.stdin.close()  # as the producer of a pipe would, killed by the same Ctrl-C
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == Interrupted.exit_code, stderr
    kept, said = stderr.splitlines()
    assert "no generation was committed" in kept and "reuses them" in kept, stderr
    assert said.startswith("dedupe: interrupted"), stderr
    assert os.listdir(repo / "generations") == [gen]
    assert ok(run_cli("restore", gen, "-", env=env)).stdout == SOURCE
    b = ok_json(run_cli("backup", "-", "--name", "int", "--json", env=env, input=b"after"))
    assert ok(run_cli("restore", b["id"], "-", env=env)).stdout == b"after"
