"""The `dedupe` command: a thin client of the embedding API (dedupe.api).

Every command takes --json for machines; humans get tables and, on a terminal, a progress
bar on stderr. Every failure dedupe anticipates is a DedupeError: printed as one message
with a hint and mapped to its exit code (docs/API.md lists them), never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

import dedupe
from dedupe.errors import DedupeError, Interrupted, ReaderGone, TargetError, Terminated
from dedupe.format.config import DEFAULT_COMPRESSION_LEVEL, DEFAULT_PACK_SIZE

# The API, the event loop, the structured log and even the crypto and chunking packages
# are imported by the commands that use them, not here: --help, --version and a usage
# error load none of them, and each command loads the engine code of its own operation
# only (see dedupe/api.py).
if TYPE_CHECKING:
    from dedupe._types import Progress
    from dedupe.api import Repository, Source, SubsetSpec
    from dedupe.chunking import ChunkerParams
    from dedupe.crypto import KdfParams
    from dedupe.logjson import JsonLog

T = TypeVar("T")
MiB = 1024 * 1024
PARTIAL_EXIT = 3  # a backup committed without some unreadable entries (restic's code too)
INTERRUPTED = "interrupted; the repository is valid, and what was committed before stays"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is available: the CLI, not the library, picks the loop."""
    import asyncio

    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:  # Windows, or a minimal install
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_stopped_by_sigterm_as_by_sigint(coro))


async def _stopped_by_sigterm_as_by_sigint(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro`; SIGTERM (what systemd and `timeout` send) cancels it as the Runner does
    on Ctrl-C, so that a backup indexes what it stored and every lock is released, and
    then raises Terminated. (Left to its default, SIGTERM ends the process on the spot,
    lock and all.)"""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not main thread)
        return await coro
    try:
        return await coro
    except asyncio.CancelledError:
        if terminated:
            raise Terminated(INTERRUPTED.replace("interrupted", "terminated (SIGTERM)")) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def emit_json(obj: Any, stream: Any = None) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True), file=stream)


def printable(text: object) -> str:
    """`text` with control characters escaped (`\\x1b`): names and messages that come from
    the repository (a writer chooses generation names; anyone with storage access chooses
    file names) must not drive the terminal."""
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


def count(n: int, noun: str) -> str:
    """ "1 pack", "2 packs", "0 packs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _flag(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.find_root().obj and ctx.find_root().obj.get(name))


def quiet() -> bool:
    """-q/--quiet: no progress bars and no notes (errors, results and --json as ever)."""
    return _flag("quiet")


def verbose() -> bool:
    """-v/--verbose: each stage of a long operation on stderr as it starts."""
    return _flag("verbose")


def stages(operation: str) -> Callable[[Progress], None] | None:
    """With --verbose, a progress callback that says each new stage on stderr; with
    --log-json (and not --quiet), one that logs stages and byte counts as events."""
    log = json_log()
    if log is not None:
        return None if quiet() else log.progress_callback()
    if not verbose():
        return None
    seen: list[str] = []

    def say(p: Progress) -> None:
        if not seen or seen[-1] != p.stage:
            seen.append(p.stage)
            click.echo(f"dedupe: {operation}: {p.stage}", err=True)

    return say


def both(
    a: Callable[[Progress], None] | None, b: Callable[[Progress], None] | None
) -> Callable[[Progress], None] | None:
    if a is None or b is None:
        return a or b

    def call(p: Progress) -> None:
        a(p)
        b(p)

    return call


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress bar on stderr when it is a terminal (and not --quiet), combined with
    the --verbose stage printer; None (no callback) when neither applies."""
    if not enabled or quiet() or not sys.stderr.isatty() or json_log() is not None:
        yield stages(label.split()[0])
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import (
        Progress as Bar,
    )

    bar = Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task(label, total=None)

    def update(p: Progress) -> None:
        done = p.bytes_read if p.operation == "backup" else p.bytes_written
        bar.update(task, completed=done, total=p.bytes_total, description=f"{label} ({p.stage})")

    with bar:
        yield both(update, stages(label.split()[0]))


def _stdout_to_devnull() -> None:
    """stdout's reader went away: do not let the interpreter's last flush of stdout
    complain at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def handle_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Map DedupeError to its exit code and message; --json gets a JSON error on stderr.
    With --push-metrics, the run (its time, outcome and result) goes to a Pushgateway."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        url = (click.get_current_context().find_root().obj or {}).get("push_metrics")
        if url is None:
            _report_errors(fn, *args, **kwargs)
            return
        started = time.monotonic()
        failure: str | None = None  # what the metrics call the way the command ended

        def observed(*a: Any, **k: Any) -> None:
            # Inside _report_errors, which turns an error into its exit code: the class
            # is seen here, before that.
            nonlocal failure
            try:
                fn(*a, **k)
            except SystemExit as e:
                if _exit_status(e.code):
                    failure = f"exit_{_exit_status(e.code)}"
                raise
            except BaseException as e:
                failure = type(e).__name__
                raise

        try:
            _report_errors(observed, *args, **kwargs)
        finally:
            _push_run(url, time.monotonic() - started, failure, kwargs)

    return wrapper


def _report_errors(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run a command: a DedupeError becomes its message on stderr and its exit code."""
    log = json_log()
    if log is not None:
        _run_logged(log, fn, *args, **kwargs)
        return
    as_json = kwargs.get("as_json", False)
    try:
        fn(*args, **kwargs)
    except ReaderGone as e:  # `restore GEN - | head`: end quietly, as cat would
        _stdout_to_devnull()
        sys.exit(e.exit_code)
    except DedupeError as e:
        if as_json:
            emit_json(
                {
                    "error": type(e).__name__,
                    "message": e.message,
                    "hint": e.hint,
                    "exit_code": e.exit_code,
                },
                sys.stderr,
            )
        else:
            click.echo(f"dedupe: error: {printable(e.message)}", err=True)
            if e.hint:
                click.echo(f"  hint: {printable(e.hint)}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo(f"dedupe: {INTERRUPTED}", err=True)
        sys.exit(Interrupted.exit_code)


# --- --push-metrics ---------------------------------------------------------------------------

_RESULT: dict[str, Any] = {}  # the command's result, as handed to _log_result


def _push_run(url: str, seconds: float, failure: str | None, params: dict[str, Any]) -> None:
    """Send one command's run to the Pushgateway at `url` (dedupe/metrics.py). A gateway
    that cannot be reached is a warning: the command's outcome stands."""
    from dedupe import logjson
    from dedupe.metrics import command_metrics, push

    ctx = click.get_current_context()
    command = _command_name(ctx) or "dedupe"
    location = (ctx.find_root().obj or {}).get("repo") or os.environ.get("DEDUPE_REPO") or ""
    name = params.get("name") if isinstance(params.get("name"), str) else None
    result = _RESULT.get("result")
    stats = result if command == "backup" and isinstance(result, dict) else None
    registry = command_metrics(
        command, logjson.scrub(location), seconds=seconds, error=failure, name=name, stats=stats
    )
    try:
        push(url, registry, command, name)
    except OSError as e:
        say_on_stderr(
            f"dedupe: warning: could not push metrics to {url}: {e}",
            "warning",
            "warning",
            logger="dedupe.metrics",
        )


# --- --log-json -------------------------------------------------------------------------------
# One JSON object per line on stderr instead of any text (dedupe/logjson.py; the events are
# listed in docs/OPERATIONS.md). One command runs per process: the log is the process's.

_LOG: JsonLog | None = None
_LOG_JSON_ENV = "DEDUPE_LOG_JSON"


def json_log() -> JsonLog | None:
    """The structured log when --log-json (or DEDUPE_LOG_JSON=1) is on, else None."""
    return _LOG


def _log_json_from(args: list[str], environ: Any) -> bool:
    """--log-json anywhere before a `--` (before click parses anything, so that even a
    usage error comes out as JSON), or DEDUPE_LOG_JSON set to 1, true, yes or on."""
    args = args[: args.index("--")] if "--" in args else args
    wanted = environ.get(_LOG_JSON_ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return "--log-json" in args or wanted


def _activate_log_json() -> JsonLog:
    """Start the structured log: records of every logger (the "dedupe" logger's warnings,
    asyncio's, Python's warnings) become events too, and nothing else writes to stderr."""
    import logging

    from dedupe.logjson import JsonHandler, JsonLog

    global _LOG
    if _LOG is None:
        _LOG = JsonLog()
        logging.getLogger().addHandler(JsonHandler(_LOG))
        logging.getLogger("dedupe").setLevel(logging.WARNING)
        logging.captureWarnings(True)
    return _LOG


def _deactivate_log_json() -> None:
    import logging

    from dedupe.logjson import JsonHandler

    global _LOG
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, JsonHandler)]:
        root.removeHandler(handler)
    logging.captureWarnings(False)
    _LOG = None


def _log_json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--log-json (before or after the command): main() has usually started the log
    already; a caller that runs `cli` itself (click's test runner) gets it here, for the
    one invocation."""
    if (value or _log_json_from([], os.environ)) and json_log() is None:
        _activate_log_json()
        ctx.find_root().call_on_close(_deactivate_log_json)


def _command_name(ctx: click.Context) -> str | None:
    """ "backup", "replica sync": the command path without the program's name."""
    return " ".join(ctx.command_path.split()[1:]) or None


def _exit_status(code: object) -> int:
    """SystemExit's code as the process's exit status."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _log_start(log: JsonLog, ctx: click.Context) -> None:
    from dedupe import logjson

    params = dict(ctx.params)
    for name in logjson.SECRET_OPTIONS:  # also out of any message that quotes them
        if isinstance(params.get(name), str):
            log.hide(logjson.spellings(params[name]))
    root = ctx.find_root().obj or {}
    location = root.get("repo") if ctx.command.name != "bench" else None
    log.start(
        _command_name(ctx),
        version=dedupe.__version__,
        repository=logjson.scrub(str(location)) if location else None,
        options=logjson.options(params),
    )


def _log_click_error(log: JsonLog, e: click.ClickException) -> None:
    """click's usage errors (exit 2), which it would print after a usage line."""
    hint = None
    ctx = e.ctx if isinstance(e, click.UsageError) else None
    ctx = ctx or click.get_current_context(silent=True)  # raised by a command itself
    if ctx is not None:
        if log.command is None:
            log.command = _command_name(ctx)
        hint = f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help."
    log.error(type(e).__name__, e.exit_code, e.format_message(), hint)


def _run_logged(log: JsonLog, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """handle_errors under --log-json: the same exit codes, said as events, between a
    command_start and a command_end."""
    _log_start(log, click.get_current_context())
    code = 0
    try:
        fn(*args, **kwargs)
    except ReaderGone as e:  # as without --log-json: a reader that stopped is no error
        _stdout_to_devnull()
        code = e.exit_code
    except DedupeError as e:
        event = "interrupted" if isinstance(e, Interrupted) else "error"
        log.error(type(e).__name__, e.exit_code, e.message, e.hint, event=event)
        code = e.exit_code
    except KeyboardInterrupt:
        code = Interrupted.exit_code
        log.error(Interrupted.__name__, code, INTERRUPTED, event="interrupted")
    except click.ClickException as e:
        _log_click_error(log, e)
        code = e.exit_code
    except SystemExit as e:  # a partial backup's 3
        code = _exit_status(e.code)
    log.end(code, PARTIAL_EXIT)
    if code:
        sys.exit(code)


def _main_logging_json() -> None:
    """main() under --log-json: click's own reports (usage errors, "Aborted!") and any
    traceback become events too, and command_end is always the last line."""
    import errno

    log = _activate_log_json()
    code = 1
    try:
        rv = cli.main(prog_name="dedupe", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0  # --help and --version return 0
    except SystemExit as e:
        code = _exit_status(e.code)
    except click.ClickException as e:
        _log_click_error(log, e)
        code = e.exit_code
    except click.Abort:  # Ctrl-C or end of input outside a command (a prompt)
        log.error("Abort", 1, "Aborted!", event="interrupted")
    except OSError as e:
        if e.errno != errno.EPIPE:
            log.crashed(e)
        else:  # stdout's reader went away, as click's standalone mode takes it
            _stdout_to_devnull()
    except Exception as e:
        log.crashed(e)
    log.end(code, PARTIAL_EXIT)
    sys.exit(code)


def _log_result(result: Any) -> None:
    """The command's result, whose summary command_end carries under --log-json (and
    --push-metrics its bytes)."""
    _RESULT["result"] = result
    log = json_log()
    if log is not None:
        log.result(result)


def say_on_stderr(
    text: str, event: str, level: str = "info", message: str | None = None, **fields: Any
) -> None:
    """A line for stderr: `text` as it is, or under --log-json `event` with `message`
    (default: `text`) and `fields`."""
    log = json_log()
    if log is None:
        click.echo(text, err=True)
    else:
        log.emit(event, level, text if message is None else message, **fields)


def open_repo(ctx: click.Context) -> Awaitable[Repository]:
    from dedupe.api import Repository

    options = ctx.find_root().obj
    return Repository.open(
        repo_location(ctx),
        lock_wait=options.get("retry_lock", 0.0),
        cache=options.get("cache"),
    )


_WAIT_UNITS = {"s": 1, "m": 60, "h": 3600}


def _retry_lock(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """'30s', '5m', '1h', '1m30s' or plain seconds -> seconds (restic's --retry-lock)."""
    if value is None:
        return None
    text = value.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smh]?)", text)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)([smh]?)", "", text):
        raise click.BadParameter(f"{value!r} is not a duration: use e.g. 30s, 5m, 1h or 1m30s")
    return sum(float(n) * _WAIT_UNITS[u or "s"] for n, u in parts)


def repo_location(ctx: click.Context) -> str:
    location = ctx.obj["repo"]
    if not location:
        raise click.UsageError("no repository given: use -r/--repo or set DEDUPE_REPO")
    return str(location)


def _source_name(value: str) -> str:
    if not value or "/" in value or "@" in value:
        raise click.BadParameter(
            f"{value!r}: a name is non-empty, without '/' or '@' (e.g. orders-db)"
        )
    return value


def _chunker(value: str | None) -> str | None:
    if value is not None:
        from dedupe.chunking import DEFAULT_PARAMS, parse_spec

        try:
            parse_spec(value, DEFAULT_PARAMS)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


class LibraryDefault(click.Option):
    """An option whose `default` is a function that looks a default up in the library
    (the chunker's sizes, the KDF's cost): called when the command runs or its help is
    shown, which then prints the value rather than "(dynamic)". Defining the commands
    does not import the chunking and crypto packages for `dedupe --help`."""

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return super().get_default(ctx, call=True)


def _default_chunker() -> ChunkerParams:
    from dedupe.chunking import DEFAULT_PARAMS

    return DEFAULT_PARAMS


def _default_kdf() -> KdfParams:
    from dedupe.crypto import KdfParams

    return KdfParams()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-r", "--repo", envvar="DEDUPE_REPO", metavar="PATH", help="Repository (or DEDUPE_REPO)."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no notes.")
@click.option("-v", "--verbose", is_flag=True, help="Say each stage of long operations.")
@click.option(
    "--log-json",
    is_flag=True,
    expose_value=False,
    callback=_log_json_flag,
    help="Write stderr as JSON Lines, one object per event, for journald and log shippers "
    "(or DEDUPE_LOG_JSON=1).",
)
@click.option(
    "--retry-lock",
    metavar="DURATION",
    callback=_retry_lock,
    help="Wait up to DURATION (30s, 5m, 1h) for a conflicting lock to go [default: fail at once].",
)
@click.option(
    "--cache-dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Cache key maps, index objects and headers here (or DEDUPE_CACHE_DIR) "
    "[default: ~/.cache/dedupe, for object stores].",
)
@click.option("--no-cache", is_flag=True, help="Use no local cache, even for object stores.")
@click.option(
    "--push-metrics",
    metavar="URL",
    envvar="DEDUPE_PUSH_METRICS",
    help="Send each command's run (duration, outcome, a backup's bytes) to the Prometheus "
    "Pushgateway at URL (or DEDUPE_PUSH_METRICS).",
)
@click.version_option(dedupe.__version__, prog_name="dedupe")
@click.pass_context
def cli(
    ctx: click.Context,
    repo: str | None,
    quiet: bool,
    verbose: bool,
    retry_lock: float | None,
    cache_dir: str | None,
    no_cache: bool,
    push_metrics: str | None,
) -> None:
    """dedupe: deduplicating, encrypted backups of database snapshots.

    The passphrase comes from DEDUPE_PASSWORD, DEDUPE_PASSWORD_FILE, DEDUPE_PASSWORD_COMMAND,
    or a prompt on a terminal.
    """
    if no_cache and cache_dir:
        raise click.UsageError("--cache-dir and --no-cache exclude each other")
    ctx.obj = {
        "repo": repo,
        "quiet": quiet,
        "verbose": verbose,
        "retry_lock": retry_lock or 0.0,
        "cache": False if no_cache else cache_dir,
        "push_metrics": push_metrics or None,
    }


@cli.command()
@click.option(
    "--chunk-min",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_chunker().min_size,
    show_default=True,
    help="FastCDC minimum chunk size in bytes.",
)
@click.option(
    "--chunk-avg",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_chunker().avg_size,
    show_default=True,
    help="FastCDC average chunk size in bytes (a power of two).",
)
@click.option(
    "--chunk-max",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_chunker().max_size,
    show_default=True,
    help="FastCDC maximum chunk size in bytes.",
)
@click.option(
    "--pack-size",
    type=click.IntRange(1, 1024),
    default=DEFAULT_PACK_SIZE // MiB,
    show_default=True,
    help="Target pack size in MiB.",
)
@click.option(
    "--compression-level",
    type=click.IntRange(1, 22),
    default=DEFAULT_COMPRESSION_LEVEL,
    show_default=True,
    help="zstd level.",
)
@click.option(
    "--kdf-memlimit",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_kdf().memlimit // MiB,
    show_default=True,
    help="Argon2id memory in MiB for the key file.",
)
@click.option(
    "--kdf-opslimit",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_kdf().opslimit,
    show_default=True,
    help="Argon2id passes for the key file.",
)
@json_option
@click.pass_context
@handle_errors
def init(
    ctx: click.Context,
    chunk_min: int,
    chunk_avg: int,
    chunk_max: int,
    pack_size: int,
    compression_level: int,
    kdf_memlimit: int,
    kdf_opslimit: int,
    as_json: bool,
) -> None:
    """Create a new, encrypted repository."""
    from dedupe.chunking import DEFAULT_PARAMS, ChunkerParams
    from dedupe.crypto import KdfParams

    location = repo_location(ctx)
    try:
        params = ChunkerParams(chunk_min, chunk_avg, chunk_max, DEFAULT_PARAMS.normalization)
        kdf = KdfParams(kdf_opslimit, kdf_memlimit * MiB)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None

    async def go() -> dict[str, Any]:
        from dedupe.api import Repository

        repo = await Repository.init(
            location,
            chunker=params,
            pack_size=pack_size * MiB,
            compression_level=compression_level,
            kdf=kdf,
        )
        async with repo:
            return {"id": repo.id, "location": repo.location, "config": repo.config}

    result = run_async(go())
    _log_result(result)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"created repository {result['id'][:16]} at {result['location']}")
        click.echo("keep the passphrase safe: without it the data cannot be read")


@cli.command(short_help="Back up a file, a tree, stdin, a database or a command.")
@click.argument("source", required=False)
@click.option(
    "--from-command",
    "from_command",
    metavar="COMMAND",
    help="Back up what COMMAND writes to its standard output (e.g. 'pg_dump -Fc -Z0 db'; "
    "split as a shell would, run without one). If it fails, is killed or writes nothing, "
    "nothing is committed and the error quotes its standard error.",
)
@click.option(
    "--name",
    required=True,
    callback=lambda _ctx, _param, value: _source_name(value),
    help="Name of the source (e.g. orders-db).",
)
@click.option(
    "--type",
    "kind",
    type=click.Choice(["full", "incremental", "differential"]),
    default="incremental",
    show_default=True,
    help="incremental: delta against the latest generation of NAME; differential: "
    "against its latest full. Without a full yet, a full is made.",
)
@click.option(
    "--chunker",
    default=None,
    callback=lambda _ctx, _param, value: _chunker(value),
    help="fastcdc; auto (SQLite databases in blocks of their page size: a third of the "
    "incremental, a slightly larger and slower first full; tars such as pgbase: member by "
    "member, PostgreSQL relation files in pages); tar; or fixed:SIZE. Default: the "
    "chunker of NAME's latest generation (auto for a new name); a change stores the "
    "data again, and the note says how much.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave out tree entries matching PATTERN: '*.log' by name at any depth, "
    "'var/tmp' by path from the tree's root. Repeatable.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="TAG",
    help="Label the generation (repeatable); 'generations --tag TAG' lists those with it.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Read and chunk the source and say what would be new; store nothing.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail if any entry of a tree cannot be read; without it such entries are left out, "
    "listed, and the command exits 3 (a partial backup).",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Store a source of no bytes (or an empty directory) as a generation; without it "
    "an empty source is refused (exit 53), as a failed dump in a pipe looks empty.",
)
@json_option
@click.pass_context
@handle_errors
def backup(
    ctx: click.Context,
    source: str | None,
    from_command: str | None,
    name: str,
    kind: str,
    chunker: str | None,
    exclude: tuple[str, ...],
    tags: tuple[str, ...],
    dry_run: bool,
    strict: bool,
    allow_empty: bool,
    as_json: bool,
) -> None:
    """Back up SOURCE as a new generation of NAME: a file, a directory tree, - for
    standard input, pg:DBNAME (a PostgreSQL database: pg_dump -Fc -Z0, connection from
    libpq's environment, PGHOST, PGUSER, ~/.pgpass...), pgbase: (the whole server,
    physically: pg_basebackup -D - -Ft -X fetch), sqlite:PATH (a live SQLite
    database, snapshotted with its online backup API), or what --from-command writes.

    Prefer --from-command to a pipe: dedupe then sees the dump's exit status. In a
    pipeline, run the shell with `set -o pipefail`, so that a dump that fails fails the
    pipeline too: dedupe sees only what the dump wrote before it failed."""
    from dedupe.api import Command

    if (source is None) == (from_command is None):
        raise click.UsageError("give a SOURCE or --from-command COMMAND (one of them)")
    command = None
    if from_command is not None:
        try:
            command = Command.parse(from_command)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--from-command") from None
    if exclude and (source is None or source == "-" or not os.path.isdir(source)):
        raise click.BadParameter("applies to directory trees only", param_hint="--exclude")
    for tag in tags:
        if not tag or "," in tag or not tag.isprintable():
            raise click.BadParameter(f"{tag!r}: printable, non-empty, no ','", param_hint="--tag")

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            stdin = source == "-"
            what: Any = command or (sys.stdin.buffer if stdin else source)
            if source is not None and _names_a_database(source):
                what = await _database_source(source)
            with progress_bar(not as_json, f"backup {name}") as callback:
                stats = await repo.backup(
                    what,
                    name=name,
                    kind=kind,
                    progress=callback,
                    label="<stdin>" if stdin else None,
                    chunker=chunker,
                    allow_empty=allow_empty,
                    exclude=exclude,  # refused above for anything but a directory
                    strict=strict,
                    tags=tags,
                    dry_run=dry_run,
                )
            return stats.to_dict()

    s = run_async(go())
    _log_result(s)
    if s.get("note") and (not quiet() or s["unreadable"]):  # a partial backup is always said
        say_on_stderr(
            f"dedupe: note: {printable(s['note'])}",
            "note",
            "warning" if s["unreadable"] else "info",
            s["note"],
        )
    if as_json:
        emit_json(s)
    else:
        _print_backup(name, s)
    if s["unreadable"]:  # committed, but not everything: say so in the exit status too
        sys.exit(PARTIAL_EXIT)


def _names_a_database(source: str) -> bool:
    return source == "pgbase:" or source.startswith(("pg:", "sqlite:"))


async def _database_source(source: str) -> Source:
    """The API's source for `pgbase:`, `pg:DBNAME` or `sqlite:PATH`."""
    from dedupe.api import SQLiteDatabase, postgres_basebackup, postgres_dump

    if source == "pgbase:":
        return await postgres_basebackup()
    if source.startswith("pg:"):
        return await postgres_dump(source[3:])
    return SQLiteDatabase(source.removeprefix("sqlite:"))


def _print_backup(name: str, s: dict[str, Any]) -> None:
    mbs = s["bytes_read"] / s["seconds"] / 1e6 if s["seconds"] else 0.0
    if not s["id"]:  # a dry run
        click.echo(
            f"dry run, {s['kind']} of {name}: would read {human_bytes(s['bytes_read'])} in "
            f"{count(s['chunks'], 'chunk')}, {s['chunks_new']} new "
            f"({human_bytes(s['bytes_new'])} before compression); nothing was stored"
        )
        return
    click.echo(
        f"{s['kind']} generation {s['id'][:12]} of {name}: read {human_bytes(s['bytes_read'])} in "
        f"{count(s['chunks'], 'chunk')}, {s['chunks_new']} new ({human_bytes(s['bytes_new'])}), "
        f"stored {human_bytes(s['bytes_stored'])} in {count(s['packs'], 'pack')}, "
        f"{s['seconds']:.2f} s "
        f"({mbs:.0f} MB/s)"
    )


@cli.command()
@click.option("--name", default=None, help="Only generations of this source.")
@click.option("--tag", default=None, help="Only generations with this tag.")
@json_option
@click.pass_context
@handle_errors
def generations(ctx: click.Context, name: str | None, tag: str | None, as_json: bool) -> None:
    """List generations, oldest first."""

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            gens = await repo.generations(name)
            return [g.to_dict() for g in gens if tag is None or tag in g.tags]

    gens = run_async(go())
    if as_json:
        emit_json(gens)
        return
    if not gens:
        click.echo("no generations")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None)
    from dedupe.chunking import describe

    columns = ("id", "name", "type", "parent", "created (UTC)", "host", "tags", "chunker")
    for col in (*columns, "size", "new stored", "dedupe"):
        table.add_column(
            col, justify="right" if col in ("size", "new stored", "dedupe") else "left"
        )
    for g in gens:
        ratio = f"{g['dedupe_ratio']:.1f}x" if g["dedupe_ratio"] is not None else "all dup"
        table.add_row(
            g["id"][:12],
            Text(printable(g["name"])),  # a Text: no markup in a name is interpreted
            g["kind"],
            (g["parent"] or "-")[:12],
            g["created"][:16].replace("T", " "),
            Text(printable(g["host"] or "-")),
            Text(printable(",".join(g["tags"]) or "-")),
            Text(printable(describe(g["chunker"]) if g["chunker"] else "-")),
            human_bytes(g["size"]),
            human_bytes(g["stored_bytes"]),
            ratio,
        )
    console = Console()
    if not console.is_terminal:  # piped: no terminal width to fit, so do not truncate
        console = Console(width=200)
    console.print(table)


def _print_table(columns: list[str], rows: list[list[Any]], right: set[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    for row in rows:
        table.add_row(*(Text(printable(cell)) for cell in row))  # no markup is interpreted
    console = Console()
    if not console.is_terminal:  # piped: no terminal width to fit, so do not truncate
        console = Console(width=200)
    console.print(table)


def _utc(ns: int | None) -> str:
    if ns is None:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


@cli.command(short_help="Space per source: logical, unique and stored bytes.")
@click.option("--name", default=None, help="Only this source.")
@json_option
@click.pass_context
@handle_errors
def stats(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Space per source name and in total: the logical bytes of its generations, the
    unique bytes of the distinct chunks they reference, and those chunks' stored
    (compressed, sealed) bytes. The dedupe ratio (logical / unique) and the compression
    ratio (unique / stored) are shown apart. A chunk shared by several names counts in
    each of them, and once in the total."""

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            return [s.to_dict() for s in await repo.stats(name)]

    groups = run_async(go())
    if as_json:
        emit_json(groups)
        return
    rows = [
        [
            "(total)" if g["name"] is None else g["name"],
            str(g["generations"]),
            human_bytes(g["logical_bytes"]),
            human_bytes(g["unique_bytes"]),
            human_bytes(g["stored_bytes"]),
            f"{g['dedupe_ratio']:.2f}x",
            f"{g['compression_ratio']:.2f}x",
        ]
        for g in groups
    ]
    columns = ["name", "generations", "logical", "unique", "stored", "dedupe", "compression"]
    _print_table(columns, rows, set(columns) - {"name"})
    missing = groups[-1]["missing_chunks"]
    if missing:
        click.echo(f"{count(missing, 'chunk')} in no index object: run 'dedupe verify'")


@cli.command(short_help="List what a generation holds.")
@click.argument("generation")
@click.argument("path", required=False)
@json_option
@click.pass_context
@handle_errors
def ls(ctx: click.Context, generation: str, path: str | None, as_json: bool) -> None:
    """List GENERATION: a tree's entries at or below PATH (mode, size, modification time
    in UTC), or a stream's size, chunks and digest."""
    import stat as stat_mod

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            return await repo.ls(generation, path)

    entries = run_async(go())
    if as_json:
        emit_json(entries)
        return
    for e in entries:
        if e["type"] == "stream":
            click.echo(
                printable(
                    f"stream  {human_bytes(e['size'])}  {count(e['chunks'], 'chunk')}  "
                    f"digest {e['digest']}  {e['path']}"
                )
            )
            continue
        kind = {
            "file": stat_mod.S_IFREG,
            "hardlink": stat_mod.S_IFREG,
            "dir": stat_mod.S_IFDIR,
            "symlink": stat_mod.S_IFLNK,
            "fifo": stat_mod.S_IFIFO,
            "chardev": stat_mod.S_IFCHR,
            "blockdev": stat_mod.S_IFBLK,
        }.get(e["type"], 0)
        mode = stat_mod.filemode(kind | stat_mod.S_IMODE(e.get("mode", 0)))
        target = f" -> {e['target']}" if "target" in e else ""
        click.echo(
            printable(
                f"{mode} {e.get('size', 0):>12} {_utc(e.get('mtime_ns'))}  {e['path']}{target}"
            )
        )


@cli.command(short_help="What changed between two generations.")
@click.argument("old")
@click.argument("new")
@json_option
@click.pass_context
@handle_errors
def diff(ctx: click.Context, old: str, new: str, as_json: bool) -> None:
    """What changed from generation OLD to NEW: for trees, entries added (+), removed (-)
    and changed (M, with what changed); for streams, the byte ranges of NEW whose chunks
    OLD does not have, and how many new bytes that is."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return await repo.diff(old, new)

    try:
        r = run_async(go())
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        emit_json(r)
        return
    if r["type"] == "stream":
        ranges = r["changed_ranges"]
        click.echo(
            f"{human_bytes(r['old_size'])} -> {human_bytes(r['new_size'])}: "
            f"{human_bytes(r['new_bytes'])} new in {count(len(ranges), 'range')}"
        )
        for a, b in ranges[:50]:
            click.echo(f"  bytes {a}..{b} ({human_bytes(b - a)})")
        if len(ranges) > 50:
            click.echo(f"  ... and {len(ranges) - 50} more (--json lists all)")
        return
    for entry in r["added"]:
        click.echo(printable(f"+ {entry['path']}"))
    for entry in r["removed"]:
        click.echo(printable(f"- {entry['path']}"))
    for entry in r["changed"]:
        click.echo(printable(f"M {entry['path']} ({', '.join(entry['changed'])})"))
    click.echo(f"{len(r['added'])} added, {len(r['removed'])} removed, {len(r['changed'])} changed")


@cli.command(short_help="Restore a generation to a file, directory, stdout or command.")
@click.argument("generation")
@click.argument("target", required=False)
@click.option(
    "--to-command",
    "to_command",
    metavar="COMMAND",
    help="Write the generation into COMMAND's standard input (e.g. 'pg_restore -d newdb'); "
    "fails if COMMAND fails or stops reading.",
)
@click.option(
    "--into-db",
    "into_db",
    metavar="NEWDB",
    help="Create PostgreSQL database NEWDB and fill it from a pg: generation (pg_restore); "
    "dropped again if that fails.",
)
@click.option(
    "--into-datadir",
    "into_datadir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Unpack a pgbase: generation into DIR (new or empty): a data directory to start.",
)
@click.option(
    "--tablespace-map",
    "tablespace_map",
    metavar="OLD=NEW",
    multiple=True,
    help="With --into-datadir: unpack tablespace OLD (its oid, or its location on the "
    "server) into directory NEW (new or empty) instead of DIR_tablespaces/<oid>. "
    "Repeatable, as pg_basebackup's --tablespace-mapping.",
)
@click.option("--overwrite", is_flag=True, help="Replace TARGET if it exists.")
@click.option("--force", is_flag=True, help="Write to standard output even if it is a terminal.")
@json_option
@click.pass_context
@handle_errors
def restore(
    ctx: click.Context,
    generation: str,
    target: str | None,
    to_command: str | None,
    into_db: str | None,
    into_datadir: str | None,
    tablespace_map: tuple[str, ...],
    overwrite: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Restore GENERATION (an id, a unique prefix, or NAME@latest; latest when the
    repository holds one name) to TARGET: a path, a directory (the file goes in under the
    name it was backed up as, with its mode and modification time), or - for standard
    output. The bytes are verified before they are written."""
    from dedupe.api import Command

    if [target, to_command, into_db, into_datadir].count(None) != 3:
        raise click.UsageError(
            "give one of TARGET, --to-command COMMAND, --into-db NEWDB, --into-datadir DIR"
        )
    if tablespace_map and into_datadir is None:
        raise click.UsageError("--tablespace-map goes with --into-datadir")
    tablespaces: dict[str, str] = {}
    for mapping in tablespace_map:
        old, sep, new = mapping.partition("=")
        if not (sep and old and new) or old in tablespaces:
            raise click.BadParameter(
                f"{mapping!r}: give OLD=NEW once per tablespace (OLD its oid or its location)",
                param_hint="--tablespace-map",
            )
        tablespaces[old] = new
    command = None
    if to_command is not None:
        try:
            command = Command.parse(to_command)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--to-command") from None
    if target == "-" and not force and sys.stdout.isatty():
        raise TargetError(
            "standard output is a terminal: refusing to write a binary stream to it",
            hint="redirect it to a file or a pipe, give a path, or pass --force",
        )

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            to_stdout = target == "-"
            with progress_bar(not as_json and not to_stdout, "restore") as callback:
                if into_datadir is not None:
                    stats = await repo.restore_into_datadir(
                        generation, into_datadir, tablespaces=tablespaces, progress=callback
                    )
                elif into_db is not None:
                    stats = await repo.restore_into_postgres(generation, into_db, progress=callback)
                elif command is not None:
                    stats = await repo.restore(generation, command, progress=callback)
                elif to_stdout:
                    stats = await repo.restore(generation, sys.stdout.buffer, progress=callback)
                else:
                    assert target is not None
                    stats = await repo.restore(
                        generation, target, overwrite=overwrite, progress=callback
                    )
            return stats.to_dict()

    s = run_async(go())
    _log_result(s)
    out = sys.stderr if target == "-" else None
    if as_json and (out is None or json_log() is None):  # --log-json: stderr holds events only
        emit_json(s, out)
    elif target != "-":
        mbs = s["bytes_written"] / s["seconds"] / 1e6 if s["seconds"] else 0.0
        click.echo(
            f"restored generation {s['id'][:12]} to "
            f"{target or to_command or into_db or into_datadir}: "
            f"{human_bytes(s['bytes_written'])}, verified, {s['seconds']:.2f} s ({mbs:.0f} MB/s)"
        )
        if s.get("note"):
            click.echo(f"note: {printable(s['note'])}")


# --- verify -----------------------------------------------------------------------------------


def _subset_option(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> SubsetSpec | None:
    from dedupe.engine.verify import parse_subset

    if value is None:
        return None
    try:
        return parse_subset(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


@cli.command(short_help="Check the repository's structure and, optionally, its data.")
@click.option("--read-data", is_flag=True, help="Also read every pack and open every blob.")
@click.option(
    "--read-data-subset",
    "subset",
    metavar="N%|n/t",
    callback=_subset_option,
    help="Read only part of the packs: a random N% of them, or the n-th of t fixed slices "
    "(run 1/t .. t/t on successive days to cover everything).",
)
@click.option(
    "--no-quarantine",
    is_flag=True,
    help="Write no quarantine record for damaged chunks (read-only repositories).",
)
@click.option(
    "--no-repair",
    is_flag=True,
    help="Do not store lost chunks again from a replica (admin keys do by default).",
)
@json_option
@click.pass_context
@handle_errors
def verify(
    ctx: click.Context,
    read_data: bool,
    subset: SubsetSpec | None,
    no_quarantine: bool,
    no_repair: bool,
    as_json: bool,
) -> None:
    """Check the repository: its structure always; with --read-data (or a subset) also the
    data. Damaged or missing objects are named with the generations they break; the exit
    code is 0 when all is well, else that of VerifyFailed."""
    import dataclasses

    from dedupe.errors import VerifyFailed

    if read_data and subset is not None:
        raise click.UsageError("give --read-data or --read-data-subset, not both")

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            with progress_bar(not as_json, "verify") as callback:
                # The bar shows bytes_written for anything but a backup: verify reads.
                cb = (
                    callback
                    if callback is None or json_log() is not None
                    else lambda p: callback(dataclasses.replace(p, bytes_written=p.bytes_read))
                )
                report = await repo.verify(
                    read_data,
                    subset,
                    progress=cb,
                    quarantine=not no_quarantine,
                    repair=not no_repair,
                )
            return report.to_dict()

    r = run_async(go())
    _log_result(r)
    if as_json:
        emit_json(r)
    else:
        _print_verify(r)
    if not r["ok"]:
        raise VerifyFailed(
            f"{len(r['damaged'])} damaged or missing objects"
            + (f"; quarantine record {r['quarantine']} written" if r["quarantine"] else ""),
            hint=_verify_hint({d["kind"] for d in r["damaged"]}),
        )


def _verify_hint(kinds: set[str]) -> str:
    hints = []
    if kinds & {"pack", "index"}:
        hints.append("a full backup of each affected source stores the lost chunks again")
    if "generation" in kinds:
        hints.append(
            "a damaged generation cannot be restored: 'dedupe forget ID' removes it (its "
            "chunks are not lost; the next backup of its source is made as a full)"
        )
    if "keyring" in kinds:
        hints.append("an admin's 'dedupe prune' rewrites a damaged keyring copy from the good one")
    if kinds & {"keymap", "quarantine"}:
        hints.append(
            "objects no key map vouches for were not written by a key of this repository: "
            "an admin's 'dedupe prune' removes them"
        )
    return "; ".join(hints)


def _print_verify(r: dict[str, Any]) -> None:
    what = "structure"
    if r["read_data"]:
        what += " and data" if r["subset"] is None else f" and data (subset {r['subset']})"
    click.echo(
        f"verified {what}: {count(r['generations'], 'generation')}, "
        f"{count(r['index_objects'], 'index object')}, {count(r['packs'], 'pack')}, "
        f"{count(r['chunks'], 'chunk')}"
    )
    if r["read_data"]:
        click.echo(
            f"read {count(r['packs_read'], 'pack')} ({human_bytes(r['bytes_read'])}), opened "
            f"{count(r['chunks_read'], 'blob')} in {r['seconds']:.2f} s"
        )
    if r["packs_unindexed"]:
        n = r["packs_unindexed"]
        click.echo(
            f"{count(n, 'pack')} {'is' if n == 1 else 'are'} in no index object (not damage)"
        )
    for d in r["damaged"]:
        click.echo(printable(f"DAMAGED {d['kind']} {d['name']}: {d['reason']}"))
        for line in d["details"][:5]:
            click.echo(f"    {printable(line)}")
        if d["chunk_ids"]:
            shown = ", ".join(c[:16] for c in d["chunk_ids"][:4])
            more = f" and {len(d['chunk_ids']) - 4} more" if len(d["chunk_ids"]) > 4 else ""
            click.echo(f"  chunks ({len(d['chunk_ids'])}): {shown}{more}")
        if d["generations"]:
            click.echo(f"  affects generations: {', '.join(g[:12] for g in d['generations'])}")
    for h in r["repaired"]:
        click.echo(
            f"repaired {h['generation'][:12]} ({printable(h['name'])}) from replica "
            f"{h['replica']}: {count(h['chunks_lost'], 'lost chunk')} stored again"
        )
    for note in r["notes"]:
        click.echo(f"note: {printable(note)}")
    if r["ok"]:
        click.echo("no damage found")


# --- forget and prune --------------------------------------------------------------------------


@cli.command(short_help="Remove generations by retention rules or by id.")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--name", default=None, help="Apply the keep rules to this source only.")
@click.option(
    "--keep-last",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Keep the N newest generations (and the chains they need).",
)
@click.option(
    "--keep-full",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Keep the N newest fulls and every generation depending on them.",
)
@click.option(
    "--keep-within",
    default=None,
    metavar="DURATION",
    help="Keep generations younger than this (12h, 30d, 2w, 1y), with their chains.",
)
@click.option(
    "--keep-daily",
    type=click.IntRange(min=1),
    metavar="N",
    help="For the N latest days with generations, keep the newest of each (as restic).",
)
@click.option(
    "--keep-weekly", type=click.IntRange(min=1), metavar="N", help="Likewise per ISO week."
)
@click.option("--keep-monthly", type=click.IntRange(min=1), metavar="N", help="Per month.")
@click.option("--keep-yearly", type=click.IntRange(min=1), metavar="N", help="Per year.")
@click.option(
    "--with-dependents",
    is_flag=True,
    help="Removing a named ID also removes the generations that depend on it.",
)
@click.option("--dry-run", is_flag=True, help="Only print what would be removed.")
@json_option
@click.pass_context
@handle_errors
def forget(
    ctx: click.Context,
    ids: tuple[str, ...],
    name: str | None,
    keep_last: int | None,
    keep_full: int | None,
    keep_within: str | None,
    keep_daily: int | None,
    keep_weekly: int | None,
    keep_monthly: int | None,
    keep_yearly: int | None,
    with_dependents: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove generations by retention rules (per source name) or by ID. Only manifests
    are deleted; run 'dedupe prune' to free the space. A generation that a kept one
    depends on is never removed. Without any rule or ID nothing is removed."""
    from dedupe.engine.forget import DependentsBlock, parse_duration

    try:
        within = parse_duration(keep_within) if keep_within is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--keep-within") from None
    calendar = {
        "keep_daily": keep_daily,
        "keep_weekly": keep_weekly,
        "keep_monthly": keep_monthly,
        "keep_yearly": keep_yearly,
    }
    rules = (keep_last, keep_full, within, *calendar.values())
    if not ids and all(rule is None for rule in rules):
        raise click.UsageError(
            "give a retention rule (--keep-last, --keep-full, --keep-within, --keep-daily, "
            "--keep-weekly, --keep-monthly, --keep-yearly) or generation IDs; nothing is "
            "forgotten by default"
        )

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            report = await repo.forget(
                name=name,
                keep_last=keep_last,
                keep_full=keep_full,
                keep_within=within,
                ids=ids,
                with_dependents=with_dependents,
                dry_run=dry_run,
                **calendar,
            )
            return report.to_dict()

    try:
        r = run_async(go())
    except DependentsBlock as e:
        raise click.UsageError(
            str(e).replace("with_dependents=True", "--with-dependents")
        ) from None
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    _log_result(r)
    if as_json:
        emit_json(r)
        return
    verb = "would remove" if dry_run else "removed"
    for d in r["kept"]:
        click.echo(
            f"keep    {d['id'][:12]}  {printable(d['name']):<16} {d['kind']:<12} "
            f"{d['created'][:19].replace('T', ' ')}  {'; '.join(d['reasons'])}"
        )
    for d in r["removed"]:
        click.echo(
            f"remove  {d['id'][:12]}  {printable(d['name']):<16} {d['kind']:<12} "
            f"{d['created'][:19].replace('T', ' ')}  {'; '.join(d['reasons'])}"
        )
    click.echo(
        f"{verb} {count(len(r['removed']), 'generation')}, kept {len(r['kept'])}"
        + ("" if dry_run or not r["removed"] else "; run 'dedupe prune' to free space")
    )


@cli.command()
@click.option(
    "--repack-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Rewrite packs whose unused fraction exceeds this (1 = never repack).",
)
@click.option("--dry-run", is_flag=True, help="Only print what would be freed.")
@click.option(
    "--delete-unauthenticated",
    is_flag=True,
    help="Also delete manifests, index objects, key maps and dictionaries no key of this "
    "repository vouches for (which 'dedupe verify' names): only once you know they were "
    "planted; and dictionary objects no reader can ever use (a misplaced copy is put back "
    "under its true name first).",
)
@json_option
@click.pass_context
@handle_errors
def prune(
    ctx: click.Context,
    repack_threshold: float,
    dry_run: bool,
    delete_unauthenticated: bool,
    as_json: bool,
) -> None:
    """Free the space of data no generation references any more. Takes the exclusive lock;
    safe to interrupt at any moment (running it again finishes the job)."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            report = await repo.prune(
                repack_threshold=repack_threshold,
                dry_run=dry_run,
                delete_unauthenticated=delete_unauthenticated,
                progress=stages("prune"),
            )
            return report.to_dict()

    r = run_async(go())
    _log_result(r)
    if as_json:
        emit_json(r)
        return
    verb = "would free" if dry_run else "freed"
    click.echo(
        f"{verb} {human_bytes(r['bytes_freed'])}: {count(r['packs_deleted'], 'pack')} deleted, "
        f"{r['packs_repacked']} repacked into {r['packs_written']}, "
        f"{count(r['chunks_removed'], 'chunk')} dropped from the index; "
        f"{human_bytes(r['bytes_after'])} in {count(r['packs_after'], 'pack')} remain "
        f"for {count(r['generations'], 'generation')} ({r['seconds']:.2f} s)"
    )
    if r["dictionaries_deleted"] or r["dictionaries_moved"]:
        moved = len(r["dictionaries_moved"])
        click.echo(
            f"{'would delete' if dry_run else 'deleted'} "
            f"{count(len(r['dictionaries_deleted']) + moved, 'dictionary object')} no reader "
            "can use" + (f" ({moved} moved to its true name first)" if moved else "")
        )


@cli.command(short_help="Copy generations into another repository.")
@click.argument("generations", nargs=-1)
@click.option(
    "--to",
    "target",
    required=True,
    metavar="REPO",
    help="The repository to copy into (a directory or s3://bucket/prefix). Its passphrase: "
    "DEDUPE_TO_PASSWORD, DEDUPE_TO_PASSWORD_FILE, DEDUPE_TO_PASSWORD_COMMAND, or a prompt.",
)
@click.option(
    "--scratch",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Where directory generations are restored on their way [default: $TMPDIR].",
)
@json_option
@click.pass_context
@handle_errors
def copy(
    ctx: click.Context,
    generations: tuple[str, ...],
    target: str,
    scratch: str | None,
    as_json: bool,
) -> None:
    """Copy GENERATIONS (ids, NAME@latest; default: all) into another repository, storing
    only the chunks it lacks, every chunk verified on the way. Names, kinds, creation
    times and labels are kept. Generations already copied there are skipped: run it again
    after an interruption and it finishes the job."""
    from dedupe.api import Repository

    options = ctx.find_root().obj

    def target_passphrase() -> bytes:
        from dedupe.crypto import get_passphrase

        return get_passphrase(variable="DEDUPE_TO_PASSWORD", prompt=f"Passphrase of {target}")

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as source:
            async with await Repository.open(
                target,
                target_passphrase,
                lock_wait=options.get("retry_lock", 0.0),
                cache=options.get("cache"),
            ) as into:
                report = await source.copy(
                    into, generations, progress=stages("copy"), scratch=scratch
                )
                return report.to_dict()

    r = run_async(go())
    _log_result(r)
    if as_json:
        emit_json(r)
        return
    for c in r["copied"]:
        click.echo(
            f"copied {c['source_id'][:12]} ({c['name']}) as {c['target_id'][:12]}: "
            f"{human_bytes(c['bytes_read'])} read, {human_bytes(c['bytes_new'])} new"
        )
    if r["already_there"]:
        click.echo(f"{count(len(r['already_there']), 'generation')} already in {target}")
    click.echo(
        f"{count(len(r['copied']), 'generation')} copied: {human_bytes(r['bytes_read'])} read, "
        f"{human_bytes(r['bytes_new'])} new in {target} ({r['seconds']:.2f} s)"
    )


@cli.group(short_help="Rebuild what damage or loss took from the repository.")
def repair() -> None:
    """Rebuild what damage or loss took from the repository (admin key)."""


@repair.command("index")
@json_option
@click.pass_context
@handle_errors
def repair_index_command(ctx: click.Context, as_json: bool) -> None:
    """Rebuild lost or damaged index objects from the packs' own trailers.

    Every pack no usable index object lists is read whole and checked (its hash, its
    trailer under its authenticated key, every blob); one new index object lists what
    checked out, then the damaged index objects are deleted. Takes the exclusive lock."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return (await repo.repair_index(progress=stages("repair index"))).to_dict()

    r = run_async(go())
    _log_result(r)
    if as_json:
        emit_json(r)
        return
    if r["index_object"] is None and not r["index_objects_removed"]:
        click.echo(f"every one of {count(r['packs'], 'pack')} is indexed: nothing to repair")
    else:
        click.echo(
            f"indexed {count(r['chunks_indexed'], 'chunk')} of "
            f"{count(r['packs_indexed'], 'pack')} in {r['index_object'] or 'no new object'}; "
            f"removed {count(len(r['index_objects_removed']), 'damaged index object')} "
            f"({r['seconds']:.2f} s)"
        )
    if r["blobs_left_out"]:
        click.echo(
            f"{count(r['blobs_left_out'], 'blob')} did not check out and stay unindexed: "
            "'dedupe verify' names the generations that need them"
        )
    for s in r["damaged"]:
        say_on_stderr(
            f"damaged pack {s['pack']}: {s['reason']}; its good blobs are indexed",
            "pack_damaged",
            "warning",
            pack=s["pack"],
            reason=s["reason"],
        )
    for s in r["skipped"]:
        say_on_stderr(
            f"skipped pack {s['pack']}: {s['reason']}",
            "pack_skipped",
            "warning",
            pack=s["pack"],
            reason=s["reason"],
        )


@cli.command(short_help="Remove stale locks left by killed processes.")
@click.option(
    "--all",
    "all_locks",
    is_flag=True,
    help="Remove every lock, not only stale ones (only if no dedupe process runs).",
)
@json_option
@click.pass_context
@handle_errors
def unlock(ctx: click.Context, all_locks: bool, as_json: bool) -> None:
    """Remove stale locks (left by killed processes); --all removes every lock."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            removed = await repo.unlock(all_locks=all_locks)
            remaining = await repo.locks()
            return {
                "removed": [lk.to_dict() for lk in removed],
                "remaining": [lk.to_dict() for lk in remaining],
            }

    r = run_async(go())
    if as_json:
        emit_json(r)
        return
    for lk in r["removed"]:
        click.echo(f"removed {lk['name']}: {lk['operation']} by pid {lk['pid']} on {lk['host']}")
    for lk in r["remaining"]:
        click.echo(
            f"still held: {lk['name']}: {lk['operation']} by pid {lk['pid']} on "
            f"{lk['host']}, refreshed {lk['age']:.0f} s ago"
        )
    click.echo(f"removed {count(len(r['removed']), 'lock')}")


# --- keys ---------------------------------------------------------------------------------------


def _replica_run(coro: Coroutine[Any, Any, T]) -> T:
    """run_async, with a replica name or location the command cannot take (unknown, taken,
    malformed, this repository itself) reported as a usage error."""
    try:
        return run_async(coro)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@cli.group(short_help="Repositories this one keeps copies of its generations in.")
def replica() -> None:
    """Replicas: other repositories (directories, s3://bucket/prefix) this one copies its
    generations to, with their own keys. sync: a backup commits only once every sync
    replica has committed its copy. async: 'dedupe replica sync' catches up. A restore or
    verify that meets damage here reads from a replica and repairs this repository.

    A replica's passphrase: DEDUPE_REPLICA_<NAME>_PASSWORD (NAME in capitals, other
    characters as '_'), else DEDUPE_REPLICA_PASSWORD (each also as _FILE or _COMMAND)."""


@replica.command("add", short_help="Name an existing repository as a replica.")
@click.argument("location")
@click.option("--name", default=None, help="What to call it [default: from LOCATION].")
@click.option(
    "--mode",
    type=click.Choice(["sync", "async"]),
    default="async",
    show_default=True,
    help="sync: backups commit only once it has the generation; async: 'replica sync'.",
)
@json_option
@click.pass_context
@handle_errors
def replica_add(
    ctx: click.Context, location: str, name: str | None, mode: str, as_json: bool
) -> None:
    """Name the repository at LOCATION (made with 'dedupe init', its own passphrase) as a
    replica of this one. It is opened now and its repository id pinned: another
    repository put at LOCATION later is refused. Admin key."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return (await repo.replicas.add(location, name=name, mode=mode)).to_dict()

    r = _replica_run(go())
    if as_json:
        emit_json(r)
        return
    click.echo(f"replica {r['name']} added ({r['mode']}): {printable(r['location'])}")
    if r["mode"] == "async":
        click.echo("run 'dedupe replica sync' to copy the generations it lacks")


@replica.command("remove")
@click.argument("name")
@json_option
@click.pass_context
@handle_errors
def replica_remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Stop replicating to NAME. Its copies stay where they are. Admin key."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return (await repo.replicas.remove(name)).to_dict()

    r = _replica_run(go())
    if as_json:
        emit_json(r)
    else:
        click.echo(f"replica {r['name']} removed: {printable(r['location'])} is left as it is")


@replica.command("list", short_help="The replicas, and how far behind each one is.")
@click.option("--offline", is_flag=True, help="Only the list: open no replica.")
@json_option
@click.pass_context
@handle_errors
def replica_list(ctx: click.Context, offline: bool, as_json: bool) -> None:
    """Each replica with its mode and, unless --offline, how far behind it is: the
    generations it has no copy of and the age of the oldest of them (lag_seconds in
    --json; 0 when it is up to date)."""

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            if offline:
                return [{"replica": r.to_dict()} for r in await repo.replicas.list()]
            return [s.to_dict() for s in await repo.replicas.status()]

    rows = _replica_run(go())
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no replicas")
    for row in rows:
        r = row["replica"]
        line = f"{r['name']:<16} {r['mode']:<5} {printable(r['location'])}"
        if "reachable" in row:
            if not row["reachable"]:
                line += f"  UNREACHABLE: {printable(row['error'])}"
            elif row["behind"]:
                line += (
                    f"  {len(row['behind'])} of {row['generations']} generations behind, "
                    f"lag {row['lag_seconds']:.0f} s"
                )
            else:
                line += f"  up to date ({count(row['copies'], 'generation')})"
            if row.get("orphans"):
                line += f"; {count(row['orphans'], 'copy')} of generations not here"
        click.echo(line)


@replica.command("sync", short_help="Copy what each replica lacks into it.")
@click.argument("names", nargs=-1)
@click.option(
    "--scratch",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Where directory generations are restored on their way [default: $TMPDIR].",
)
@json_option
@click.pass_context
@handle_errors
def replica_sync(
    ctx: click.Context, names: tuple[str, ...], scratch: str | None, as_json: bool
) -> None:
    """Copy the generations each replica (all, or NAMES) lacks into it, oldest first, as
    'dedupe copy' does; run it again after an interruption and it finishes the job. A
    replica that fails is reported, the others still run, and the exit code is that of
    ReplicaError."""
    from dedupe.errors import ReplicaError

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            reports = await repo.replicas.sync(names, progress=stages("copy"), scratch=scratch)
            return [r.to_dict() for r in reports]

    rows = _replica_run(go())
    if as_json:
        emit_json(rows)
    else:
        for row in rows:
            c = row["copy"]
            if c is None:
                click.echo(f"{row['replica']}: FAILED: {printable(row['error'])}")
                continue
            click.echo(
                f"{row['replica']}: {count(len(c['copied']), 'generation')} copied "
                f"({human_bytes(c['bytes_new'])} new), {len(c['already_there'])} already there"
            )
    failed = [row["replica"] for row in rows if row["error"]]
    if failed:
        raise ReplicaError(
            f"{count(len(failed), 'replica')} could not be synced: {', '.join(failed)}"
        )


@replica.command("repair", short_help="Repair this repository from its replicas.")
@click.option("--no-prune", is_flag=True, help="Store the lost chunks again; prune nothing.")
@json_option
@click.pass_context
@handle_errors
def replica_repair(ctx: click.Context, no_prune: bool, as_json: bool) -> None:
    """Read every pack (verify --read-data), store the chunks each damaged generation lost
    again from a replica's copy of it, prune (the packs that held damaged copies are
    rewritten, lost ones dropped from the index) and verify again. Admin key. Exit code 0
    when the repository is clean afterwards, else that of VerifyFailed."""
    from dedupe.errors import VerifyFailed

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return (
                await repo.replicas.repair(prune=not no_prune, progress=stages("repair"))
            ).to_dict()

    r = _replica_run(go())
    _log_result(r)
    if as_json:
        emit_json(r)
    else:
        before = r["verify"]
        click.echo(f"found {count(len(before['damaged']), 'damaged object')}")
        for h in r["healed"]:
            click.echo(
                f"repaired {h['generation'][:12]} ({h['name']}) from replica {h['replica']}: "
                f"{count(h['chunks_lost'], 'lost chunk')}, {human_bytes(h['bytes_stored'])} stored"
            )
        for gen, why in r["unhealed"].items():
            click.echo(f"NOT repaired {gen[:12]}: {printable(why)}")
        if r["prune"] is not None:
            p = r["prune"]
            click.echo(
                f"pruned: {count(p['packs_repacked'], 'pack')} rewritten, "
                f"{count(p['packs_deleted'], 'pack')} deleted"
            )
        if r["after"] is not None:
            after = r["after"]
            click.echo(
                "verify --read-data afterwards: "
                + ("clean" if after["ok"] else f"{len(after['damaged'])} damaged objects")
            )
    if not r["ok"]:
        raise VerifyFailed(
            "the repository is not clean after the repair",
            hint="see 'dedupe verify --read-data'; a generation no replica holds is lost here",
        )


@cli.group(short_help="Key holders, roles and epochs.")
def key() -> None:
    """Key holders and key epochs: list, add, remove, passwd, rotate, status.

    A new key's passphrase (add, passwd) comes from DEDUPE_NEW_PASSWORD,
    DEDUPE_NEW_PASSWORD_FILE, DEDUPE_NEW_PASSWORD_COMMAND, or a prompt on a terminal."""


def _print_keys(keys: list[dict[str, Any]]) -> None:
    for k in keys:
        mark = "*" if k["current"] else " "
        files = "" if k["key_files"] == 1 else f"  ({k['key_files']} key files)"
        name = printable(k["name"])
        click.echo(f"{mark} {k['id']}  {k['role']:<7} {name:<20} {k['created'][:19]}{files}")


@key.command("list")
@json_option
@click.pass_context
@handle_errors
def key_list(ctx: click.Context, as_json: bool) -> None:
    """List the key holders (* marks the key in use)."""

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx.find_root()) as repo:
            return [k.to_dict() for k in await repo.keys.list()]

    keys = run_async(go())
    if as_json:
        emit_json(keys)
    else:
        _print_keys(keys)


@key.command("add", short_help="Add a key holder (admin, reader or writer).")
@click.option(
    "--role",
    type=click.Choice(["admin", "reader", "writer"]),
    required=True,
    help="admin: everything; reader: list, restore, verify; writer: back up only.",
)
@click.option("--name", required=True, help="A unique name for the key (who holds it).")
@click.option(
    "--kdf-memlimit",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_kdf().memlimit // MiB,
    show_default=True,
    help="Argon2id memory in MiB for the new key file.",
)
@click.option(
    "--kdf-opslimit",
    type=int,
    cls=LibraryDefault,
    default=lambda: _default_kdf().opslimit,
    show_default=True,
    help="Argon2id passes for the new key file.",
)
@json_option
@click.pass_context
@handle_errors
def key_add(
    ctx: click.Context, role: str, name: str, kdf_memlimit: int, kdf_opslimit: int, as_json: bool
) -> None:
    """Add a key holder with its own key file and passphrase (admin keys only)."""
    from dedupe.crypto import KdfParams
    from dedupe.crypto.passphrase import get_new_passphrase

    try:
        kdf = KdfParams(kdf_opslimit, kdf_memlimit * MiB)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx.find_root()) as repo:
            repo._require_key_admin("add keys")
            new = get_new_passphrase()
            try:
                return (await repo.keys.add(new, role=role, name=name, kdf=kdf)).to_dict()
            except ValueError as e:
                raise click.UsageError(str(e)) from None

    k = run_async(go())
    if as_json:
        emit_json(k)
    else:
        click.echo(f"added {k['role']} key {k['id']} ({k['name']})")


@key.command("remove")
@click.argument("key_ref", metavar="KEY")
@json_option
@click.pass_context
@handle_errors
def key_remove(ctx: click.Context, key_ref: str, as_json: bool) -> None:
    """Remove the key holder KEY (an id, a unique id prefix, or a name). Run
    'dedupe key rotate' next, so that it cannot open anything written afterwards."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx.find_root()) as repo:
            try:
                return (await repo.keys.remove(key_ref)).to_dict()
            except ValueError as e:
                raise click.UsageError(str(e)) from None

    k = run_async(go())
    if as_json:
        emit_json(k)
        return
    click.echo(f"removed {k['role']} key {k['id']} ({k['name']})")
    click.echo("  it still knows the current epoch: run 'dedupe key rotate' to lock it out")


@key.command("passwd")
@json_option
@click.pass_context
@handle_errors
def key_passwd(ctx: click.Context, as_json: bool) -> None:
    """Change the passphrase of the key in use."""
    from dedupe.crypto.passphrase import get_new_passphrase

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx.find_root()) as repo:
            new = get_new_passphrase()
            return (await repo.keys.passwd(new)).to_dict()

    k = run_async(go())
    if as_json:
        emit_json(k)
    else:
        click.echo(f"changed the passphrase of key {k['id']} ({k['name']})")


@key.command("rotate", short_help="Start a new key epoch and retire the old one.")
@click.option(
    "--reencrypt",
    is_flag=True,
    help="Also rewrite every pack under fresh data keys (a data key leaked). Resumable.",
)
@json_option
@click.pass_context
@handle_errors
def key_rotate(ctx: click.Context, reencrypt: bool, as_json: bool) -> None:
    """Start a new key epoch, re-wrap every data key for it and retire the old ones (admin
    keys only). Pack data is not rewritten unless --reencrypt. Safe to interrupt: running
    it again finishes the job."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx.find_root()) as repo:
            return (await repo.keys.rotate(reencrypt=reencrypt)).to_dict()

    r = run_async(go())
    _log_result(r)
    if as_json:
        emit_json(r)
        return
    how = "finished an interrupted rotation to" if r["resumed"] else "rotated to"
    retired = ", ".join(map(str, r["retired"])) or "none"
    click.echo(
        f"{how} key epoch {r['epoch']}: {r['entries']} data keys re-wrapped in "
        f"{r['key_maps_written']} key map(s); retired epoch(s) {retired} ({r['seconds']:.2f} s)"
    )
    if r["entries_dropped"]:
        click.echo(f"  {r['entries_dropped']} entries whose keys no longer open were dropped")
    p = r["reencrypted"]
    if p:
        click.echo(
            f"re-encrypted: {p['packs_repacked']} packs rewritten into {p['packs_written']} "
            f"under fresh data keys, {p['packs_deleted']} unused packs deleted"
        )


@key.command("status", short_help="Each key epoch, and any unfinished rotation.")
@json_option
@click.pass_context
@handle_errors
def key_status(ctx: click.Context, as_json: bool) -> None:
    """Each key epoch and what depends on it; any unfinished rotation or re-encryption."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx.find_root()) as repo:
            return (await repo.keys.status()).to_dict()

    s = run_async(go())
    if as_json:
        emit_json(s)
        return
    click.echo(f"keyring serial {s['serial']}, current epoch {s['current_epoch']}")
    for e in s["epochs"]:
        mark = "*" if e["current"] else " "
        click.echo(
            f"{mark} epoch {e['number']:>3} {e['state']:<8} created {e['created'][:19]}: "
            f"{count(e['packs'], 'pack')}, {count(e['generations'], 'generation')}, "
            f"{count(e['index_objects'], 'index object')}, "
            f"{count(e['quarantine_records'], 'quarantine record')} in "
            f"{count(e['key_maps'], 'key map')}; {count(e['packs_born'], 'pack key')} made in it"
        )
    if s["rotation_unfinished"]:
        click.echo("a rotation is unfinished: run 'dedupe key rotate' to finish it")
    if s["reencrypt_below"] is not None:
        click.echo(
            f"a re-encryption is unfinished (packs with keys from before epoch "
            f"{s['reencrypt_below']}): run 'dedupe key rotate --reencrypt' to finish it"
        )
    _print_keys(s["keys"])


# --- disaster recovery: objectives, drills, status (docs/OPERATIONS.md) -------------------------


def _objective(value: str | None, option: str) -> int | None:
    from dedupe.objectives import parse_objective

    if value is None:
        return None
    try:
        return parse_objective(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None


def _duration_text(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@cli.group(short_help="Recovery objectives (RPO, RTO, drill age) per source.")
def policy() -> None:
    """Recovery objectives per source name, kept in the repository (signed by an admin):
    the RPO (its newest generation must be younger), the RTO (a drill must restore it
    within) and how old its last drill may be. 'dedupe status' judges them. Durations:
    90s, 15m, 1h, 2d, 1w, or sums like 1h30m."""


@policy.command("set")
@click.argument("name", callback=lambda _c, _p, v: _source_name(v))
@click.option("--rpo", required=True, metavar="DURATION", help="Recovery point objective.")
@click.option("--rto", required=True, metavar="DURATION", help="Recovery time objective.")
@click.option(
    "--drill-max-age", metavar="DURATION", help="How old the last drill may be [default: 7d]."
)
@json_option
@click.pass_context
@handle_errors
def policy_set(
    ctx: click.Context,
    name: str,
    rpo: str,
    rto: str,
    drill_max_age: str | None,
    as_json: bool,
) -> None:
    """Set (or replace) the objectives of source NAME. Admin key."""
    rpo_s, rto_s = _objective(rpo, "--rpo"), _objective(rto, "--rto")
    age_s = _objective(drill_max_age, "--drill-max-age")
    assert rpo_s is not None and rto_s is not None

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            p = await repo.objectives.set(name, rpo=rpo_s, rto=rto_s, drill_max_age=age_s)
            return p.to_json()

    p = _usage_errors(go())
    _log_result(p)
    if as_json:
        emit_json(p)
        return
    click.echo(
        f"objectives of {printable(p['name'])}: RPO {_duration_text(p['rpo_seconds'])}, "
        f"RTO {_duration_text(p['rto_seconds'])}, a drill at least every "
        f"{_duration_text(p['drill_max_age_seconds'])}"
    )


@policy.command("list")
@json_option
@click.pass_context
@handle_errors
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """The objectives of every source that has some."""

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            return [p.to_json() for p in repo.objectives.list()]

    rows = run_async(go())
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no objectives are set ('dedupe policy set NAME --rpo 1h --rto 15m')")
        return
    _print_table(
        ["name", "RPO", "RTO", "drill every", "set"],
        [
            [
                printable(p["name"]),
                _duration_text(p["rpo_seconds"]),
                _duration_text(p["rto_seconds"]),
                _duration_text(p["drill_max_age_seconds"]),
                p["set"][:19],
            ]
            for p in rows
        ],
        set(),
    )


@policy.command("remove")
@click.argument("name")
@json_option
@click.pass_context
@handle_errors
def policy_remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Drop the objectives of NAME (its generations stay). Admin key."""

    async def go() -> dict[str, Any]:
        async with await open_repo(ctx) as repo:
            return (await repo.objectives.remove(name)).to_json()

    p = _usage_errors(go())
    if as_json:
        emit_json(p)
    else:
        click.echo(f"objectives of {printable(p['name'])} removed")


def _usage_errors(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return run_async(coro)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


@cli.command(short_help="Restore generations as a test, timed against their RTO.")
@click.argument("targets", nargs=-1)
@click.option(
    "--target",
    "into",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Restore into a new directory under DIR (removed again unless --keep).",
)
@click.option("--into-db", metavar="NEWDB", help="Restore a pg: generation into this new database.")
@click.option("--null", is_flag=True, help="Restore into nothing (the default).")
@click.option(
    "--check",
    metavar="'CMD ARGS'",
    help="Run after the restore, '{}' standing for the restored path or database; with "
    "nothing restored it reads all the bytes on its stdin (e.g. 'pg_restore -f /dev/null').",
)
@click.option("--rto", metavar="DURATION", help="Judge against this, not the policy's RTO.")
@click.option("--keep", is_flag=True, help="Leave what the drill restored.")
@click.option("--no-record", is_flag=True, help="Do not record the drill in the repository.")
@json_option
@click.pass_context
@handle_errors
def drill(
    ctx: click.Context,
    targets: tuple[str, ...],
    into: str | None,
    into_db: str | None,
    null: bool,
    check: str | None,
    rto: str | None,
    keep: bool,
    no_record: bool,
    as_json: bool,
) -> None:
    """Restore TARGETS (generation ids or NAME@latest...; default: the newest generation
    of every source with objectives) as a test: every chunk and the stream digest
    checked, then --check, all timed against the RTO. Each drill is recorded in the
    repository, and 'dedupe status' shows the last. Exit 0 when every drill passed, 71
    when one failed (a failed drill is a result, not an error)."""
    from dedupe.engine.commands import Command
    from dedupe.objectives import STATUS_DRILL

    if null and (into or into_db):
        raise click.UsageError("--null restores into nothing: not with --target or --into-db")
    argv = list(Command.parse(check).argv) if check else None
    rto_s = _objective(rto, "--rto")

    async def go() -> list[dict[str, Any]]:
        async with await open_repo(ctx) as repo:
            results = await repo.objectives.drill(
                targets,
                rto=rto_s,
                into=into,
                into_db=into_db,
                check=argv,
                keep=keep,
                record=not no_record,
            )
            return [r.to_json() for r in results]

    rows = _usage_errors(go())
    _log_result({"drills": len(rows), "passed": sum(r["passed"] for r in rows)})
    if as_json:
        emit_json(rows)
    else:
        for r in rows:
            verdict = "PASS" if r["passed"] else "FAIL"
            mbs = r["bytes"] / r["seconds"] / 1e6 if r["seconds"] else 0.0
            rto_text = "" if r["rto_seconds"] is None else f", RTO {r['rto_seconds']:g} s"
            line = (
                f"{verdict} {printable(r['name'])} {r['generation'][:12]}: "
                f"{human_bytes(r['bytes'])} in {r['seconds']:.2f} s ({mbs:.0f} MB/s){rto_text}"
            )
            if r["reason"]:
                line += f": {printable(r['reason'])}"
            click.echo(line)
    if not all(r["passed"] for r in rows):
        sys.exit(STATUS_DRILL)


@cli.command(short_help="Sources against their objectives; exit 70/71 when missed.")
@click.option("--name", "names", multiple=True, help="Only this source (repeatable).")
@click.option(
    "--metrics",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write the status as Prometheus metrics to FILE (node_exporter's textfile "
    "collector), atomically.",
)
@json_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, names: tuple[str, ...], metrics: str | None, as_json: bool) -> None:
    """Per source: the newest generation, its age and size, the last drill, against the
    objectives ('dedupe policy'). Exit 0 when every objective is met; 70 when a source's
    newest generation is older than its RPO (or it has none); 71 when the RPOs are met
    but a last drill failed, was slower than the RTO, is too old, or never ran."""
    from dedupe import logjson
    from dedupe.metrics import status_metrics, write_textfile

    async def go() -> Any:
        async with await open_repo(ctx) as repo:
            return await repo.objectives.status(names)

    report = run_async(go())
    if metrics:
        location = repo_location(ctx)
        write_textfile(metrics, status_metrics(report, logjson.scrub(location)))
    body = report.to_json()
    _log_result({"ok": body["ok"], "exit_code": body["exit_code"], "sources": len(report.sources)})
    if as_json:
        emit_json(body)
    else:
        rows = []
        for src in report.sources:
            age = "-" if src.age_seconds is None else _duration_text(round(src.age_seconds))
            d = src.last_drill
            drilled = "-" if d is None else f"{'pass' if d.passed else 'FAIL'} {d.seconds:.1f} s"
            p = src.policy
            rows.append(
                [
                    printable(src.name),
                    src.last_id[:12] if src.last_id else "-",
                    age,
                    "-" if p is None else _duration_text(p.rpo),
                    drilled,
                    "-" if p is None else _duration_text(p.rto),
                    "ok" if src.ok else "MISSED",
                ]
            )
        _print_table(["name", "newest", "age", "RPO", "last drill", "RTO", ""], rows, set())
        for src in report.sources:
            for _kind, text in src.problems:
                click.echo(f"  {printable(text)}")
    if report.exit_code:
        sys.exit(report.exit_code)


@cli.command(short_help="Measure MB/s and peak memory, against restic and borg.")
@click.option("--data", type=click.Path(dir_okay=False), help="Benchmark on this file.")
@click.option(
    "--data2",
    type=click.Path(dir_okay=False),
    help="With --data: its next version, for the incremental step.",
)
@click.option(
    "--size",
    default="256MiB",
    show_default=True,
    help="Bytes to generate (without --data); with --data, at most this much for the stages.",
)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True, help="Medians of.")
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    help="Data and repositories [default: a tmp dir].",
)
@click.option("--compare", is_flag=True, help="Also run restic and borg when on PATH.")
@click.option(
    "--tools",
    default="",
    metavar="LIST",
    help="Tools beside dedupe, comma-separated: restic, borg, or a variant "
    "(dedupe-stdin, restic-stdin, restic-file).",
)
@click.option(
    "--s3",
    metavar="s3://BUCKET/PREFIX",
    help="Also run dedupe with its repositories in this object store (the bucket must exist).",
)
@click.option("--no-stages", is_flag=True, help="Skip the stage-by-stage table.")
@click.option("--no-e2e", is_flag=True, help="Skip the end-to-end steps.")
@json_option
@handle_errors
def bench(
    data: str | None,
    data2: str | None,
    size: str,
    runs: int,
    workdir: str | None,
    compare: bool,
    tools: str,
    s3: str | None,
    no_stages: bool,
    no_e2e: bool,
    as_json: bool,
) -> None:
    """Measure throughput (MB/s) and peak RSS, stage by stage and end to end, in throwaway
    repositories of its own. Medians of --runs; the machine's other load shows as spread."""
    from dedupe.bench import expand_tools, format_report, parse_size, run_bench

    try:
        nbytes = parse_size(size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--size") from None
    names = [t.strip() for t in tools.split(",") if t.strip()]
    try:
        expand_tools(names)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tools") from None
    if data2 is not None and data is None:
        raise click.BadParameter("needs --data (the first version)", param_hint="--data2")
    report = run_async(
        run_bench(
            data=data,
            data2=data2,
            size=nbytes,
            runs=runs,
            workdir=workdir,
            compare=compare,
            tools=names,
            s3=s3,
            stages=not no_stages,
            end_to_end=not no_e2e,
            progress=None
            if as_json and json_log() is None
            else lambda msg: say_on_stderr(msg, "progress"),
        )
    )
    _log_result(report.to_dict())
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(format_report(report))


def tune_allocator() -> None:
    """Two glibc malloc settings, process-wide, so the command sets them and the library
    does not (an embedder can export the variables named for the same effect):
    - the mmap threshold pinned at 256 KiB (MALLOC_MMAP_THRESHOLD_). By default glibc
      raises it each time a large buffer is freed, after which our read blocks and
      packs come from the heap and fragment it: peak RSS then grows with the size of the
      snapshot (measured: 196 MiB for 256 MiB of input, 279 MiB for 1 GiB; pinned: 134
      and 149);
    - at most 2 arenas (MALLOC_ARENA_MAX). By default each thread that allocates may get
      an arena of its own (up to 8 per core), and each keeps what its thread freed: the
      4 GiB page incremental peaked 1.3-2.5 MiB higher with them (stop 37), and nothing of a
      backup or restore ran slower with 2 (their large buffers are mapped or pooled)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        # The process's own symbols, libc's among them: no search for libc's file name
        # (ctypes.util.find_library runs ldconfig, a few milliseconds of every start).
        libc = ctypes.CDLL(None)
        m_mmap_threshold, m_arena_max = -3, -8
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            libc.mallopt(m_mmap_threshold, 256 * 1024)
        if "MALLOC_ARENA_MAX" not in os.environ:
            libc.mallopt(m_arena_max, 2)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def show_warnings() -> None:
    """The library reports problems that do not stop an operation as warnings on the
    "dedupe" logger (a damaged keyring copy, a refused key map, a forged object left out):
    the command prints them on stderr."""
    import logging

    class Printable(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return printable(super().format(record))

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(Printable("dedupe: warning: %(message)s"))
    logger = logging.getLogger("dedupe")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def _global_options_after_the_command(group: click.Group) -> None:
    """Let every command take -r/--repo, -q/--quiet, -v/--verbose and --log-json after its
    name too (`dedupe generations -r REPO`), as restic's and borg's do; -r given there wins
    over the one before the command and DEDUPE_REPO."""

    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value:  # None or False: what came before the command stands
            ctx.find_root().ensure_object(dict)[param.name or ""] = value

    for command in group.commands.values():
        if isinstance(command, click.Group):
            _global_options_after_the_command(command)
            continue
        flags = {
            ("-q", "--quiet"): "No progress bars and no notes",
            ("-v", "--verbose"): "Say each stage of long operations",
        }
        options = [
            click.Option(
                list(opts),
                is_flag=True,
                expose_value=False,
                callback=remember,
                help=f"{text} (also before the command).",
            )
            for opts, text in flags.items()
        ]
        options.append(
            click.Option(
                ["--log-json"],
                is_flag=True,
                expose_value=False,
                callback=_log_json_flag,
                help="Write stderr as JSON Lines (also before the command).",
            )
        )
        if command.name != "bench":
            options.insert(
                0,
                click.Option(
                    ["-r", "--repo"],
                    metavar="PATH",
                    expose_value=False,
                    callback=remember,
                    help="Repository (or DEDUPE_REPO; also accepted before the command).",
                ),
            )
            options.append(
                click.Option(
                    ["--retry-lock"],
                    metavar="DURATION",
                    expose_value=False,
                    callback=lambda ctx, param, value: remember(
                        ctx, param, _retry_lock(ctx, param, value)
                    ),
                    help="Wait up to DURATION for a conflicting lock (also before the command).",
                )
            )
        command.params[:0] = options


_global_options_after_the_command(cli)


def main() -> None:
    tune_allocator()
    if _log_json_from(sys.argv[1:], os.environ):
        _main_logging_json()
        return
    show_warnings()
    cli(prog_name="dedupe")


if __name__ == "__main__":
    main()
