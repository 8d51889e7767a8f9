"""`dedupe key rotate --reencrypt` killed with SIGKILL in the middle of its work
(docs/FORMAT.md 10.1, 10.2): the repository stays valid (every generation restores byte
for byte, `verify --read-data` passes), the keyring still says the job is pending, and
running the command again finishes it: `reencrypt_below` null, one active epoch, every
pack's data key born in the new epoch, no pack from before the first attempt left.

The kill points are not random times: the test watches the repository directory while
the real command runs and sends SIGKILL the moment a chosen state is first seen (the new
keyring, the k-th new pack, the n-th index object written on the way, the first old index
object or pack deleted, ...). The killed child runs with REENCRYPT_FLUSH lowered (a module
constant, set from `python -c`; no product code changes) so that it writes an index object
every FLUSH new packs, as it would every 256 on a real repository. The re-run that must
finish the job is the plain command (`key rotate --reencrypt`, or `key rotate`, which
finishes a pending re-encryption too). Run with -s to see where each trial died and what
it left.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import PASSPHRASE, dedupe_cli, make_repo

import dedupe
from dedupe import Repository
from dedupe.format.keymap import PACK

FLUSH = 8  # REENCRYPT_FLUSH in the killed children
MIN_PACKS = 200  # the template must have at least this many packs (64 KiB each)
CHILD_TIMEOUT = 60.0
ROOT = Path(dedupe.__file__).resolve().parents[1]
CHILD = (
    "import sys; import dedupe.engine.prune as p; p.REENCRYPT_FLUSH = {flush}; "
    "from dedupe.cli import main; "
    "sys.argv = ['dedupe', 'key', 'rotate', '--reencrypt']; main()"
)


# --- the repository ----------------------------------------------------------------------------


def generations_data() -> list[tuple[str, str, bytes]]:
    """(name, kind, bytes): fulls, incrementals and a differential of random and repeated
    data; the generation named "old" is forgotten before the test (garbage for prune)."""
    rnd = random.Random(20240611)

    def change(data: bytearray, times: int, size: int) -> bytes:
        for _ in range(times):
            at = rnd.randrange(0, len(data) - size)
            data[at : at + size] = rnd.randbytes(size)
        return bytes(data)

    db = bytearray(rnd.randbytes(6_000_000))
    out = [("db", "full", bytes(db))]
    out.append(("db", "incremental", change(db, 6, 150_000)))
    out.append(("db", "incremental", change(db, 6, 150_000)))
    out.append(("old", "full", rnd.randbytes(4_000_000)))
    out.append(("db", "differential", change(db, 4, 120_000)))
    logs = bytearray(rnd.randbytes(150_000) * 8 + rnd.randbytes(3_000_000))  # repeats itself
    out.append(("logs", "full", bytes(logs)))
    out.append(("logs", "incremental", change(logs, 1, 400_000)))
    return out


@dataclass(frozen=True)
class Snap:
    """What the repository directory shows at one instant (no keys needed)."""

    packs: frozenset[str]
    index: frozenset[str]
    tmp: int  # temporary files (".tmp-*") a killed writer left
    serials: tuple[int, int]  # keyring/1, keyring/2
    active: int  # active epochs in the newest keyring copy
    current: int
    below: int | None  # reencrypt_below in the newest keyring copy
    locks: int

    @property
    def pending(self) -> bool:
        return self.below is not None or self.active > 1

    def describe(self) -> str:
        return (
            f"keyring serials {self.serials}, {self.active} active epoch(s), current "
            f"{self.current}, reencrypt_below {self.below}; {len(self.packs)} packs, "
            f"{len(self.index)} index objects, {self.tmp} temp files, {self.locks} locks"
        )


def _keyring(path: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((path / "keyring" / name).read_bytes())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def snap(path: Path) -> Snap:
    packs: set[str] = set()
    tmp = 0
    for d in os.scandir(path / "packs"):
        if not d.is_dir():
            continue
        for f in os.scandir(d.path):
            if f.name.startswith("."):
                tmp += 1
            else:
                packs.add(f.name)
    index = {n for n in os.listdir(path / "index") if not n.startswith(".")}
    tmp += sum(1 for n in os.listdir(path / "index") if n.startswith("."))
    rings = [_keyring(path, "1"), _keyring(path, "2")]
    newest = max((r for r in rings if r), key=lambda r: r["serial"])
    locks = path / "locks"
    return Snap(
        packs=frozenset(packs),
        index=frozenset(index),
        tmp=tmp,
        serials=(rings[0]["serial"] if rings[0] else -1, rings[1]["serial"] if rings[1] else -1),
        active=sum(1 for e in newest["epochs"] if e["state"] == "active"),
        current=newest["current_epoch"],
        below=newest["reencrypt_below"],
        locks=sum(1 for n in os.listdir(locks) if not n.startswith(".")) if locks.exists() else 0,
    )


@dataclass
class Template:
    path: Path
    kept: dict[str, bytes]  # generation id -> bytes
    before: Snap
    new_packs: int  # packs an uninterrupted re-encryption writes
    seconds: float  # how long the uninterrupted command takes


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    base = tmp_path_factory.mktemp("reencrypt-kill")
    path = base / "template"

    async def build() -> dict[str, bytes]:
        async with await make_repo(path) as repo:
            by_id, old = {}, []
            for name, kind, data in generations_data():
                s = await repo.backup(io.BytesIO(data), name=name, kind=kind)
                by_id[s.id] = data
                if name == "old":
                    old.append(s.id)
            await repo.forget(ids=old)
            gens = await repo.generations()
            assert len(gens) == len(by_id) - len(old)
            return {g.id: by_id[g.id] for g in gens}

    kept = asyncio.run(build())
    before = snap(path)
    assert len(before.packs) >= MIN_PACKS, f"only {len(before.packs)} packs: make more data"
    assert len(before.index) > 1 and before.below is None and before.active == 1

    # An uninterrupted run, for scale: how many packs it writes and how long it takes.
    probe = base / "probe"
    _copy(path, probe)
    started = time.monotonic()
    proc = _start(probe, base / "probe-state")
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, err.decode()
    after = snap(probe)
    assert not after.pending and not (after.packs & before.packs), after.describe()
    shutil.rmtree(probe)
    return Template(path, kept, before, len(after.packs), seconds)


def _copy(src: Path, dst: Path) -> None:
    """A copy of the template, files hard-linked: the local backend never changes a file in
    place (it writes a temporary file and renames it, docs/FORMAT.md section 9), so what a
    trial writes or deletes never reaches the template."""
    shutil.copytree(src, dst, copy_function=os.link)


# --- the child and the kill --------------------------------------------------------------------


def _env(repo: Path, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEDUPE_")}
    # The keyring serial this "machine" has seen (rollback detection): one state directory
    # per trial, since every trial starts again from copies of the same repository.
    env.update(DEDUPE_REPO=str(repo), DEDUPE_PASSWORD=PASSPHRASE, DEDUPE_STATE_DIR=str(state))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _start(repo: Path, state: Path, flush: int = FLUSH) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD.format(flush=flush)],
        env=_env(repo, state),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


Condition = Callable[[Snap, Snap, Snap], bool]  # (template, attempt start, now) -> kill?


@dataclass
class Kill:
    label: str
    condition: Condition


def new_keyring() -> Kill:
    return Kill("new keyring seen", lambda t, b, n: max(n.serials) > max(b.serials))


def retired() -> Kill:
    """Both copies say: old epochs retired, re-encryption pending (rewrite about to start)."""
    return Kill(
        "old epoch retired (both keyring copies)",
        lambda t, b, n: n.active == 1 and n.below is not None and n.serials[0] == n.serials[1],
    )


def new_packs(k: int) -> Kill:
    return Kill(f"{k} new pack(s)", lambda t, b, n: len(n.packs - b.packs) >= k)


def new_index(k: int) -> Kill:
    return Kill(f"{k} new index object(s)", lambda t, b, n: len(n.index - b.index) >= k)


def index_deleted() -> Kill:
    return Kill("an old index object deleted", lambda t, b, n: bool(b.index - n.index))


def pack_deleted() -> Kill:
    return Kill("an old pack deleted", lambda t, b, n: bool(t.packs & b.packs - n.packs))


def old_packs_gone() -> Kill:
    return Kill("every old pack deleted", lambda t, b, n: not (t.packs & n.packs))


@dataclass
class Attempt:
    kill: Kill
    observed: bool = False
    seconds: float = 0.0  # from start to the kill
    polls: int = 0
    rc: int | None = None
    seen: Snap | None = None  # the state that triggered the kill
    left: Snap | None = None  # the state the kill left
    start: Snap | None = None
    verify: str = ""  # what verify --read-data said after the kill

    def summary(self, t: Template) -> str:
        assert self.left is not None and self.start is not None
        left, start = self.left, self.start
        written = len(left.packs - start.packs)
        seen = f" with {len(self.seen.packs - start.packs)} new packs" if self.seen else ""
        return (
            f"kill at '{self.kill.label}' "
            f"{'observed' + seen if self.observed else 'NOT observed (child exited first)'} "
            f"after {self.seconds:.3f} s ({self.polls} polls), exit {self.rc}: this run wrote "
            f"{written} new packs and {len(left.index - start.index)} index objects, deleted "
            f"{len(start.index - left.index)} index objects and "
            f"{len(t.before.packs & start.packs - left.packs)} old packs "
            f"({len(t.before.packs & left.packs)} of {len(t.before.packs)} left); "
            f"{'PENDING' if left.pending else 'not pending'}: {left.describe()}"
        )


def run_until(repo: Path, state: Path, t: Template, kill: Kill) -> Attempt:
    """Start the command; SIGKILL it as soon as `kill.condition` is seen."""
    a = Attempt(kill, start=snap(repo))
    assert a.start is not None
    started = time.monotonic()
    proc = _start(repo, state)
    try:
        while proc.poll() is None:
            now = snap(repo)
            a.polls += 1
            if kill.condition(t.before, a.start, now):
                proc.kill()
                a.observed, a.seen = True, now
                break
            if time.monotonic() - started > CHILD_TIMEOUT:
                pytest.fail(f"the command ran over {CHILD_TIMEOUT} s without '{kill.label}'")
        a.seconds = time.monotonic() - started
        _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    a.rc = proc.returncode
    if not a.observed:
        assert a.rc == 0, f"the command failed on its own: {err.decode()}"
    a.left = snap(repo)
    return a


# --- checks ------------------------------------------------------------------------------------


async def _restore_all(repo_path: Path, kept: dict[str, bytes]) -> None:
    async with await Repository.open(repo_path, PASSPHRASE) as repo:
        gens = await repo.generations()
        assert sorted(g.id for g in gens) == sorted(kept), "the generations changed"
        for g in gens:
            out = io.BytesIO()
            await repo.restore(g.id, out)
            assert out.getvalue() == kept[g.id], f"generation {g.id[:12]} restored wrong bytes"


async def _finished(repo_path: Path, kept: dict[str, bytes]) -> tuple[dict[str, int], Any]:
    """After the job: every generation restores; each pack's key map entry's `born` (the
    epoch its data key was made in); verify --read-data through the API."""
    await _restore_all(repo_path, kept)
    async with await Repository.open(repo_path, PASSPHRASE) as repo:
        await repo._store.refresh_keys()
        borns = {
            oid.hex(): found.entry.born for oid, found in repo._store.keymaps.entries(PACK).items()
        }
        return borns, await repo.verify(read_data=True)


def _verify(env: dict[str, str], left: Snap | None = None) -> str:
    """`verify --read-data` must pass. A kill between the writes of keyring/1 and
    keyring/2 leaves keyring/2 one serial behind: verify notes it, and it is no damage
    (docs/FORMAT.md 4.3), so it passes then too."""
    r = dedupe_cli("verify", "--read-data", "--json", env=env)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, f"verify --read-data exited {r.returncode}:\n{out}"
    report = json.loads(r.stdout)
    assert report["ok"] and report["packs_read"] == report["packs"], out
    if left is not None and left.serials[1] < left.serials[0]:
        assert any("keyring/2" in n for n in report["notes"]), out
        return "ok, keyring/2 noted as behind (killed between the two keyring writes)"
    return "ok"


@dataclass
class Outcome:
    trial: str
    attempts: list[Attempt] = field(default_factory=list)
    rerun: dict[str, Any] | None = None
    reused: int = 0  # packs written by killed runs that the finished job kept
    seconds: float = 0.0


def trial(
    t: Template,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    kills: list[Kill],
    rerun: tuple[str, ...],
) -> Outcome:
    started = time.monotonic()
    repo = tmp_path / name
    state = tmp_path / f"{name}-state"
    _copy(t.path, repo)
    monkeypatch.setenv("DEDUPE_STATE_DIR", str(state))  # for the API calls in this process
    env = _env(repo, state)
    epoch = t.before.current + 1  # the epoch the re-encryption starts (reencrypt_below)
    o = Outcome(name)
    written_by_kills: list[set[str]] = []
    for kill in kills:
        a = run_until(repo, state, t, kill)
        o.attempts.append(a)
        print(f"{name}: {a.summary(t)}")
        assert a.left is not None and a.start is not None
        if a.left.pending:
            assert a.left.current == epoch, a.left.describe()
        written_by_kills.append(set(a.left.packs - t.before.packs))
        # Valid in the middle of the job: everything restores, verify reads everything.
        asyncio.run(_restore_all(repo, t.kept))
        a.verify = _verify(env, a.left)
        print(f"{name}: every generation restores; verify --read-data: {a.verify}")

    # The plain command (REENCRYPT_FLUSH untouched) finishes the job. Plain `key rotate`
    # finishes a pending re-encryption too. (Were the job done already, because the child
    # exited before the kill, running it again would start another epoch: not then.)
    if snap(repo).pending:
        r = dedupe_cli(*rerun, "--json", env=env)
        out = (r.stdout + r.stderr).decode()
        assert r.returncode == 0, f"re-run exited {r.returncode}: {out}"
        o.rerun = json.loads(r.stdout)
    elif snap(repo).serials[0] != snap(repo).serials[1]:
        # The kill landed late (a loaded machine polls slowly): after the job, between the
        # two keyring writes. The newer copy is in effect (FORMAT.md 4.3); the next command
        # that writes the keyring, here prune, gives both its bytes.
        r = dedupe_cli("prune", env=env)
        assert r.returncode == 0, (r.stdout + r.stderr).decode()
    end = snap(repo)
    assert end.serials[0] == end.serials[1], end.describe()
    assert end.below is None and end.active == 1 and end.current == epoch, end.describe()
    assert not (end.packs & t.before.packs), (
        f"{len(end.packs & t.before.packs)} packs from before the first attempt remain"
    )
    assert len(end.index) == 1 and end.locks == 0 and end.tmp == 0, end.describe()
    borns, report = asyncio.run(_finished(repo, t.kept))
    assert set(borns) == set(end.packs), "key map entries and packs differ"
    old_keys = {p: b for p, b in borns.items() if b < epoch}
    assert not old_keys, f"{len(old_keys)} packs have data keys born before epoch {epoch}"
    assert report.ok and report.packs_read == len(end.packs), report

    # What the killed runs wrote and indexed on the way is kept, not written again.
    for a, written in zip(o.attempts, written_by_kills, strict=True):
        assert a.left is not None and a.start is not None
        indexed = len(a.left.index - a.start.index)
        survivors = written & end.packs
        assert len(survivors) >= FLUSH * max(0, indexed - 2), (
            f"'{a.kill.label}': {indexed} index objects written, yet only {len(survivors)} "
            f"of its {len(written)} new packs were kept"
        )
    o.reused = len(set().union(*written_by_kills) & end.packs)
    o.seconds = time.monotonic() - started
    p = (o.rerun or {}).get("reencrypted") or {}
    print(
        f"{name}: re-run '{' '.join(rerun)}' (resumed={(o.rerun or {}).get('resumed')}) "
        f"rewrote {p.get('packs_repacked')} packs into {p.get('packs_written')}, deleted "
        f"{p.get('packs_deleted')}; {o.reused} packs written by the killed run(s) kept; "
        f"{len(end.packs)} packs in the end, {end.tmp} temp files left; trial took "
        f"{o.seconds:.2f} s"
    )
    shutil.rmtree(repo)
    assert snap(t.path) == t.before, "the template changed (hard links written through?)"
    return o


def test_reencrypt_survives_kill(
    template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = template
    half = t.new_packs // 2
    print(
        f"\nre-encryption kill test: {len(t.before.packs)} packs (64 KiB), "
        f"{len(t.before.index)} index objects, {len(t.kept)} generations; an uninterrupted "
        f"run writes {t.new_packs} packs in {t.seconds:.2f} s (index object every {FLUSH})"
    )
    reencrypt = ("key", "rotate", "--reencrypt")
    trials: list[tuple[str, list[Kill], tuple[str, ...]]] = [
        ("keyring", [new_keyring()], reencrypt),
        ("retired", [retired()], reencrypt),
        ("pack1", [new_packs(1)], reencrypt),
        ("pack13", [new_packs(13)], reencrypt),
        ("index3", [new_index(3)], reencrypt),
        (f"pack{half}", [new_packs(half)], ("key", "rotate")),
        ("index-deleted", [index_deleted()], reencrypt),
        ("pack-deleted", [pack_deleted()], reencrypt),
        ("old-packs-gone", [old_packs_gone()], ("key", "rotate")),
        ("twice", [new_packs(30), new_packs(25)], reencrypt),
    ]
    outcomes = []
    for name, kills, rerun in trials:
        try:
            outcomes.append(trial(t, tmp_path, monkeypatch, name, kills, rerun))
        except BaseException:
            print(f"FAILED: trial {name}; repository kept at {tmp_path / name}")
            raise
    attempts = [a for o in outcomes for a in o.attempts]
    pending = [a for a in attempts if a.left is not None and a.left.pending]
    mid = [
        a
        for a in attempts
        if a.left is not None
        and a.start is not None
        and a.left.packs - a.start.packs
        and t.before.packs & a.left.packs
    ]
    print(
        f"{len(attempts)} kills: {len(pending)} left the job pending, {len(mid)} landed mid-"
        f"rewrite (new packs written, old packs left)"
    )
    assert len(pending) >= len(attempts) - 1, [a.summary(t) for a in attempts]
    assert len(mid) >= 5, [a.summary(t) for a in attempts]
