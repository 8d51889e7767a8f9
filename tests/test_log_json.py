"""`--log-json` (issue 16, point 5): the real command in child processes, against real
repositories, with stderr read as JSON Lines the way journald or a log shipper would.

Every line one object with ts, level, event, command, pid and message; command_start
first and command_end (with the process's exit code) last; no secret in any of it; and
without the option, stderr byte for byte what it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, dedupe_cli, make_repo

from dedupe.errors import GenerationNotFound, SourceError, UnsupportedLocation, WrongPassphrase

REQUIRED = {"ts", "level", "event", "command", "pid", "message"}
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error"}
EVENT = re.compile(r"^[a-z]+(_[a-z]+)*$")
DATA = os.urandom(200_000)  # a few 64 KiB packs: backup, restore and verify have stages


def events(proc: subprocess.CompletedProcess[bytes], command: str | None = None) -> list[Any]:
    """stderr as events, each checked against the contract every line must keep."""
    lines = proc.stderr.decode("ascii").splitlines()  # ASCII: non-ASCII text is escaped
    assert lines, proc
    out = [json.loads(line) for line in lines]
    for e in out:
        assert isinstance(e, dict) and REQUIRED <= e.keys(), e
        assert TS.match(e["ts"]) and e["level"] in LEVELS and EVENT.match(e["event"]), e
        assert isinstance(e["message"], str), e
        if command is not None:
            assert e["command"] == command, e
    assert len({e["pid"] for e in out}) == 1 and isinstance(out[0]["pid"], int), out
    assert out[0]["event"] == "command_start", out
    assert out[-1]["event"] == "command_end", out
    assert out[-1]["exit_code"] == proc.returncode, out
    assert isinstance(out[-1]["duration_seconds"], float), out
    return out


def only(es: list[Any], event: str) -> dict[str, Any]:
    found = [e for e in es if e["event"] == event]
    assert len(found) == 1, (event, es)
    return found[0]


@pytest.fixture
def repo(repo_path: Path) -> Path:
    async def make() -> None:
        async with await make_repo(repo_path):
            pass

    asyncio.run(make())
    return repo_path


def test_backup_restore_verify_are_json_lines(
    repo: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src = tmp_path / "db.bin"
    src.write_bytes(DATA)
    # before the command, after it, and from the environment
    backup = dedupe_cli("--log-json", "backup", str(src), "--name", "db", env=cli_env)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout.startswith(b"full generation "), backup.stdout  # stdout as ever
    es = events(backup, "backup")
    start = es[0]
    assert start["repository"] == str(repo) and start["version"]
    assert start["options"]["name"] == "db" and start["options"]["source"] == str(src)
    stages = [e["stage"] for e in es if e["event"] == "progress"]
    assert stages[0] == "reading" and stages[-1] == "done", stages
    assert all(e["operation"] == "backup" for e in es if e["event"] == "progress")
    summary = es[-1]["summary"]
    assert summary["name"] == "db" and summary["kind"] == "full"
    assert summary["bytes_read"] == len(DATA) and summary["bytes_stored"] > 0
    assert backup.stdout.decode().split()[2] == summary["id"][:12]
    assert {e["level"] for e in es} == {"info"}

    out = tmp_path / "out.bin"
    restore = dedupe_cli("restore", "db@latest", str(out), "--log-json", env=cli_env)
    assert restore.returncode == 0, restore.stderr
    assert out.read_bytes() == DATA
    es = events(restore, "restore")
    assert es[-1]["summary"]["id"] == summary["id"]
    assert es[-1]["summary"]["bytes_written"] == len(DATA)
    assert any(e["event"] == "progress" and e["stage"] == "done" for e in es)

    verify = dedupe_cli("verify", "--read-data", "--json", env=dict(cli_env, DEDUPE_LOG_JSON="1"))
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["ok"] is True  # --json output stays on stdout
    es = events(verify, "verify")
    assert es[-1]["summary"]["ok"] is True and es[-1]["summary"]["bytes_read"] > 0
    assert "verify: reading packs" in [e["message"] for e in es if e["event"] == "progress"]


def test_a_restore_to_stdout_keeps_stdout_for_the_data(repo: Path, cli_env: dict[str, str]) -> None:
    assert dedupe_cli("backup", "-", "--name", "db", env=cli_env, input=DATA).returncode == 0
    proc = dedupe_cli("--log-json", "restore", "db@latest", "-", "--json", env=cli_env)
    assert proc.returncode == 0 and proc.stdout == DATA
    # the --json result, which goes to stderr there, becomes command_end's summary
    assert events(proc, "restore")[-1]["summary"]["bytes_written"] == len(DATA)


@pytest.mark.parametrize(
    ("args", "error", "extra_env"),
    [
        (("generations",), WrongPassphrase, {"DEDUPE_PASSWORD": "not the passphrase"}),
        (("restore", "db@latest", "-"), GenerationNotFound, {}),
    ],
)
def test_a_failure_is_an_error_event_with_the_exit_code(
    repo: Path, cli_env: dict[str, str], args: tuple[str, ...], error: type, extra_env: Any
) -> None:
    env = dict(cli_env, **extra_env)
    proc = dedupe_cli("--log-json", *args, "--json", env=env)
    assert proc.returncode == error.exit_code and proc.stdout == b""
    es = events(proc, args[0])
    e = only(es, "error")
    assert e["level"] == "error" and e["error"] == error.__name__
    assert e["exit_code"] == error.exit_code == es[-1]["exit_code"]
    # the same message and hint as the human output, which is unchanged
    text = dedupe_cli(*args, env=env)
    assert text.returncode == error.exit_code
    said = f"dedupe: error: {e['message']}\n" + (f"  hint: {e['hint']}\n" if e["hint"] else "")
    assert text.stderr.decode() == said


def test_a_usage_error_is_an_event_too(cli_env: dict[str, str]) -> None:
    proc = dedupe_cli("backup", "--no-such-option", "--log-json", env=cli_env)
    assert proc.returncode == 2
    e = only(events(proc, "backup"), "error")
    assert e["error"] == "NoSuchOption" and e["exit_code"] == 2
    assert "--no-such-option" in e["message"]


def test_no_secret_reaches_the_log(repo: Path, cli_env: dict[str, str]) -> None:
    """The passphrase (DEDUPE_PASSWORD), a password in another variable that a failing
    dump prints, a token in the --from-command line, and a location's userinfo."""
    env = dict(cli_env, PGPASSWORD="pg-secret-in-env")
    dump = "sh -c 'printf data-token=argv-secret-9; echo \"$PGPASSWORD\" >&2; exit 4'"
    proc = dedupe_cli("--log-json", "backup", "--name", "db", "--from-command", dump, env=env)
    assert proc.returncode == SourceError.exit_code
    es = events(proc, "backup")
    assert es[0]["options"]["from_command"] == "<redacted>"
    assert only(es, "error")["error"] == "SourceError"
    stderr = proc.stderr.decode()
    for secret in (PASSPHRASE, "pg-secret-in-env", "argv-secret-9"):
        assert secret not in stderr, secret
    # without --log-json the error quotes the dump's stderr, as it always did
    assert (
        b"pg-secret-in-env"
        in dedupe_cli("backup", "--name", "db", "--from-command", dump, env=env).stderr
    )

    # a location with userinfo, which the error message quotes
    location = "file://admin:url-secret-7@host/repo"
    proc = dedupe_cli("--log-json", "-r", location, "generations", env=cli_env)
    assert proc.returncode == UnsupportedLocation.exit_code
    es = events(proc, "generations")
    assert es[0]["repository"] == "file://host/repo"
    assert "'file://host/repo'" in only(es, "error")["message"]
    assert "url-secret-7" not in proc.stderr.decode() and PASSPHRASE not in proc.stderr.decode()


def test_logger_warnings_and_notes_are_events(
    repo: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    assert dedupe_cli("backup", "-", "--name", "db", env=cli_env, input=DATA).returncode == 0
    # A state directory that cannot be made: the "dedupe" logger warns, the command goes on.
    blocked = tmp_path / "state-is-a-file"
    blocked.write_bytes(b"")
    env = dict(cli_env, DEDUPE_STATE_DIR=str(blocked))
    text = dedupe_cli("generations", env=env)
    assert text.returncode == 0 and text.stderr.startswith(b"dedupe: warning: cannot record")
    proc = dedupe_cli("generations", "--log-json", env=env)
    assert proc.returncode == 0 and proc.stdout == text.stdout
    w = only(events(proc, "generations"), "warning")
    assert w["level"] == "warning" and w["logger"] == "dedupe"
    assert text.stderr.decode() == f"dedupe: warning: {w['message']}\n"

    # "dedupe: note: ..." (a chunker change) is a note; -q holds notes and progress back
    args = ("backup", "-", "--name", "db", "--log-json", "--chunker")
    note = only(events(dedupe_cli(*args, "fixed:4096", env=cli_env, input=DATA)), "note")
    assert note["level"] == "info" and note["message"].startswith("the chunker of 'db' changed")
    quiet = events(dedupe_cli(*args, "fixed:8192", "-q", env=cli_env, input=DATA))
    assert [e["event"] for e in quiet] == ["command_start", "command_end"]


def test_without_the_option_stderr_is_what_it_was(repo: Path, cli_env: dict[str, str]) -> None:
    """-v's stages and a failure, byte for byte; DEDUPE_LOG_JSON=0 is off."""
    for env in (cli_env, dict(cli_env, DEDUPE_LOG_JSON="0")):
        proc = dedupe_cli("backup", "-", "--name", "db", "-v", env=env, input=DATA)
        assert proc.returncode == 0
        assert proc.stderr == (
            b"dedupe: backup: reading\ndedupe: backup: committing\ndedupe: backup: done\n"
        )
        proc = dedupe_cli("generations", env=dict(env, DEDUPE_PASSWORD="not the passphrase"))
        assert proc.stderr == (
            b"dedupe: error: wrong passphrase: no key file of this repository opens with it\n"
            b"  hint: check DEDUPE_PASSWORD / DEDUPE_PASSWORD_FILE / DEDUPE_PASSWORD_COMMAND\n"
        )
