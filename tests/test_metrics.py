"""Metrics for Prometheus (issue 16): the status textfile parses with prometheus-client's
own parser and carries every metric the alert rules use; a command's run pushed to a
Pushgateway (a real HTTP server on 127.0.0.1 that keeps what it is sent); and the rules
in docs/alerts.yml load in promtool and fire when they should."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import yaml
from conftest import make_repo
from prometheus_client.parser import text_string_to_metric_families

from dedupe.metrics import command_metrics, push, status_metrics, write_textfile

ROOT = Path(__file__).resolve().parent.parent
STATUS_METRICS = {
    "dedupe_generations",
    "dedupe_last_success_timestamp_seconds",
    "dedupe_last_success_age_seconds",
    "dedupe_last_size_bytes",
    "dedupe_rpo_seconds",
    "dedupe_rto_seconds",
    "dedupe_drill_max_age_seconds",
    "dedupe_rpo_met",
    "dedupe_drill_last_timestamp_seconds",
    "dedupe_drill_duration_seconds",
    "dedupe_drill_success",
    "dedupe_objectives_met",
    "dedupe_status_timestamp_seconds",
}


def _samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_the_status_textfile_carries_every_metric(run_asyncio: Any, tmp_path: Path) -> None:
    """One source with objectives, backed up and drilled, one without: the file written
    for node_exporter parses, has every metric of the source with objectives, labelled
    with the repository and the name, with the values status computed."""

    async def go() -> Any:
        async with await make_repo(tmp_path / "repo") as repo:
            await repo.objectives.set("orders", rpo=3600, rto=900)
            await repo.backup(io.BytesIO(os.urandom(100_000)), name="orders")
            await repo.backup(io.BytesIO(b"x" * 1000), name="free")
            await repo.objectives.drill()
            return await repo.objectives.status()

    report = run_asyncio(go())
    out = tmp_path / "textfile" / "dedupe.prom"
    out.parent.mkdir()
    write_textfile(out, status_metrics(report, "/srv/backups/shop"))
    assert [p.name for p in out.parent.iterdir()] == ["dedupe.prom"]  # no temporary left
    samples = _samples(out.read_text())
    assert STATUS_METRICS <= set(samples)
    orders = {
        name: s.value
        for name, found in samples.items()
        for s in found
        if s.labels.get("name") == "orders"
    }
    assert STATUS_METRICS - {"dedupe_status_timestamp_seconds"} <= set(orders)
    assert orders["dedupe_rpo_seconds"] == 3600 and orders["dedupe_rto_seconds"] == 900
    assert orders["dedupe_last_size_bytes"] == 100_000 and orders["dedupe_generations"] == 1
    assert orders["dedupe_drill_success"] == 1 and orders["dedupe_objectives_met"] == 1
    assert orders["dedupe_rpo_met"] == 1 and orders["dedupe_drill_duration_seconds"] > 0
    assert {s.labels["repository"] for s in samples["dedupe_rpo_seconds"]} == {"/srv/backups/shop"}
    free = [s for s in samples["dedupe_generations"] if s.labels["name"] == "free"]
    assert free and "free" not in {s.labels["name"] for s in samples["dedupe_rpo_seconds"]}


class _Gateway(BaseHTTPRequestHandler):
    """A Pushgateway's one job here: keep what is PUT under its path."""

    received: dict[str, bytes] = {}

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        length = int(self.headers["Content-Length"])
        _Gateway.received[self.path] = self.rfile.read(length)
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_commands_run_is_pushed_grouped_by_command_and_name() -> None:
    """A backup's metrics reach the gateway under job/command/name, in the text format,
    with its bytes, ratios, duration and success; a failed verify carries its error."""
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        stats = {"bytes_read": 1000, "bytes_new": 250, "bytes_stored": 100}
        backup = command_metrics("backup", "r", seconds=2.5, error=None, name="orders", stats=stats)
        push(url, backup, "backup", "orders")
        verify = command_metrics("verify", "r", seconds=9.0, error="IntegrityError")
        push(url, verify, "verify", None)
    finally:
        server.shutdown()
    got = _Gateway.received
    assert set(got) == {
        "/metrics/job/dedupe/command/backup/name/orders",
        "/metrics/job/dedupe/command/verify",
    }
    b = {
        n: s[0].value
        for n, s in _samples(got["/metrics/job/dedupe/command/backup/name/orders"].decode()).items()
    }
    assert b["dedupe_backup_read_bytes"] == 1000 and b["dedupe_backup_dedupe_ratio"] == 4
    assert b["dedupe_backup_compression_ratio"] == 2.5 and b["dedupe_command_success"] == 1
    assert b["dedupe_command_duration_seconds"] == 2.5
    assert b["dedupe_command_last_success_timestamp_seconds"] > 0
    v = _samples(got["/metrics/job/dedupe/command/verify"].decode())
    assert v["dedupe_command_success"][0].value == 0
    assert [s.labels["error"] for s in v["dedupe_command_errors"]] == ["IntegrityError"]
    assert "dedupe_command_last_success_timestamp_seconds" not in v


def _promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (.ci/run does)"
    return found


def test_the_alert_rules_load_in_promtool() -> None:
    out = subprocess.run(
        [_promtool(), "check", "rules", str(ROOT / "docs" / "alerts.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout


def test_the_alert_rules_fire_when_objectives_are_missed(tmp_path: Path) -> None:
    """promtool's rule tests on series like the metrics above: a backup older than its
    RPO pages after 5 minutes, not before; a failed drill, a drill slower than the RTO
    and a failed verify alert; a met objective does not. (Annotations are left out of
    the copy of the rules tested here: the expressions and durations are what counts.)"""
    rules = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    for rule in rules["groups"][0]["rules"]:
        rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    at = '{repository="r",name="orders"}'
    ok = '{repository="r",name="ok"}'
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f"dedupe_last_success_timestamp_seconds{at}", "values": "0x120"},
                    {"series": f"dedupe_rpo_seconds{at}", "values": "3600x120"},
                    {"series": f"dedupe_last_success_timestamp_seconds{ok}", "values": "0+60x120"},
                    {"series": f"dedupe_rpo_seconds{ok}", "values": "3600x120"},
                    {"series": f"dedupe_drill_success{at}", "values": "1x30 0x90"},
                    {"series": f"dedupe_drill_duration_seconds{at}", "values": "100x120"},
                    {"series": f"dedupe_rto_seconds{at}", "values": "60x120"},
                    {
                        "series": 'dedupe_command_success{repository="r",command="verify"}',
                        "values": "1x60 0x60",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "62m", "alertname": "DedupeBackupOlderThanRPO", "exp_alerts": []},
                    {
                        "eval_time": "70m",
                        "alertname": "DedupeBackupOlderThanRPO",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "repository": "r",
                                    "name": "orders",
                                }
                            }
                        ],
                    },
                    {"eval_time": "20m", "alertname": "DedupeDrillFailed", "exp_alerts": []},
                    {
                        "eval_time": "40m",
                        "alertname": "DedupeDrillFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "repository": "r",
                                    "name": "orders",
                                }
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "DedupeDrillSlowerThanRTO",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "warning",
                                    "repository": "r",
                                    "name": "orders",
                                }
                            }
                        ],
                    },
                    {"eval_time": "30m", "alertname": "DedupeVerifyFailed", "exp_alerts": []},
                    {
                        "eval_time": "90m",
                        "alertname": "DedupeVerifyFailed",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "repository": "r",
                                    "command": "verify",
                                }
                            }
                        ],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    out = subprocess.run(
        [_promtool(), "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
