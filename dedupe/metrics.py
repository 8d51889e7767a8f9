"""Prometheus metrics (docs/OPERATIONS.md, "Monitoring and alerts").

Two ways out, both in Prometheus' text format, made with prometheus-client:
- `status_metrics(report)` -> a registry of where every source stands (newest
  generation, its age and size, the objectives, the last drill), which `write_textfile`
  writes atomically for node_exporter's textfile collector (`dedupe status --metrics`).
- `command_metrics(...)` -> a registry of one command's run (duration, success, error
  class, and for a backup its bytes), which `push` sends to a Pushgateway
  (`--push-metrics URL`), grouped by command and source so that each keeps its last run.

docs/alerts.yml holds the alerting rules written against these names.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import push_to_gateway

from dedupe.engine.forget import parse_created

if TYPE_CHECKING:
    from dedupe.objectives import StatusReport

PREFIX = "dedupe"
BACKUP_BYTES = ("bytes_read", "bytes_new", "bytes_stored")


def _seconds_since_epoch(stamp: str) -> float:
    return parse_created(stamp).timestamp()


def status_metrics(report: StatusReport, repository: str) -> CollectorRegistry:
    """Where each source of `report` stands, labelled with its name and the repository."""
    registry = CollectorRegistry()
    labels = ["repository", "name"]

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(f"{PREFIX}_{name}", doc, labels, registry=registry)

    generations = gauge("generations", "Generations of the source in the repository")
    last = gauge("last_success_timestamp_seconds", "When the newest generation was made")
    age = gauge("last_success_age_seconds", "Age of the newest generation when status ran")
    size = gauge("last_size_bytes", "Logical size of the newest generation")
    rpo = gauge("rpo_seconds", "Recovery point objective of the source")
    rto = gauge("rto_seconds", "Recovery time objective of the source")
    drill_age_limit = gauge("drill_max_age_seconds", "How old the last drill may be")
    rpo_met = gauge("rpo_met", "1 when the newest generation is younger than the RPO")
    drill_when = gauge("drill_last_timestamp_seconds", "When the last drill started")
    drill_seconds = gauge("drill_duration_seconds", "How long the last drill took")
    drill_ok = gauge("drill_success", "1 when the last drill passed (restored within its RTO)")
    source_ok = gauge("objectives_met", "1 when every objective of the source is met")
    checked = Gauge(
        f"{PREFIX}_status_timestamp_seconds",
        "When dedupe status last ran",
        ["repository"],
        registry=registry,
    )
    checked.labels(repository).set(_seconds_since_epoch(report.checked))
    for s in report.sources:
        at = (repository, s.name)
        generations.labels(*at).set(s.generations)
        if s.last_created is not None:
            last.labels(*at).set(_seconds_since_epoch(s.last_created))
        if s.age_seconds is not None:
            age.labels(*at).set(s.age_seconds)
        if s.last_size is not None:
            size.labels(*at).set(s.last_size)
        if s.policy is not None:
            rpo.labels(*at).set(s.policy.rpo)
            rto.labels(*at).set(s.policy.rto)
            drill_age_limit.labels(*at).set(s.policy.drill_max_age)
            rpo_met.labels(*at).set(0 if any(k == "rpo" for k, _ in s.problems) else 1)
            source_ok.labels(*at).set(1 if s.ok else 0)
        if s.last_drill is not None:
            drill_when.labels(*at).set(_seconds_since_epoch(s.last_drill.started))
            drill_seconds.labels(*at).set(s.last_drill.seconds)
            drill_ok.labels(*at).set(1 if s.last_drill.passed else 0)
    return registry


def command_metrics(
    command: str,
    repository: str,
    *,
    seconds: float,
    error: str | None,
    name: str | None = None,
    stats: Mapping[str, Any] | None = None,
) -> CollectorRegistry:
    """One run of `command`: its duration and outcome (`error`: the error's class, None
    on success), and for a backup (`stats`) what it read, stored and when it succeeded."""
    registry = CollectorRegistry()
    keys = ["repository", "command", "name"]
    at = (repository, command, name or "")

    def put(metric: str, doc: str, value: float) -> None:
        Gauge(f"{PREFIX}_{metric}", doc, keys, registry=registry).labels(*at).set(value)

    put("command_duration_seconds", "Wall time of the command's last run", seconds)
    put("command_success", "1 when the command's last run succeeded", 0 if error else 1)
    errors = Gauge(
        f"{PREFIX}_command_errors",
        "1 for the error class of the command's last run, if any",
        [*keys, "error"],
        registry=registry,
    )
    if error:
        errors.labels(*at, error).set(1)
    if not error:
        put(
            "command_last_success_timestamp_seconds", "When the command last succeeded", time.time()
        )
    if stats:
        read, new, stored = (
            int(stats.get(k) or 0) for k in ("bytes_read", "bytes_new", "bytes_stored")
        )
        put("backup_read_bytes", "Bytes the last backup read", read)
        put("backup_new_bytes", "New (not deduplicated) bytes of the last backup", new)
        put("backup_stored_bytes", "Bytes the last backup added to the store", stored)
        if new:
            put("backup_dedupe_ratio", "Bytes read per new byte of the last backup", read / new)
        if stored:
            put(
                "backup_compression_ratio",
                "New bytes per stored byte of the last backup",
                new / stored,
            )
    return registry


def write_textfile(path: str | os.PathLike[str], registry: CollectorRegistry) -> None:
    """Write `registry` to `path` for node_exporter's textfile collector: to a temporary
    file beside it, then renamed over it, so that the collector never reads half."""
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".dedupe-metrics-", dir=os.path.dirname(target) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(generate_latest(registry))
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def push(url: str, registry: CollectorRegistry, command: str, name: str | None) -> None:
    """Send `registry` to the Pushgateway at `url`, grouped by command and source name
    (each keeps its own last run)."""
    grouping = {"command": command.replace(" ", "_"), **({"name": name} if name else {})}
    push_to_gateway(url, job="dedupe", registry=registry, grouping_key=grouping, timeout=10)
