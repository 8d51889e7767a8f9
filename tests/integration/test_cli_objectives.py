"""The disaster-recovery commands as an operator runs them (issue 16): `policy`, `drill`
and `status` in child processes, their exit codes, the metrics textfile, and
`--push-metrics` to a Pushgateway (a real HTTP server on 127.0.0.1 that keeps what it is
sent)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import dedupe_cli, make_repo
from prometheus_client.parser import text_string_to_metric_families

from dedupe.objectives import STATUS_DRILL, STATUS_OK, STATUS_RPO


@pytest.fixture
def repo(repo_path: Path, tmp_path: Path) -> Path:
    async def make() -> None:
        async with await make_repo(repo_path):
            pass

    asyncio.run(make())
    (tmp_path / "orders.bin").write_bytes(os.urandom(400_000))
    return repo_path


def ok(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_status_exit_code_follows_the_rpo_and_the_last_drill(
    repo: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """No generation: 70. Backed up and drilled: 0. A failed drill: 71 (the drill itself
    exits 71 too). Past its RPO of 1 s: 70, whatever the drill said."""
    ok(dedupe_cli("policy", "set", "orders", "--rpo", "1h", "--rto", "15m", env=cli_env))
    listed = json.loads(ok(dedupe_cli("policy", "list", "--json", env=cli_env)).stdout)
    assert [(p["name"], p["rpo_seconds"], p["rto_seconds"]) for p in listed] == [
        ("orders", 3600, 900)
    ]
    assert dedupe_cli("status", env=cli_env).returncode == STATUS_RPO
    ok(dedupe_cli("backup", str(tmp_path / "orders.bin"), "--name", "orders", env=cli_env))
    assert dedupe_cli("status", env=cli_env).returncode == STATUS_DRILL  # never drilled
    drilled = json.loads(ok(dedupe_cli("drill", "--json", env=cli_env)).stdout)
    assert [(d["name"], d["passed"], d["bytes"]) for d in drilled] == [("orders", True, 400_000)]
    assert ok(dedupe_cli("status", env=cli_env)).returncode == STATUS_OK

    failed = dedupe_cli("drill", "orders@latest", "--check", "false", env=cli_env)
    assert failed.returncode == STATUS_DRILL and b"FAIL orders" in failed.stdout
    report = dedupe_cli("status", "--json", env=cli_env)
    assert report.returncode == STATUS_DRILL
    (orders,) = json.loads(report.stdout)["sources"]
    assert orders["last_drill"]["passed"] is False and orders["rpo_met"] is True

    ok(dedupe_cli("policy", "set", "orders", "--rpo", "1s", "--rto", "15m", env=cli_env))
    time.sleep(1.5)  # the newest generation is now older than its RPO
    late = dedupe_cli("status", env=cli_env)
    assert late.returncode == STATUS_RPO and b"older than its RPO" in late.stdout
    bad = dedupe_cli("policy", "set", "orders", "--rpo", "soon", "--rto", "1m", env=cli_env)
    assert bad.returncode == 2 and b"--rpo" in bad.stderr


def test_status_writes_a_textfile_and_commands_push_their_runs(
    repo: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """`status --metrics` leaves a file prometheus-client parses; `--push-metrics` sends a
    backup's bytes and a failed command's error class; a gateway that is down is a
    warning, not a failure."""
    received: dict[str, bytes] = {}

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802
            received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(202)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        ok(dedupe_cli("policy", "set", "orders", "--rpo", "1h", "--rto", "15m", env=cli_env))
        src = str(tmp_path / "orders.bin")
        ok(dedupe_cli("--push-metrics", url, "backup", src, "--name", "orders", env=cli_env))
        missing = dedupe_cli("--push-metrics", url, "restore", "nothere@latest", "x", env=cli_env)
        assert missing.returncode != 0
    finally:
        server.shutdown()
    backup = received["/metrics/job/dedupe/command/backup/name/orders"].decode()
    values = {s.name: s.value for f in text_string_to_metric_families(backup) for s in f.samples}
    assert values["dedupe_backup_read_bytes"] == 400_000 and values["dedupe_command_success"] == 1
    failed = received["/metrics/job/dedupe/command/restore"].decode()
    errors = [s for f in text_string_to_metric_families(failed) for s in f.samples]
    assert any(s.name == "dedupe_command_errors" and s.labels["error"] for s in errors)

    down = dedupe_cli("--push-metrics", url, "policy", "list", env=cli_env)
    assert down.returncode == 0 and b"could not push metrics" in down.stderr

    out = tmp_path / "dedupe.prom"
    assert dedupe_cli("status", "--metrics", str(out), env=cli_env).returncode == STATUS_DRILL
    names = {f.name for f in text_string_to_metric_families(out.read_text())}
    assert {"dedupe_rpo_seconds", "dedupe_last_success_timestamp_seconds"} <= names
