"""Crash points, enumerated (docs/FORMAT.md 9, 10.1, 10.2, 14.2, 14.3): a command that
dies between any two of its durable steps leaves a repository that `verify --read-data`
passes as it is (no prune first; temporary files and unindexed packs are no damage), in
which every generation committed before restores byte for byte, in which the interrupted
command took effect wholly or not at all, and on which the same command, run again,
succeeds and leaves everything restorable and verified.

Commands: a full backup, an incremental backup, `forget` (three generations of a chain),
`prune --repack-threshold 0` (after a forget: it repacks, deletes packs, replaces the
index objects, consolidates key maps), `key rotate` and `key rotate --reencrypt`.

The crash points are not times. A probe run of the command lists its backend operations
as `dedupe.backends.local` performs them: every fsync (of a temporary file's data, of a
directory), every rename or link of an object into place, every unlink. (The module's
`os` is replaced, in the command's process only, by a stand-in that counts; no product
code changes.) Then the command runs once per operation index k, each time on a fresh copy
of the same repository, and calls `os._exit(99)` instead of performing operation k:
operations 0..k-1 happened, k and the rest did not, and nothing the code could catch or
clean up ran. Each run is checked to die at the probe's k-th operation (the same step,
whatever its random ids), and the run at k = count to get to the end. One kind of op is
enumerated apart ("newdir"): the fsync of a directory that `_make_dirs` has just given a
new subdirectory (`packs/` for a new `packs/ab/`), since how many of those a run makes
depends on its random pack ids; they are tried from the first until a run makes fewer. A
command with more than EVERY_UP_TO operations is sampled: every one of the first and the
last ENDS, a deterministic stride between, about SAMPLE points in all.

Torn writes, in two more variants:

- a torn temporary file (what a crash in the middle of a put leaves with the
  LocalBackend, which renames a fsynced temporary file into place): at the k-th data
  fsync of a temporary file, the file is cut to half its length and the process dies.
  Asserted: everything asserted for a clean crash (temporary files are no objects:
  listing skips them, verify never sees them), the torn file is there after the crash,
  and after the re-run and a `prune` no temporary file is left.
- a torn final object (what a store without atomic renames could leave; the LocalBackend
  cannot): at the k-th rename or link into place, half of the object's bytes are written
  under its final name instead, and the process dies. Asserted: the damage is detected
  and named, never used. The repository still opens; no generation restores wrong bytes
  (the only one that may fail to restore is the torn manifest, with an error naming it);
  what was committed before is all there; verify names a torn manifest, index object,
  key map or keyring copy as damaged; a torn pack is listed by no index object yet (packs
  are written before the index object that lists them, 9.1), so nothing reads it, verify
  counts it as unindexed, and prune deletes it; a torn lock is not JSON, counts as a stale
  exclusive lock, and the next locker removes it. Then recovery (see `_recover_torn_final`):
  the re-run and a prune either succeed, or refuse with an error naming the torn object
  and no traceback (only for an index object or a manifest); the operator's remedy is
  `dedupe forget ID` for a torn manifest still listed, else removing the named object;
  after it everything restores, verify passes, and the torn object is gone or whole.
  Each torn variant tears every put when a command makes at most TORN_UP_TO of them,
  else the first and the last put of each kind of object.

Every child is forked from a long-lived helper interpreter, one per worker (started as
`python -c`, with dedupe already imported), so that a crash point costs a fork and not an
interpreter start. The checks of a state ("looks": every generation restored, and
`verify --read-data`, through the API the command uses, without writing a quarantine
record; the locks; the keyring) run in forked children too, with the trial's own
DEDUPE_STATE_DIR, a copy of the template's (restoring a template would otherwise look
like a keyring rollback to a client that saw the rotated keyring), so that WORKERS trials
run at once. Run with -s to see the counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import blake3
import pytest
from conftest import (  # type: ignore[import-not-found, unused-ignore]
    PASSPHRASE,
    ForkHelper,
    helper_pool,
    make_repo,
    serve_forks,
)

from dedupe import Generation, Repository
from dedupe.errors import DedupeError

CRASHED = 99  # the exit code of an injected crash
CHILD_TIMEOUT = 60  # seconds; a child that runs longer is killed by SIGALRM
WORKERS = 2
EVERY_UP_TO = 70  # a command with more operations is sampled, about SAMPLE points: ...
SAMPLE = 50
ENDS = 15  # ... every one among the first and the last ENDS, a stride between
TORN_UP_TO = 10  # puts torn: every one up to this many, else first and last of each kind
TMP_PREFIX = ".tmp-"
NEW_DIR = " (its new subdirectory)"  # marks an fsync made by _make_dirs in the log
OBJECT_KINDS = {
    "packs": "pack",
    "index": "index object",
    "keymaps": "key map",
    "generations": "manifest",
    "keyring": "keyring copy",
    "locks": "lock",
}

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="forks, and reads /proc/self/fd"
)

# The helper interpreter: this module, imported by path, serves requests on stdin.
# =============================================================================================
# In the children: counting and crashing
# =============================================================================================


class _Injector:
    """The operation counter of one command child. `mode` says which operations count and
    what happens at the one numbered `at` (0-based) among them:

    - "crash": every operation but the fsyncs of a directory that holds a new directory
      (their number varies from run to run, see "newdir"); operation `at` is not
      performed, the process exits instead (CRASHED);
    - "newdir": only those fsyncs (`_make_dirs` fsyncs the parent of each directory it
      creates, such as `packs/` for a new `packs/ab/`); the same crash;
    - "torn-tmp": only data fsyncs of temporary files; at number `at` the file is cut to
      half its length, then the process exits;
    - "torn-final": only renames and links of a temporary file into place; at number `at`
      half of the file's bytes are written under the final name instead, the temporary
      file removed, then the process exits;
    - "count": nothing is injected (probes and re-runs).

    Operations are serialized (a lock is held across each), so "operations 0..k-1
    happened, k did not" holds even though the backend works on several threads."""

    def __init__(self, mode: str, at: int, root: str, note: str) -> None:
        self.mode, self.at, self.root, self.note = mode, at, root, note
        self.total = 0  # operations performed (every kind)
        self.counted = 0  # operations of the kind `mode` counts
        self.log: list[str] = []
        self.lock = threading.Lock()
        self.making_dirs = threading.local()  # .active: inside _make_dirs on this thread

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def record(self, crashed: str | None, op: str | None) -> None:
        with open(self.note, "w") as f:
            json.dump({"ops": self.total, "crashed": crashed, "op": op, "log": self.log}, f)

    def die(self, op: str, how: str = "") -> None:
        self.record(f"#{self.total} {op}{how}", op)
        os._exit(CRASHED)

    def _counts(self, kind: str) -> bool:
        """Whether the operation is the one to inject at (and count it if it counts)."""
        if kind != self.mode:
            return False
        hit = self.counted == self.at
        self.counted += 1
        return hit

    def step(
        self,
        op: str,
        perform: Callable[[], None],
        *,
        tmp_fd: int | None = None,
        commit: tuple[str, str] | None = None,
    ) -> None:
        with self.lock:
            new_dir = getattr(self.making_dirs, "active", False) and op.startswith("fsync dir")
            if new_dir:
                op += NEW_DIR
            if self._counts("newdir" if new_dir else "crash"):
                self.die(op)
            if tmp_fd is not None and self._counts("torn-tmp"):
                size = os.fstat(tmp_fd).st_size
                os.ftruncate(tmp_fd, size // 2)
                self.die(op, f", cut from {size} to {size // 2} bytes")
            if commit is not None and self._counts("torn-final"):
                src, dst = commit
                with open(src, "rb") as f:
                    data = f.read()
                try:
                    os.unlink(dst)  # a store without atomic renames: the old object is gone
                except FileNotFoundError:
                    pass
                with open(dst, "xb") as f:
                    f.write(data[: len(data) // 2])
                os.unlink(src)
                self.die(op, f", {len(data) // 2} of {len(data)} bytes")
            perform()
            self.log.append(op)
            self.total += 1

    def install(self, local: Any) -> None:
        """Into `dedupe.backends.local` (this process only): `os` counted, `_make_dirs`
        marked."""
        make_dirs = local._make_dirs

        def marked(directory: str) -> None:
            self.making_dirs.active = True
            try:
                make_dirs(directory)
            finally:
                self.making_dirs.active = False

        local.os = _CountingOs(self)
        local._make_dirs = marked


class _CountingOs:
    """What `dedupe.backends.local` sees as its `os` module in a command child: the real
    one, with fsync, replace, link and unlink going through the injector."""

    def __init__(self, injector: _Injector) -> None:
        self._i = injector

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        tmp = regular and os.path.basename(path).startswith(TMP_PREFIX)
        op = f"fsync {'data of ' if regular else 'dir '}{self._i.rel(path)}"
        self._i.step(op, lambda: os.fsync(fd), tmp_fd=fd if tmp else None)

    def replace(self, src: str, dst: str) -> None:
        op = f"rename {os.path.basename(src)} -> {self._i.rel(dst)}"
        self._i.step(op, lambda: os.replace(src, dst), commit=(src, dst))

    def link(self, src: str, dst: str) -> None:
        op = f"link {os.path.basename(src)} -> {self._i.rel(dst)}"
        self._i.step(op, lambda: os.link(src, dst), commit=(src, dst))

    def unlink(self, path: str) -> None:
        self._i.step(f"unlink {self._i.rel(path)}", lambda: os.unlink(path))


def _run_cli(args: list[str]) -> int:
    """The `dedupe` command, as its entry point runs it; returns the exit code."""
    from dedupe.cli import main

    sys.argv = ["dedupe", *args]
    try:
        main()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


async def _look(path: str) -> dict[str, Any]:
    """What a key holder sees: each listed generation restored (SHA-256 of the bytes, or
    the error), `verify --read-data` (without writing a quarantine record: a look changes
    nothing), the locks, the keyring. Restores and verify run side by side (shared locks),
    to keep a look short."""
    try:
        repo = await Repository.open(path, PASSPHRASE)
    except DedupeError as e:
        return {"open_error": f"{type(e).__name__}: {e.message}"}

    async def restore(g: Generation) -> dict[str, Any]:
        buf = io.BytesIO()
        entry: dict[str, Any] = {"name": g.name, "kind": g.kind}
        try:
            await repo.restore(g.id, buf)
            entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        except DedupeError as e:
            entry["error"] = f"{type(e).__name__}: {e.message}"
        return entry

    async def verify() -> dict[str, Any]:
        try:
            return (await repo.verify(read_data=True, quarantine=False)).to_dict()
        except DedupeError as e:
            return {"error": f"{type(e).__name__}: {e.message}"}

    async with repo:
        gens = await repo.generations()
        *restored, report = await asyncio.gather(*map(restore, gens), verify())
        ring = repo._store.keyring
        return {
            "generations": {g.id: r for g, r in zip(gens, restored, strict=True)},
            "verify": report,
            "locks": {lk.name: lk.stale_reason(300.0) for lk in await repo.locks()},
            "keyring": {
                "serial": ring.serial,
                "active": len(ring.active_epochs),
                "current": ring.current_epoch,
                "reencrypt_below": ring.reencrypt_below,
            },
            "problems": repo.problems,
        }


def _child(request: dict[str, Any]) -> int:
    out = os.open(request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ.update(request["env"])
    signal.alarm(CHILD_TIMEOUT)
    if request["kind"] == "look":
        try:
            result = asyncio.run(_look(request["env"]["DEDUPE_REPO"]))
        except BaseException:
            result = {"traceback": traceback.format_exc()}
        with open(request["note"], "w") as f:
            json.dump(result, f)
        return 0
    import dedupe.backends.local as local

    injector = _Injector(
        request["mode"], request["at"], request["env"]["DEDUPE_REPO"], request["note"]
    )
    injector.install(local)
    code = _run_cli(request["args"])
    injector.record(None, None)
    return code


def serve() -> None:
    """The helper's loop (conftest.serve_forks)."""
    serve_forks(_child)


# =============================================================================================
# In the test: the helpers, the templates, the trials
# =============================================================================================


class Helper(ForkHelper):
    """One helper interpreter (see `serve`), used by one worker thread at a time."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(__file__, workdir)


@dataclass(frozen=True)
class Ran:
    """One command child: its exit code, what it printed, its operation log."""

    rc: int
    output: str
    ops: int
    crashed: str | None  # where it died ("#n operation, detail"), None if it ran to the end
    op: str | None  # the operation it died at
    log: list[str]


@dataclass(frozen=True)
class Look:
    """One look at a repository (see `_look`)."""

    raw: dict[str, Any]

    def fail_if_broken(self, where: str) -> None:
        assert "traceback" not in self.raw, f"{where}: a look crashed:\n{self.raw['traceback']}"
        assert "open_error" not in self.raw, f"{where}: {self.raw['open_error']}"
        assert "error" not in self.verify, f"{where}: verify raised {self.verify['error']}"

    @property
    def generations(self) -> dict[str, dict[str, Any]]:
        return cast(dict[str, dict[str, Any]], self.raw["generations"])

    @property
    def verify(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.raw["verify"])

    @property
    def keyring(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.raw["keyring"])

    def damaged(self) -> list[str]:
        return [d["name"] for d in self.verify.get("damaged", [])]

    def describe_damage(self) -> str:
        return "; ".join(
            f"{d['name']} ({d['kind']}, {d['reason']}: {' '.join(d['details'])}; "
            f"{len(d['generations'])} generation(s) affected)"
            for d in self.verify.get("damaged", [])
        )


class Trial:
    """One copy of a template and the children run on it."""

    def __init__(self, helper: Helper, template: Template, path: Path) -> None:
        self.helper, self.path = helper, path
        self.repo, self.state = path / "repo", path / "state"
        shutil.copytree(template.repo, self.repo)
        shutil.copytree(template.state, self.state)
        self.n = 0

    def _env(self) -> dict[str, str]:
        return {
            "DEDUPE_REPO": str(self.repo),
            "DEDUPE_PASSWORD": PASSPHRASE,
            "DEDUPE_STATE_DIR": str(self.state),
        }

    def _files(self) -> tuple[Path, Path]:
        self.n += 1
        return self.path / f"{self.n}.out", self.path / f"{self.n}.json"

    def run(self, args: tuple[str, ...], mode: str = "count", at: int = -1) -> Ran:
        out, note = self._files()
        rc = self.helper.request(
            kind="command",
            args=list(args),
            env=self._env(),
            mode=mode,
            at=at,
            out=str(out),
            note=str(note),
        )
        data = json.loads(note.read_text()) if note.exists() else {}
        return Ran(
            rc,
            out.read_text(errors="replace"),
            data.get("ops", -1),
            data.get("crashed"),
            data.get("op"),
            data.get("log", []),
        )

    def look(self) -> Look:
        out, note = self._files()
        rc = self.helper.request(kind="look", env=self._env(), out=str(out), note=str(note))
        assert rc == 0, f"a look exited {rc}: {out.read_text(errors='replace')}"
        return Look(json.loads(note.read_text()))

    def tmp_files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.repo)) for p in self.repo.rglob(f"{TMP_PREFIX}*") if p.is_file()
        )


# --- the data and the templates -------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _changed(rnd: random.Random, data: bytes, times: int, size: int) -> bytes:
    out = bytearray(data)
    for _ in range(times):
        at = rnd.randrange(0, len(out) - size)
        out[at : at + size] = rnd.randbytes(size)
    return bytes(out)


@dataclass
class Template:
    """A repository (and the client state of the machine that built it) that trials copy;
    `kept` maps each generation committed in it to the SHA-256 of its bytes."""

    repo: Path
    state: Path
    kept: dict[str, str]


@dataclass
class Templates:
    base: Template  # "a" full, "db" full and incremental
    many: Template  # base and three more generations of "db" (forget removes three)
    forgotten: Template  # `many` after `forget --name db --keep-last 1`: prune's work
    new_full: Path  # a file for a full backup of a new name
    new_full_sha: str
    next_db: Path  # the next version of "db", for an incremental
    next_db_sha: str
    survivors: set[str]  # of `many`, what `forget --name db --keep-last 1` keeps


@contextmanager
def _state_dir(path: Path) -> Iterator[None]:
    old = os.environ.get("DEDUPE_STATE_DIR")
    os.environ["DEDUPE_STATE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            del os.environ["DEDUPE_STATE_DIR"]
        else:
            os.environ["DEDUPE_STATE_DIR"] = old


def _build(base: Path) -> Templates:
    """Small data (64 KiB packs, a few hundred KiB per generation) so that each command
    makes tens of backend operations."""
    rnd = random.Random(1201)
    a = rnd.randbytes(160 * 1024)
    db = [rnd.randbytes(320 * 1024)]
    for _ in range(4):
        db.append(_changed(rnd, db[-1], 3, 16 * 1024))
    new_full = rnd.randbytes(256 * 1024) + db[0][: 96 * 1024]
    next_db = _changed(rnd, db[1], 3, 20 * 1024)
    (base / "new-full.bin").write_bytes(new_full)
    (base / "next-db.bin").write_bytes(next_db)

    async def backups(path: Path, plan: list[tuple[str, bytes]]) -> dict[str, str]:
        kept = {}
        async with await make_repo(path) as repo:
            for i, (kind, data) in enumerate(plan):
                name = "a" if i == 0 else "db"
                kept[(await repo.backup(io.BytesIO(data), name=name, kind=kind)).id] = _sha(data)
        return kept

    def template(name: str, plan: list[tuple[str, bytes]]) -> Template:
        path, state = base / name, base / f"{name}-state"
        state.mkdir()
        with _state_dir(state):
            kept = asyncio.run(backups(path, plan))
        assert len(set(kept.values())) == len(plan)
        return Template(path, state, kept)

    first = [("full", a), ("full", db[0]), ("incremental", db[1])]
    more = [("incremental", db[2]), ("full", db[3]), ("incremental", db[4])]
    base_t = template("base", first)
    many = template("many", first + more)
    forgotten = Template(base / "forgotten", base / "forgotten-state", dict(many.kept))
    shutil.copytree(many.repo, forgotten.repo)
    shutil.copytree(many.state, forgotten.state)

    async def forget() -> set[str]:
        async with await Repository.open(forgotten.repo, PASSPHRASE) as repo:
            report = await repo.forget(name="db", keep_last=1)
            return {d.generation.id for d in report.removed}

    with _state_dir(forgotten.state):
        removed = asyncio.run(forget())
    assert len(removed) == 3, removed  # db's first full and its two incrementals
    forgotten.kept = {g: s for g, s in many.kept.items() if g not in removed}
    return Templates(
        base_t,
        many,
        forgotten,
        base / "new-full.bin",
        _sha(new_full),
        base / "next-db.bin",
        _sha(next_db),
        set(forgotten.kept),
    )


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return _build(tmp_path_factory.mktemp("crash-points"))


@pytest.fixture(scope="module")
def helpers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[queue.Queue[Helper]]:
    workdir = tmp_path_factory.mktemp("crash-helpers")
    yield from helper_pool(lambda: Helper(workdir), WORKERS)


# --- what must hold --------------------------------------------------------------------------


@dataclass
class Command:
    """A command under test and what may come of it.

    `expected(id)` is the SHA-256 the generation `id` must restore to, None for one that
    must not exist. `committed(look)` judges a crashed state (restores are checked
    already): it raises unless the command took effect wholly or not at all, and returns
    a word for which. `finished(look, trial)` judges the state after the re-run."""

    label: str
    template: Template
    args: tuple[str, ...]
    expected: Callable[[str], str | None]
    committed: Callable[[Look], str]
    finished: Callable[[Look, Trial], None]


def _restores(look: Look, expected: Callable[[str], str | None], where: str) -> None:
    """Every generation listed restores to its bytes; none is listed that should not be."""
    for gid, g in look.generations.items():
        want = expected(gid)
        assert want is not None, f"{where}: generation {gid[:12]} ({g['name']}) is unexpected"
        assert "error" not in g, f"{where}: generation {gid[:12]} does not restore: {g['error']}"
        assert g["sha256"] == want, f"{where}: generation {gid[:12]} restored wrong bytes"


def _clean(look: Look, cmd: Command, where: str) -> None:
    """The repository opens, `verify --read-data` passes, every generation restores."""
    look.fail_if_broken(where)
    assert look.verify["ok"], f"{where}: verify --read-data fails: {look.describe_damage()}"
    _restores(look, cmd.expected, where)


def _no_live_lock(look: Look, where: str) -> None:
    live = [name for name, stale in look.raw["locks"].items() if stale is None]
    assert not live, f"{where}: locks still held: {live}"


def _pruned(look: Look, trial: Trial, where: str) -> None:
    """What a finished prune leaves: one index object, no pack it does not list, no
    temporary file."""
    assert look.verify["index_objects"] == 1, f"{where}: {look.verify['index_objects']} index"
    assert look.verify["packs_unindexed"] == 0, f"{where}: {look.verify['packs_unindexed']}"
    assert not trial.tmp_files(), f"{where}: temporary files left: {trial.tmp_files()}"


def _backup(t: Templates, full: bool) -> Command:
    """A backup commits with its manifest: afterwards there is either no new generation,
    or one that restores to the new data (whose packs, key map and index object were
    stored before it)."""
    tpl = t.base
    source, sha, name = (
        (t.new_full, t.new_full_sha, "new") if full else (t.next_db, t.next_db_sha, "db")
    )
    kind = "full" if full else "incremental"

    def expected(gid: str) -> str | None:
        return tpl.kept.get(gid, sha)  # anything new must be the new backup

    def committed(look: Look) -> str:
        ids = set(look.generations)
        assert set(tpl.kept) <= ids, "a generation committed before is gone"
        new = ids - set(tpl.kept)
        assert len(new) <= 1, f"{len(new)} new generations"
        assert all(look.generations[g]["name"] == name for g in new)
        return "committed" if new else "nothing"

    def finished(look: Look, trial: Trial) -> None:
        new = set(look.generations) - set(tpl.kept)
        assert set(tpl.kept) <= set(look.generations) and 1 <= len(new) <= 2, sorted(new)
        _no_live_lock(look, f"{kind} backup")

    return Command(
        f"{kind} backup",
        tpl,
        ("backup", str(source), "--name", name, "--type", kind),
        expected,
        committed,
        finished,
    )


def _forget(t: Templates) -> Command:
    """Forget deletes manifests, dependents before their parents (FORMAT.md 14.2): a
    generation is listed or not, a listed one restores (so its parent is there), and the
    ones the rule keeps are never touched."""
    tpl = t.many

    def committed(look: Look) -> str:
        ids = set(look.generations)
        assert t.survivors <= ids, "forget removed a generation the rule keeps"
        gone = len(set(tpl.kept) - ids)
        return "all removed" if gone == 3 else f"{gone} of 3 removed"

    def finished(look: Look, trial: Trial) -> None:
        assert set(look.generations) == t.survivors
        _no_live_lock(look, "forget")

    return Command(
        "forget",
        tpl,
        ("forget", "--name", "db", "--keep-last", "1"),
        tpl.kept.get,
        committed,
        finished,
    )


def _prune(t: Templates) -> Command:
    """Prune (threshold 0: every pack with waste is repacked) changes no generation; what
    an interrupted one leaves, the next one removes."""
    tpl = t.forgotten

    def committed(look: Look) -> str:
        assert set(look.generations) == set(tpl.kept), "the generations changed"
        done = look.verify["index_objects"] == 1 and look.verify["packs_unindexed"] == 0
        return "done" if done else "leftovers"

    def finished(look: Look, trial: Trial) -> None:
        assert set(look.generations) == set(tpl.kept), "the generations changed"
        _pruned(look, trial, "prune")
        _no_live_lock(look, "prune")

    return Command(
        "prune", tpl, ("prune", "--repack-threshold", "0"), tpl.kept.get, committed, finished
    )


def _rotate(t: Templates, reencrypt: bool) -> Command:
    """A rotation killed anywhere leaves a repository that opens with the passphrase, in
    which every generation restores; the next `key rotate` finishes it (one active
    epoch; with --reencrypt, no pending re-encryption and the prune's end state)."""
    tpl = t.base
    args = ("key", "rotate", "--reencrypt") if reencrypt else ("key", "rotate")

    def committed(look: Look) -> str:
        assert set(look.generations) == set(tpl.kept), "the generations changed"
        ring = look.keyring
        if ring["current"] == 1:
            return "not started"
        if ring["active"] > 1 or ring["reencrypt_below"] is not None:
            return "pending"
        return "rotated"

    def finished(look: Look, trial: Trial) -> None:
        assert set(look.generations) == set(tpl.kept), "the generations changed"
        ring = look.keyring
        assert ring["current"] > 1 and ring["active"] == 1, ring
        assert ring["reencrypt_below"] is None, ring
        if reencrypt:
            _pruned(look, trial, " ".join(args))
        _no_live_lock(look, " ".join(args))

    return Command(" ".join(args), tpl, args, tpl.kept.get, committed, finished)


COMMANDS: dict[str, Callable[[Templates], Command]] = {
    "full-backup": lambda t: _backup(t, True),
    "incremental-backup": lambda t: _backup(t, False),
    "forget": _forget,
    "prune": _prune,
    "key-rotate": lambda t: _rotate(t, False),
    "key-rotate-reencrypt": lambda t: _rotate(t, True),
}


# --- the trials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    mode: str
    at: int
    crashed: str | None  # the operation the child died at; None: it ran to the end
    word: str  # what the crashed state was: "committed", "nothing", "torn pack", ...


def _rerun(trial: Trial, args: tuple[str, ...], where: str) -> None:
    again = trial.run(args)
    assert again.rc == 0 and "Traceback" not in again.output, (
        f"{where}: `dedupe {' '.join(args)}` then exited {again.rc}:\n{again.output}"
    )


def _shape(op: str) -> str:
    """An operation with its names made generic (object ids, temporary names and pack
    directories are random): the same step of a command has the same shape in every run."""
    op = re.sub(r"\.tmp-[0-9a-f]+", ".tmp-*", op)
    op = re.sub(r"[0-9a-f]{32,64}", "<id>", op)
    return re.sub(r"packs/[0-9a-f]{2}", "packs/xx", op)


def _started(trial: Trial, cmd: Command, mode: str, at: int, expected: str | None) -> Ran:
    """Run the command with the injection; it dies at the operation the probe had at that
    index (the same shape; "newdir" points vary, `expected` is None), or runs to the end
    when the probe had no such operation."""
    ran = trial.run(cmd.args, mode, at)
    where = f"{cmd.label}, {mode} #{at}, in {trial.repo}"
    if ran.crashed is None:
        assert ran.rc == 0, f"{where}: exit {ran.rc}:\n{ran.output}"
        assert expected is None, f"{where}: ran to the end, the probe had {expected} there"
    else:
        assert ran.rc == CRASHED and ran.op is not None, f"{where}: {ran.rc}\n{ran.output}"
        if mode == "newdir":
            assert ran.op.endswith(NEW_DIR), f"{where}: died at {ran.op}"
        else:
            assert expected is not None and _shape(ran.op) == _shape(expected), (
                f"{where}: died at {ran.op}, the probe had {expected} there"
            )
    return ran


def _crash_trial(
    helper: Helper, cmd: Command, mode: str, at: int, expected: str | None, path: Path
) -> Outcome:
    """A clean crash ("crash", "newdir") or one leaving a torn temporary file ("torn-tmp")
    at operation `at`: the crashed state is clean as it is, the command took effect wholly
    or not at all, the re-run succeeds and leaves a clean repository. After a torn
    temporary file, a prune leaves no temporary file."""
    trial = Trial(helper, cmd.template, path)
    ran = _started(trial, cmd, mode, at, expected)
    where = f"{cmd.label}, {mode} #{at} ({ran.crashed or 'ran to the end'}), in {trial.repo}"
    if mode == "torn-tmp" and ran.crashed:
        assert trial.tmp_files(), f"{where}: the torn temporary file is not there"
    look = trial.look()
    _clean(look, cmd, where)
    word = cmd.committed(look) if ran.crashed else "ran to the end"
    _rerun(trial, cmd.args, where)
    final = trial.look()
    _clean(final, cmd, f"{where}, after the re-run")
    cmd.finished(final, trial)
    if mode == "torn-tmp":
        _rerun(trial, ("prune",), where)
        assert not trial.tmp_files(), f"{where}: temporary files survive prune"
    shutil.rmtree(path)
    return Outcome(mode, at, ran.crashed, word)


def _torn_name(op: str) -> str:
    """The object an operation "rename .tmp-x -> packs/ab/ab..." (or "link") puts in place."""
    return op.split(" -> ", 1)[1]


def _refuses_naming(ran: Ran, torn: str, where: str) -> None:
    assert "Traceback" not in ran.output, f"{where}: a traceback:\n{ran.output}"
    assert "dedupe: error:" in ran.output and torn.rsplit("/", 1)[-1] in ran.output, (
        f"{where}: exit {ran.rc} without naming {torn}:\n{ran.output}"
    )


def _recover_torn_final(trial: Trial, cmd: Command, torn: str, listed: bool, where: str) -> str:
    """The command again, then `prune`. Each either succeeds or refuses with an error that
    names the torn object (exit code of a DedupeError, no traceback). Only a torn index
    object or manifest may make them refuse: prune (and `key rotate --reencrypt`, which
    prunes) will not run while an authenticated index object or manifest does not open,
    as it cannot know what that object lists or references (FORMAT.md 14.3). The remedy
    is then the operator's: `dedupe forget ID` for a manifest that is still listed (its
    header survived), else removing the object the error names (the test deletes that
    file); then prune, and the command again if it was the one that refused. Returns
    how it recovered: "" (by itself), "with forget" or "by hand"."""
    again = trial.run(cmd.args)
    if again.rc == 0:
        assert "Traceback" not in again.output, f"{where}: {again.output}"
        pruned = trial.run(("prune",))
        if pruned.rc == 0:
            assert "Traceback" not in pruned.output, f"{where}: {pruned.output}"
            return ""
        _refuses_naming(pruned, torn, f"{where}, prune")
    else:
        _refuses_naming(again, torn, f"{where}, the re-run")
    kind, name = torn.split("/", 1)
    assert kind in ("index", "generations"), f"{where}: refused because of {torn}"
    if kind == "generations" and listed:
        how = "with forget"
        _rerun(trial, ("forget", name), f"{where}, forgetting {name}")
    else:
        how = "by hand"
        (trial.repo / torn).unlink()
    _rerun(trial, ("prune",), f"{where}, {torn} removed ({how})")
    if again.rc != 0:
        _rerun(trial, cmd.args, f"{where}, {torn} removed ({how})")
    return how


def _torn_gone(trial: Trial, torn: str, where: str) -> None:
    """After recovery the torn object is gone, or whole: a re-run that writes the same
    content (a key map consolidated again, the same keyring) puts the complete object
    under the same name. Packs, index objects and key maps are named by the BLAKE3 of
    their bytes; a manifest or keyring copy that is there passed verify."""
    path = trial.repo / torn
    kind = torn.split("/")[0]
    if path.exists() and kind in ("packs", "index", "keymaps"):
        assert blake3.blake3(path.read_bytes()).hexdigest() == path.name, (
            f"{where}: {torn} is still torn"
        )
    elif kind == "locks":
        assert not path.exists(), f"{where}: {torn} is still there"


def _torn_final_trial(
    helper: Helper, cmd: Command, at: int, expected: str | None, path: Path
) -> Outcome:
    """Half an object under its final name (a store without atomic renames): detected and
    named, never used; recovered by the re-run and prune (see _recover_torn_final)."""
    trial = Trial(helper, cmd.template, path)
    ran = _started(trial, cmd, "torn-final", at, expected)
    where = f"{cmd.label}, torn-final #{at} ({ran.crashed or 'ran to the end'}), in {trial.repo}"
    if ran.crashed is None:
        _clean(trial.look(), cmd, where)
        shutil.rmtree(path)
        return Outcome("torn-final", at, None, "ran to the end")
    assert ran.op is not None
    torn = _torn_name(ran.op)
    kind = torn.split("/")[0]
    look = trial.look()
    look.fail_if_broken(where)
    # No wrong bytes: a listed generation restores right, or is the torn manifest (its
    # header survived, so it is listed) and fails with an error naming it.
    for gid, g in look.generations.items():
        if "error" in g:
            assert torn == f"generations/{gid}", f"{where}: {gid[:12]}: {g['error']}"
            assert gid in g["error"], g["error"]
        else:
            assert g["sha256"] == cmd.expected(gid), f"{where}: {gid[:12]} restored wrong bytes"
    cmd.committed(look)  # what was committed before is there, all or nothing of the rest
    # Named where it matters.
    if kind == "packs":  # listed by no index object yet: never read; prune deletes it
        assert look.verify["ok"] and look.verify["packs_unindexed"] >= 1, (where, look.verify)
    elif kind == "locks":  # not a lock: it counts as a stale exclusive lock, so the first
        # locker after the crash (the look's own restores) removed it, blocking no one
        assert torn not in look.raw["locks"], (where, look.raw["locks"])
    else:
        assert torn in look.damaged(), f"{where}: verify does not name {torn}: {look.damaged()}"
    listed = torn.removeprefix("generations/") in look.generations
    how = _recover_torn_final(trial, cmd, torn, listed, where)
    final = trial.look()
    _clean(final, cmd, f"{where}, after recovery")
    cmd.finished(final, trial)
    _torn_gone(trial, torn, where)
    shutil.rmtree(path)
    word = f"torn {OBJECT_KINDS[kind]}" + (f" (recovered {how})" if how else "")
    return Outcome("torn-final", at, ran.crashed, word)


def _crash_points(count: int) -> tuple[list[int], str]:
    """Operation indexes to crash at (and `count`, which runs to the end): every one when
    `count <= EVERY_UP_TO`; else every one among the first and the last ENDS and a
    deterministic stride through the middle, about SAMPLE in all."""
    if count <= EVERY_UP_TO:
        return list(range(count + 1)), "every one"
    middle = range(ENDS, count - ENDS)
    stride = math.ceil(len(middle) / (SAMPLE - 2 * ENDS))
    points = [*range(ENDS), *middle[::stride], *range(count - ENDS, count + 1)]
    return points, f"the first and last {ENDS}, 1 in {stride} of the {len(middle)} between"


def _torn_points(kinds: list[str]) -> tuple[list[int], str]:
    """Put indexes to tear: every one when there are at most TORN_UP_TO; else the first
    and the last of each kind of object (a pack, an index object, keyring/1, ...)."""
    if len(kinds) <= TORN_UP_TO:
        return list(range(len(kinds) + 1)), "every one"
    chosen = {len(kinds)}
    for kind in set(kinds):
        at = [i for i, k in enumerate(kinds) if k == kind]
        chosen |= {at[0], at[-1]}
    return sorted(chosen), "the first and last of each kind of object"


def _kind(op: str) -> str:
    """The kind of object an operation writes: "packs", "index", "keyring/1", ..."""
    target = op.split(" -> ", 1)[1] if " -> " in op else op.rsplit(" ", 1)[-1]
    top = target.split("/", 1)[0]
    return target if top == "keyring" and "/.tmp-" not in target else top


def _is_tmp_fsync(op: str) -> bool:
    return op.startswith("fsync data of ") and os.path.basename(op).startswith(TMP_PREFIX)


def _is_commit(op: str) -> bool:
    return op.startswith((f"rename {TMP_PREFIX}", f"link {TMP_PREFIX}"))


MODES = {
    "crash": "operations",
    "newdir": "fsyncs of a directory given a new subdirectory",
    "torn-tmp": "temporary files written",
    "torn-final": "objects renamed or linked into place",
}


def _exercise(cmd: Command, helpers: queue.Queue[Helper], tmp_path: Path) -> list[str]:
    """Probe the command, then crash it at every chosen point of every mode, WORKERS
    trials at a time. Returns the lines to print."""
    started = time.monotonic()
    helper = helpers.get()
    try:
        probe = Trial(helper, cmd.template, tmp_path / "probe").run(cmd.args)
    finally:
        helpers.put(helper)
    assert probe.rc == 0, probe.output
    ops = {
        "crash": [op for op in probe.log if not op.endswith(NEW_DIR)],
        "newdir": [op for op in probe.log if op.endswith(NEW_DIR)],
        "torn-tmp": [op for op in probe.log if _is_tmp_fsync(op)],
        "torn-final": [op for op in probe.log if _is_commit(op)],
    }
    plans = {
        "crash": _crash_points(len(ops["crash"])),
        # How many directories a run creates varies (pack ids are random): every index
        # the probe had, then on until a run gets to the end.
        "newdir": (list(range(len(ops["newdir"]) + 1)), "every one"),
        "torn-tmp": _torn_points([_kind(op) for op in ops["torn-tmp"]]),
        "torn-final": _torn_points([_kind(op) for op in ops["torn-final"]]),
    }

    def one(mode: str, at: int) -> Outcome:
        expected = ops[mode][at] if at < len(ops[mode]) and mode != "newdir" else None
        helper = helpers.get()
        try:
            path = tmp_path / f"{mode}-{at}"
            if mode == "torn-final":
                return _torn_final_trial(helper, cmd, at, expected, path)
            return _crash_trial(helper, cmd, mode, at, expected, path)
        finally:
            helpers.put(helper)

    outcomes: list[Outcome] = []
    failures: list[tuple[str, int, Exception]] = []
    with ThreadPoolExecutor(WORKERS) as pool:
        jobs = {(m, at): pool.submit(one, m, at) for m, (ats, _) in plans.items() for at in ats}
        for (mode, at), job in jobs.items():
            try:
                outcomes.append(job.result())
            except Exception as e:  # an assertion, or a child that broke the protocol
                failures.append((mode, at, e))
    if failures:
        # Every failing point, one line each; the first one's traceback follows.
        summary = "\n".join(
            f"  {m} #{at}: {(str(e) or repr(e)).splitlines()[0]}" for m, at, e in failures
        )
        raise AssertionError(
            f"{cmd.label}: {len(failures)} of {len(jobs)} crash points fail:\n{summary}"
        ) from failures[0][2]
    ats = plans["newdir"][0]
    while all(o.crashed for o in outcomes if o.mode == "newdir"):
        assert len(ats) < 3 * len(ops["newdir"]) + 10, f"{cmd.label}: no run gets to the end"
        ats.append(len(ats))
        outcomes.append(one("newdir", ats[-1]))

    lines = []
    for mode, (ats, how) in plans.items():
        crashed = [o for o in outcomes if o.mode == mode and o.crashed]
        words: dict[str, int] = {}
        for o in crashed:
            words[o.word] = words.get(o.word, 0) + 1
        lines.append(
            f"{cmd.label} [{mode}]: {len(ops[mode])} {MODES[mode]}, {len(ats)} points tried "
            f"({how}), {len(crashed)} crashes, all passed; left: "
            + (", ".join(f"{w} x{n}" for w, n in sorted(words.items())) or "-")
        )
    lines.append(f"{cmd.label}: {len(outcomes)} trials in {time.monotonic() - started:.1f} s")
    return lines


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_crash_point(
    command: str, templates: Templates, helpers: queue.Queue[Helper], tmp_path: Path
) -> None:
    """Crashed at any backend operation (cleanly, leaving a torn temporary file, or
    leaving a torn object where a store without atomic renames could), the command
    leaves a repository that is valid as it is, holds all or nothing of its work, and
    is finished by running it again."""
    for line in _exercise(COMMANDS[command](templates), helpers, tmp_path):
        print(line)
