"""Structured logs for the `dedupe` command (`--log-json`, or DEDUPE_LOG_JSON=1).

With it, everything the command writes to stderr is JSON Lines: one object per line,
nothing else (no progress bar, no colour, no free text), for journald and log shippers.
stdout is left alone. Every object carries

    ts       RFC 3339 UTC with milliseconds ("2026-12-06T13:40:00.123Z")
    level    debug | info | warning | error
    event    a stable snake_case name (docs/OPERATIONS.md lists them with their fields)
    command  "backup", "replica sync", ... (null before the command is known)
    pid      the process id
    message  the text the human output would say (secret values redacted)

then the event's own fields. The sequence opens with `command_start` and closes with
`command_end` (its `exit_code` is the process's).

Secrets: nothing here reads a passphrase, and a value is never logged because it was
given. Option values that may carry credentials (the command lines of --from-command
and --to-command) are replaced by "<redacted>"; locations lose their userinfo and query;
and the values of environment variables named like secrets (DEDUPE_PASSWORD,
PGPASSWORD, AWS_SECRET_ACCESS_KEY...), those option values, URL userinfo and password=
pairs are cut out of every string of every event, should an error message quote them.

This module knows nothing of click or of the repository: the command (dedupe.cli) tells
it what happened. It is safe to call from several threads (progress callbacks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from dedupe._types import Progress

REDACTED = "<redacted>"
PROGRESS_INTERVAL = 1.0  # seconds between two progress events of one stage
# Values shorter than this are not searched for in messages: a passphrase "wrong" would cut
# the word out of "wrong passphrase" (they are still never logged as options).
MIN_SECRET_LENGTH = 8

# Options whose values are command lines: those carry passwords (mysqldump -pSECRET,
# pg_dump 'postgresql://user:secret@host/db') often enough to be never logged.
SECRET_OPTIONS = frozenset({"from_command", "to_command"})
_SECRET_NAME = re.compile(r"PASSWORD|PASSPHRASE|SECRET|TOKEN|CREDENTIAL", re.IGNORECASE)
# user:password@ in a URL, and key=value pairs of a libpq connection string.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]*@")
_QUERY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://[^?#\s]*)[?#]\S*")
_PASSWORD_PAIR = re.compile(r"(?P<key>password\s*=\s*)(?:'[^']*'|\S+)", re.IGNORECASE)


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with milliseconds: 2026-12-06T13:40:00.123Z."""
    t = datetime.fromtimestamp(seconds, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def without_credentials(text: str) -> str:
    """`text` without the userinfo of URLs and the value of password=... pairs (applied to
    every string of every event: an error message may quote a location)."""
    text = _USERINFO.sub(r"\g<scheme>", text)
    return _PASSWORD_PAIR.sub(rf"\g<key>{REDACTED}", text)


def scrub(text: str) -> str:
    """A location or option value as it may be logged: without credentials, and without
    the query of URLs (where tokens travel)."""
    return without_credentials(_QUERY.sub(r"\g<scheme>", text))


def secret_environment(environ: Mapping[str, str]) -> set[str]:
    """The values of variables named like secrets (not their _FILE or _COMMAND forms,
    whose values are paths and command lines)."""
    return {
        value
        for name, value in environ.items()
        if _SECRET_NAME.search(name)
        and not name.upper().endswith(("_FILE", "_COMMAND"))
        and len(value) >= MIN_SECRET_LENGTH
    }


def spellings(command_line: str) -> set[str]:
    """The forms in which a message may quote a command line: as given, as repr() quotes
    it, and re-joined from its words (what dedupe says of a command that failed)."""
    forms = {command_line, repr(command_line)[1:-1]}
    try:
        forms.add(shlex.join(shlex.split(command_line)))
    except ValueError:  # unbalanced quotes: the command is refused, quoting the line as given
        pass
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def options(params: Mapping[str, Any]) -> dict[str, Any]:
    """A command's parameters as they may be logged (pgBackRest logs its options at the
    start of a command, with secrets redacted): command lines replaced, strings scrubbed,
    tuples as lists."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if value is None or value is False or value == ():
            continue  # not given: the log says what was asked for
        if name in SECRET_OPTIONS or _SECRET_NAME.search(name):
            out[name] = REDACTED
        elif isinstance(value, str):
            out[name] = scrub(value)
        elif isinstance(value, tuple | list):
            out[name] = [scrub(v) if isinstance(v, str) else v for v in value]
        elif isinstance(value, bool | int | float):
            out[name] = value
        else:  # a parsed value (a subset spec...): its text
            out[name] = scrub(str(value))
    return out


_SUMMARY_TEXT = frozenset({"id", "name", "kind", "parent"})


def summary(result: Any) -> dict[str, Any] | None:
    """The small part of a command's result that `command_end` carries: its numbers and
    flags, and the strings that identify what it made (id, name, kind, parent). Free text
    (notes, labels, locations) and lists stay in the command's own --json output."""
    if not isinstance(result, Mapping):
        return None
    out = {
        key: value
        for key, value in result.items()
        if isinstance(value, bool | int | float)
        or (key in _SUMMARY_TEXT and (value is None or isinstance(value, str)))
    }
    return out or None


class JsonLog:
    """One command's JSON Lines on stderr. `start` and `end` are idempotent: whichever
    part of the command knows first says it, and `end` opens with `command_start` when
    nothing did (a usage error before the command ran)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.command: str | None = None
        self._secrets = secret_environment(os.environ if environ is None else environ)
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._started = False
        self._ended = False
        self._summary: dict[str, Any] | None = None

    def hide(self, values: Iterable[str]) -> None:
        """Cut these values out of every later event."""
        self._secrets.update(v for v in values if len(v) >= MIN_SECRET_LENGTH)

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in sorted(self._secrets, key=len, reverse=True):
                value = value.replace(secret, REDACTED)
            return without_credentials(value)
        if isinstance(value, dict):
            return {k: self._redact(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._redact(v) for v in value]
        return value

    def emit(self, event: str, level: str = "info", message: str = "", **fields: Any) -> None:
        if not self._started and event != "command_start":
            self.start(self.command)  # the first line is always command_start
        record = {
            "ts": timestamp(time.time()),
            "level": level,
            "event": event,
            "command": self.command,
            "pid": os.getpid(),
            "message": message,
            **fields,
        }
        # ASCII: a file name that is not UTF-8 (a lone surrogate) still makes a valid line.
        line = json.dumps(self._redact(record), ensure_ascii=True, default=str) + "\n"
        with self._lock:
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr is gone: the log must not fail the command
                pass

    # --- the envelope ------------------------------------------------------------------------

    def start(self, command: str | None, **fields: Any) -> None:
        if self._started:
            return
        self._started = True
        self.command = command
        what = command or "dedupe"
        self.emit("command_start", "info", f"{what}: started", **fields)

    def result(self, result: Any) -> None:
        """What the command produced: its summary goes into `command_end`."""
        self._summary = summary(result)

    def end(self, exit_code: int, partial_exit: int | None = None) -> None:
        if self._ended:
            return
        self.start(self.command)
        self._ended = True
        level = "info" if exit_code == 0 else "warning" if exit_code == partial_exit else "error"
        fields: dict[str, Any] = {
            "exit_code": exit_code,
            "duration_seconds": round(time.monotonic() - self._t0, 3),
        }
        if self._summary is not None:
            fields["summary"] = self._summary
        what = self.command or "dedupe"
        self.emit("command_end", level, f"{what}: exit {exit_code}", **fields)

    def error(
        self,
        error: str,
        exit_code: int,
        message: str,
        hint: str | None = None,
        *,
        event: str = "error",
        **fields: Any,
    ) -> None:
        level = "warning" if event == "interrupted" else "error"
        self.emit(event, level, message, error=error, exit_code=exit_code, hint=hint, **fields)

    def crashed(self, exc: BaseException) -> None:
        """A bug: its traceback, as one event rather than free text on stderr."""
        self.error(
            type(exc).__name__,
            1,
            str(exc) or type(exc).__name__,
            "this is a bug in dedupe: please report it with the traceback",
            traceback="".join(traceback.format_exception(exc)),
        )

    # --- progress ----------------------------------------------------------------------------

    def progress_callback(self, interval: float = PROGRESS_INTERVAL) -> Callable[[Progress], None]:
        """A progress callback that logs each new stage at once and, within a stage, at most
        one event per `interval` seconds."""
        last: list[Any] = [None, 0.0]  # stage, monotonic time of the last event

        def report(p: Progress) -> None:
            now = time.monotonic()
            if p.stage == last[0] and now - last[1] < interval:
                return
            last[0], last[1] = p.stage, now
            fields = dataclasses.asdict(p)
            self.emit("progress", "info", f"{p.operation}: {p.stage}", **fields)

        return report


class JsonHandler(logging.Handler):
    """Records of the "dedupe" logger (and any other: asyncio's, Python's warnings) as
    `warning` events, at the record's own level."""

    def __init__(self, log: JsonLog) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not fail the command
            message = str(record.msg)
        level = record.levelname.lower()
        if level not in ("debug", "info", "warning", "error"):
            level = "error" if record.levelno >= logging.ERROR else "warning"
        self.log.emit("warning", level, message, logger=record.name)
