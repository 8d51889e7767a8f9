"""Defaults that never commit a bad backup silently (issue 13, "Data safety").

The real command in child processes where an operator's shell is part of the story (a
failing dump in a pipe); the API where the source itself is the subject.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pty
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PASSPHRASE, dedupe_cli, make_repo

from dedupe import Repository
from dedupe.cli import cli
from dedupe.crypto import KdfParams
from dedupe.errors import (
    DedupeError,
    EmptySource,
    LocationNotEmpty,
    PassphraseMissing,
    RepositoryNotFound,
    SourceError,
    TargetError,
    UnsupportedLocation,
)

EMPTY_EXIT = EmptySource.exit_code


def _names(repo_path: Path, env: dict[str, str]) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-m", "dedupe", "generations", "--json"],
        env=env,
        capture_output=True,
        check=True,
    ).stdout
    return [g["name"] for g in json.loads(out)]


def _pipeline(
    command: str, env: dict[str, str], pipefail: bool
) -> subprocess.CompletedProcess[bytes]:
    """`command | dedupe backup - --name pg` in bash, as a cron job would run it."""
    script = ("set -o pipefail; " if pipefail else "") + (
        f"{command} | {sys.executable} -m dedupe backup - --name pg"
    )
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, timeout=120)


def test_a_failed_dump_in_a_pipe_commits_nothing(run, repo_path: Path, cli_env) -> None:  # type: ignore[no-untyped-def]
    """A dump command that fails before writing a byte: dedupe sees an empty stream and
    refuses it (exit 53 without pipefail, the dump's own status with it), and the good
    full stays the newest generation of its name."""

    async def setup() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(200_000)), name="pg", kind="full")

    run(setup())
    failing = "sh -c 'echo pg_dump: error: database \"nosuchdb\" does not exist >&2; exit 1'"
    plain = _pipeline(failing, cli_env, pipefail=False)
    assert plain.returncode == EMPTY_EXIT, plain.stderr
    err = plain.stderr.decode()
    assert "gave no bytes" in err and "nothing was committed" in err and "pipefail" in err
    assert "Traceback" not in err
    strict = _pipeline(failing, cli_env, pipefail=True)
    assert strict.returncode != 0
    assert _names(repo_path, cli_env) == ["pg"]  # only the good full


def test_an_empty_stream_is_stored_only_when_asked(run, repo_path: Path, cli_env) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises(EmptySource, match="nothing was committed"):
                await repo.backup(io.BytesIO(b""), name="s", kind="full")

            async def nothing():  # type: ignore[no-untyped-def]
                return
                yield b""

            with pytest.raises(EmptySource):
                await repo.backup(nothing(), name="s")
            assert await repo.generations() == []
            stats = await repo.backup(io.BytesIO(b""), name="s", allow_empty=True)
            assert stats.bytes_read == 0
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            assert out.getvalue() == b""

    run(go())
    done = subprocess.run(
        [sys.executable, "-m", "dedupe", "backup", "-", "--name", "e", "--allow-empty"],
        env=cli_env,
        input=b"",
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr
    assert sorted(_names(repo_path, cli_env)) == ["e", "s"]


def test_an_empty_file_and_an_empty_directory_are_refused(
    run, repo_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    empty_file = tmp_path / "empty.db"
    empty_file.write_bytes(b"")
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            with pytest.raises(EmptySource, match="empty.db gave no bytes"):
                await repo.backup(empty_file, name="f")
            with pytest.raises(EmptySource, match="empty directory") as caught:
                await repo.backup(mount_point, name="d")
            assert "mount point" in (caught.value.hint or "")
            assert await repo.generations() == []
            assert (await repo.backup(mount_point, name="d", allow_empty=True)).bytes_read == 0

    run(go())


def test_a_file_is_read_to_its_end_whatever_its_size_says(
    run, repo_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """/proc files report a size of 0 but hold bytes: all of them are stored."""
    status = Path("/proc/self/status")
    assert status.stat().st_size == 0

    async def go() -> tuple[int, bytes]:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(status, name="proc", kind="full")
            out = io.BytesIO()
            await repo.restore(stats.id, out)
            return stats.bytes_read, out.getvalue()

    read, restored = run(go())
    assert read == len(restored) > 100
    assert restored.startswith(b"Name:")


# --- weak set-ups are refused -------------------------------------------------------------


def _dedupe(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return dedupe_cli(*args, env=env, cwd=cwd, input=b"")  # stdin never a terminal


def _refused(proc: subprocess.CompletedProcess[bytes], error: type[DedupeError]) -> str:
    err = proc.stderr.decode()
    assert "Traceback" not in err, err
    assert proc.returncode == error.exit_code, (proc.returncode, err)
    assert err.startswith("dedupe: error: "), err
    return err


INIT = ("init", "--kdf-memlimit", "8", "--kdf-opslimit", "1")


def test_an_empty_passphrase_is_refused(tmp_path: Path, cli_env: dict[str, str], run) -> None:  # type: ignore[no-untyped-def]
    repo = tmp_path / "new"
    env = dict(cli_env, DEDUPE_REPO=str(repo), DEDUPE_PASSWORD="")
    assert "DEDUPE_PASSWORD is empty" in _refused(_dedupe(*INIT, env=env), PassphraseMissing)
    assert not repo.exists()
    empty = tmp_path / "pass"
    empty.write_text("\n")
    env = {k: v for k, v in env.items() if k != "DEDUPE_PASSWORD"}
    env["DEDUPE_PASSWORD_FILE"] = str(empty)
    assert "DEDUPE_PASSWORD_FILE is empty" in _refused(_dedupe(*INIT, env=env), PassphraseMissing)
    assert not repo.exists()

    async def api_init() -> None:
        with pytest.raises(PassphraseMissing, match="empty passphrase"):
            await Repository.init(repo, "", kdf=KdfParams.weakest())

    run(api_init())
    assert not repo.exists() or not any(repo.iterdir())


def test_init_needs_a_location_of_its_own(tmp_path: Path, cli_env: dict[str, str]) -> None:
    full = tmp_path / "home"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    env = dict(cli_env, DEDUPE_REPO=str(full))
    assert "not empty" in _refused(_dedupe(*INIT, env=env), LocationNotEmpty)
    assert [p.name for p in full.iterdir()] == ["notes.txt"]  # nothing mixed in
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env = dict(cli_env, DEDUPE_REPO=str(a_file))
    assert "is a file" in _refused(_dedupe(*INIT, env=env), LocationNotEmpty)
    assert a_file.read_text() == "x"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    env = dict(cli_env, DEDUPE_REPO=str(empty_dir))
    assert _dedupe(*INIT, env=env).returncode == 0
    assert (empty_dir / "config").exists()


@pytest.mark.parametrize(
    "location",
    ["s3:https://host/bucket", "s3:///prefix", "gs://bucket/prefix", "sftp:user@host:/srv/repo"],
)
def test_a_location_scheme_not_supported_is_named(
    tmp_path: Path, cli_env: dict[str, str], location: str
) -> None:
    env = dict(cli_env, DEDUPE_REPO=location)
    for command in (INIT, ("generations",)):
        err = _refused(_dedupe(*command, env=env, cwd=tmp_path), UnsupportedLocation)
        assert "not supported" in err and "local directory" in err
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:https:"


def test_a_wrong_location_is_reported_before_any_passphrase(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Without a passphrase source and without a terminal: the missing repository is the
    error (exit 10), not the missing passphrase."""
    env = {k: v for k, v in cli_env.items() if k != "DEDUPE_PASSWORD"}
    env["DEDUPE_REPO"] = str(tmp_path / "typo")
    _refused(_dedupe("generations", env=env), RepositoryNotFound)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env["DEDUPE_REPO"] = str(a_file)
    _refused(_dedupe("generations", env=env), RepositoryNotFound)


def test_passphrase_sources_are_never_guessed_between(
    run, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    async def setup() -> None:
        async with await make_repo(repo_path):
            pass

    run(setup())
    both = dict(cli_env, DEDUPE_PASSWORD_FILE=str(tmp_path / "pass"))
    err = _refused(_dedupe("generations", env=both), PassphraseMissing)
    assert "DEDUPE_PASSWORD and DEDUPE_PASSWORD_FILE are set together" in err
    failing = {k: v for k, v in cli_env.items() if k != "DEDUPE_PASSWORD"}
    failing["DEDUPE_PASSWORD_COMMAND"] = "sh -c 'echo vault: permission denied >&2; exit 7'"
    err = _refused(_dedupe("generations", env=failing), PassphraseMissing)
    assert "exit status 7" in err and "vault: permission denied" in err
    assert "CalledProcessError" not in err


# --- a name keeps its chunker -------------------------------------------------------------


def test_a_name_keeps_the_chunker_of_its_latest_generation(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(2_000_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(io.BytesIO(data), name="db")
            assert first.note is None  # the first generation of a name: nothing to say
            assert first.chunker["algorithm"] == "fastcdc-2020"
            changed = await repo.backup(io.BytesIO(data), name="db", chunker="fixed:4096")
            assert changed.chunker == {"algorithm": "fixed", "block_size": 4096}
            assert changed.chunks_new > 0
            assert changed.note is not None
            assert "changed from fastcdc" in changed.note and "to fixed:4096" in changed.note
            assert f"stored {changed.chunks_new} of its {changed.chunks} chunks" in changed.note
            kept = await repo.backup(io.BytesIO(data), name="db")  # no chunker named
            assert kept.chunker == changed.chunker
            assert kept.bytes_new == 0 and kept.note is None
            other = await repo.backup(io.BytesIO(data), name="other")  # a new name: fastcdc
            assert other.chunker == first.chunker and other.bytes_new == 0
            listed = {g.id: g.chunker for g in await repo.generations()}
            assert listed[kept.id] == kept.chunker and listed[first.id] == first.chunker

    run(go())


def test_bad_names_and_chunkers_are_usage_errors(tmp_path: Path, cli_env: dict[str, str]) -> None:
    source = tmp_path / "s"
    source.write_bytes(b"x" * 100)
    for args in (
        ("--name", "a/b@c"),
        ("--name", ""),
        ("--name", "x", "--chunker", "foo"),
        ("--name", "x", "--chunker", "fixed:3"),
    ):
        proc = _dedupe("backup", str(source), *args, env=cli_env)
        err = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "Invalid value for" in err


# --- restores that do what users expect ---------------------------------------------------


def test_a_file_restores_with_its_mode_and_mtime_and_into_a_directory(
    run, repo_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "orders.db"
    source.write_bytes(os.urandom(300_000))
    source.chmod(0o640)
    mtime_ns = 1_700_000_000_123_456_789
    os.utime(source, ns=(mtime_ns, mtime_ns))
    into = tmp_path / "restored"
    into.mkdir()

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(source, name="db")
            piped = await repo.backup(io.BytesIO(b"piped"), name="p", label="<stdin>")
            await repo.restore(stats.id, tmp_path / "copy.db")
            await repo.restore(stats.id, into)  # a directory: DIR/<the name it had>
            with pytest.raises(TargetError, match="no file name") as caught:
                await repo.restore(piped.id, into)
            assert "DIR/NAME" in (caught.value.hint or "")
            with pytest.raises(TargetError) as caught:
                await repo.restore(stats.id, tmp_path / "no-such-dir" / "x.db")
            assert "no-such-dir/x.db" in caught.value.message
            assert ".dedupe-" not in caught.value.message  # never the temporary file

    run(go())
    for copy in (tmp_path / "copy.db", into / "orders.db"):
        st = copy.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640
        assert st.st_mtime_ns == mtime_ns
        assert copy.read_bytes() == source.read_bytes()


def test_restore_to_a_terminal_is_refused(run, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(100_000)

    async def go() -> str:
        async with await make_repo(repo_path) as repo:
            return (await repo.backup(io.BytesIO(data), name="db")).id

    gen = run(go())
    main, terminal = pty.openpty()
    try:
        refused = subprocess.run(
            [sys.executable, "-m", "dedupe", "restore", gen, "-"],
            env=cli_env,
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(terminal)
        os.close(main)
    err = _refused(refused, TargetError)
    assert "terminal" in err and "--force" in err


def test_forgets_hint_names_the_flag(run, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    async def go() -> str:
        async with await make_repo(repo_path) as repo:
            full = await repo.backup(io.BytesIO(os.urandom(50_000)), name="db", kind="full")
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")
            return full.id

    full = run(go())
    proc = _dedupe("forget", full[:12], env=cli_env)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "--with-dependents" in err and "with_dependents" not in err
    assert "depends on it" in err


def test_help_summaries_are_whole_sentences(cli_env: dict[str, str]) -> None:
    for group in ((), ("key",)):
        out = _dedupe(*group, "--help", env=cli_env).stdout.decode()
        listing = out.split("Commands:", 1)[1].strip().splitlines()
        assert listing and all(not line.rstrip().endswith("...") for line in listing), out
        assert all(line.rstrip().endswith(".") for line in listing), out


def test_counts_read_as_english(
    run, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    async def make() -> None:
        async with await make_repo(repo_path, pack_size=16 * 1024 * 1024):
            pass

    run(make())
    one = tmp_path / "one"
    one.write_bytes(os.urandom(3000))  # one chunk, one pack
    out = _dedupe("backup", str(one), "--name", "db", env=cli_env).stdout.decode()
    assert "in 1 chunk, 1 new" in out and "in 1 pack," in out, out
    listing = _dedupe("generations", env=cli_env).stdout.decode()
    assert "created (UTC)" in listing


# --- trees: --exclude, unreadable entries -------------------------------------------------


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Run the body with the permissions of an ordinary user: root (who runs CI) reads any
    file, so it becomes nobody for the body (effective ids only, restored after); anyone
    else already is one."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unreadable_entries_make_a_partial_backup(
    run_asyncio, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    base = Path(tempfile.mkdtemp(prefix="dedupe-partial-", dir="/tmp"))
    base.chmod(0o777)  # nobody works in here
    state = base / "state"
    state.mkdir(mode=0o777)
    monkeypatch.setenv("DEDUPE_STATE_DIR", str(state))
    src, repo_path = base / "src", base / "repo"
    # nobody cannot read this interpreter's standard library (under root's home here), and
    # commands import their modules when they run: import them while we still can.
    for module in ("dedupe.cli", "dedupe.engine.tree", "dedupe.engine.outfile", "ctypes"):
        importlib.import_module(module)
    try:
        with _unprivileged():
            (src / "locked").mkdir(parents=True)
            (src / "ok.txt").write_bytes(b"readable")
            (src / "secret.txt").write_bytes(b"not for nobody")
            (src / "locked" / "inside").write_bytes(b"hidden")
            (src / "secret.txt").chmod(0)
            (src / "locked").chmod(0)

            async def go() -> None:
                async with await make_repo(repo_path) as repo:
                    with pytest.raises(SourceError, match="locked|secret"):
                        await repo.backup(src, name="t", strict=True)
                    assert await repo.generations() == []
                    stats = await repo.backup(src, name="t")
                    assert sorted(stats.unreadable) == ["locked", "secret.txt"]
                    assert stats.note is not None and "PARTIAL: 2 entries" in stats.note
                    listed = [e["path"] for e in await repo.ls(stats.id)]
                    assert listed == [".", "locked", "ok.txt"]  # the directory, kept empty

            run_asyncio(go())
            # The command, in process (a child would have to import this checkout as
            # nobody): the partial backup is committed and the exit status says so.
            env = {"DEDUPE_REPO": str(repo_path), "DEDUPE_PASSWORD": PASSPHRASE}
            result = CliRunner().invoke(cli, ["backup", str(src), "--name", "c"], env=env)
            assert result.exit_code == 3, result.output
            assert "PARTIAL" in result.output and "generation" in result.output
    finally:
        (src / "locked").chmod(0o700)
        shutil.rmtree(base)


def test_exclude_leaves_out_matching_entries(
    run, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    for path in ("app.db", "app.log", "logs/old.log", "var/tmp/x", "var/keep", "cache/c/d"):
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(path.encode() * 100)

    async def go() -> list[str]:
        async with await make_repo(repo_path) as repo:
            stats = await repo.backup(src, name="t", exclude=["*.log", "var/tmp", "/cache"])
            with pytest.raises(ValueError, match="directory trees"):
                await repo.backup(src / "app.db", name="f", exclude=["*.log"])
            return [e["path"] for e in await repo.ls(stats.id)]

    assert run(go()) == [".", "app.db", "logs", "var", "var/keep"]
    proc = _dedupe("backup", str(src / "app.db"), "--name", "f", "--exclude", "x", env=cli_env)
    assert proc.returncode == 2 and b"directory trees only" in proc.stderr


def test_quiet_and_verbose_on_every_command(run, repo_path: Path, cli_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    async def make() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(os.urandom(50_000)), name="db")

    run(make())
    data = os.urandom(50_000)
    loud = dedupe_cli("backup", "-", "--name", "db", "-v", env=cli_env, input=data)
    assert loud.returncode == 0
    assert b"dedupe: backup: reading" in loud.stderr and b"dedupe: backup: done" in loud.stderr
    # a chunker change makes a note; --quiet (before or after the command) keeps it back
    for args, chunker in ((("-q", "backup"), "fixed:4096"), (("backup", "--quiet"), "fixed:8192")):
        proc = dedupe_cli(*args, "-", "--name", "db", "--chunker", chunker, env=cli_env, input=data)
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
        assert b"generation" in proc.stdout  # the result is still said
    noted = dedupe_cli(
        "backup", "-", "--name", "db", "--chunker", "fastcdc", env=cli_env, input=data
    )
    assert b"dedupe: note: the chunker of 'db' changed" in noted.stderr  # what -q held back
    for command in (("generations",), ("stats",), ("verify",), ("prune", "--dry-run")):
        proc = dedupe_cli(*command, "-q", "-v", env=cli_env)
        assert proc.returncode == 0, (command, proc.stderr)


def test_a_dry_run_says_what_would_be_new_and_stores_nothing(
    run, repo_path: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:  # type: ignore[no-untyped-def]
    old, new = os.urandom(1_000_000), os.urandom(300_000)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(old)

    def files() -> set[Path]:
        return {p for p in repo_path.rglob("*") if p.is_file() and "locks" not in p.parts}

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            await repo.backup(io.BytesIO(old), name="s", kind="full")
            await repo.backup(tree, name="t", kind="full")
            before = files()
            dry = await repo.backup(io.BytesIO(old + new), name="s", dry_run=True)
            assert dry.id == "" and dry.bytes_read == len(old) + len(new)
            assert len(new) <= dry.bytes_new < len(new) + 200_000  # the tail, cut anew
            (tree / "b").write_bytes(new)
            dry_tree = await repo.backup(tree, name="t", dry_run=True)
            # (a file changed within the last seconds is read again, so "a" may be too)
            assert dry_tree.bytes_read >= len(new) and dry_tree.bytes_new == len(new)
            assert files() == before and len(await repo.generations()) == 2
            real = await repo.backup(io.BytesIO(old + new), name="s")
            assert (real.chunks_new, real.bytes_new) == (dry.chunks_new, dry.bytes_new)

    run(go())
    proc = dedupe_cli("backup", str(tree), "--name", "t", "--dry-run", env=cli_env)
    assert (
        proc.returncode == 0 and b"dry run" in proc.stdout and b"nothing was stored" in proc.stdout
    )


def test_a_stream_without_a_recorded_mode_restores_private(
    run, repo_path: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A dump piped in has no file mode to give back: the restored file is the owner's
    alone (0600), never world-readable, whatever the umask."""
    old_umask = os.umask(0o022)
    try:

        async def go() -> None:
            async with await make_repo(repo_path) as repo:
                gen = await repo.backup(io.BytesIO(os.urandom(10_000)), name="dump")
                await repo.restore(gen.id, tmp_path / "dump.sql")

        run(go())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "dump.sql").stat().st_mode) == 0o600


def test_another_keys_generation_does_not_choose_the_chunker(run, repo_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A name keeps the chunker of this key's own latest generation: a writer that backs up
    the same name with another chunker (or forges one in a header) does not change how the
    admin's next backup cuts, as it does not become its parent either."""
    data = os.urandom(300_000)

    async def go() -> None:
        async with await make_repo(repo_path) as repo:
            first = await repo.backup(io.BytesIO(data), name="db")
            await repo.keys.add(b"writer pass", role="writer", name="w", kdf=KdfParams.weakest())
        async with await Repository.open(repo_path, b"writer pass") as writer:
            odd = await writer.backup(io.BytesIO(data), name="db", chunker="fixed:512")
            assert odd.chunker == {"algorithm": "fixed", "block_size": 512}
        async with await Repository.open(repo_path, PASSPHRASE) as repo:
            again = await repo.backup(io.BytesIO(data), name="db")
            assert again.chunker == first.chunker and again.bytes_new == 0

    run(go())
