"""Commands as sources and targets (dedupe/engine/commands.py): a backup of what a
command writes commits only when the command succeeds and wrote something; a restore into
a command fails when the command does, and a command fed a damaged generation is killed
before it sees the end of its input."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import make_repo

from dedupe import Command, Repository
from dedupe.errors import EmptySource, IntegrityError, SourceError, TargetError

PY = sys.executable


def writer(code: str) -> Command:
    return Command((PY, "-c", code))


WRITE_FILE = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
# Writes its input to a file, then a marker once it has seen the end of it.
SINK = (
    "import sys\n"
    "data = sys.stdin.buffer.read()\n"
    "open(sys.argv[1], 'wb').write(data)\n"
    "open(sys.argv[1] + '.done', 'w').write('end of input')\n"
)


async def nothing_committed(repo: Repository, before: int) -> None:
    assert len(await repo.generations()) == before
    assert (await repo.verify(read_data=True)).ok


def test_a_command_is_backed_up_and_restored_into_another_command(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data = os.urandom(3_000_000)
    (tmp_path / "dump").write_bytes(data)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            command = Command(
                (PY, "-c", WRITE_FILE, str(tmp_path / "dump")),
                label="pg_dump orders",
                info={"database": "orders"},
            )
            stats = await repo.backup(command, name="orders")
            (gen,) = await repo.generations()
            assert gen.id == stats.id and stats.bytes_read == len(data)
            assert gen.source["label"] == "pg_dump orders"
            assert gen.source["database"] == "orders"
            out = tmp_path / "restored"
            restored = await repo.restore(gen.id, Command((PY, "-c", SINK, str(out))))
            assert restored.bytes_written == len(data)
            assert out.read_bytes() == data

    run_asyncio(go())


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (
            "import sys; sys.stdout.buffer.write(b'x' * 500_000); sys.stdout.flush(); "
            "sys.stderr.write('pg_dump: error: connection lost\\n'); sys.exit(3)",
            "exited with status 3: pg_dump: error: connection lost",
        ),
        (
            "import os, signal, sys; sys.stdout.buffer.write(b'y' * 300_000); "
            "sys.stdout.flush(); os.kill(os.getpid(), signal.SIGKILL)",
            "was killed by SIGKILL",
        ),
    ],
    ids=["exits 3 half way", "killed half way"],
)
def test_a_command_that_fails_half_way_commits_nothing(
    run_asyncio: Any, tmp_path: Path, code: str, said: str
) -> None:
    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.backup(io.BytesIO(os.urandom(100_000)), name="db")
            with pytest.raises(SourceError, match=said) as raised:
                await repo.backup(writer(code), name="db")
            assert "nothing was committed" in raised.value.message
            await nothing_committed(repo, 1)

    run_asyncio(go())


def test_a_command_that_writes_nothing_or_cannot_start_commits_nothing(
    run_asyncio: Any, tmp_path: Path
) -> None:
    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            with pytest.raises(EmptySource):
                await repo.backup(writer("pass"), name="db")
            with pytest.raises(SourceError, match="cannot run"):
                await repo.backup(Command(("/nonexistent/pg_dump", "db")), name="db")
            # Writes nothing and fails: the failure is the news, not the emptiness.
            with pytest.raises(SourceError, match="status 2"):
                await repo.backup(writer("import sys; sys.exit(2)"), name="db")
            await nothing_committed(repo, 0)

    run_asyncio(go())


def test_a_target_command_that_fails_or_stops_reading_fails_the_restore(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data = os.urandom(2_000_000)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
            failing = writer(
                "import sys; sys.stdin.buffer.read(); "
                "sys.stderr.write('pg_restore: error: relation exists\\n'); sys.exit(1)"
            )
            with pytest.raises(TargetError, match="status 1: pg_restore: error: relation exists"):
                await repo.restore(gen.id, failing)
            with pytest.raises(TargetError, match="stopped reading"):
                await repo.restore(gen.id, writer("import sys; sys.stdin.buffer.read(10)"))

    run_asyncio(go())


def test_a_target_command_fed_a_damaged_generation_never_sees_the_end_of_its_input(
    run_asyncio: Any, tmp_path: Path
) -> None:
    data = os.urandom(3_000_000)

    async def go() -> None:
        async with await make_repo(tmp_path / "repo") as repo:
            gen = await repo.backup(io.BytesIO(data), name="db")
        packs = sorted(p for p in (tmp_path / "repo" / "packs").rglob("*") if p.is_file())
        victim = packs[len(packs) // 2]
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 3] ^= 1
        victim.write_bytes(bytes(raw))
        out = tmp_path / "restored"
        async with await Repository.open(tmp_path / "repo", "correct horse battery staple") as repo:
            with pytest.raises(IntegrityError):
                await repo.restore(gen.id, Command((PY, "-c", SINK, str(out))))
        assert not Path(f"{out}.done").exists()

    run_asyncio(go())


def test_the_cli_backs_up_from_and_restores_to_commands(
    cli: Any, cli_env: dict[str, str], repo_path: Path, tmp_path: Path
) -> None:
    data = os.urandom(1_000_000)
    (tmp_path / "dump").write_bytes(data)
    assert cli("init", env=cli_env).returncode == 0
    line = f'{PY} -c "{WRITE_FILE}" {tmp_path / "dump"}'
    backed = cli("backup", "--from-command", line, "--name", "orders", "--json", env=cli_env)
    assert backed.returncode == 0, backed.stderr.decode()
    gen = json.loads(backed.stdout)["id"]
    out = tmp_path / "restored"
    sink = f"{PY} -c \"import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())\" {out}"
    restored = cli("restore", gen, "--to-command", sink, env=cli_env)
    assert restored.returncode == 0, restored.stderr.decode()
    assert out.read_bytes() == data
    failing = f"{PY} -c \"import sys; sys.stderr.write('boom here'); sys.exit(4)\""
    failed = cli("backup", "--from-command", failing, "--name", "orders", env=cli_env)
    assert failed.returncode == SourceError.exit_code
    assert "status 4: boom here" in failed.stderr.decode()
    both = cli("backup", "-", "--from-command", failing, "--name", "orders", env=cli_env)
    assert both.returncode == 2
