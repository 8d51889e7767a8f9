"""The public API's annotations resolve at run time: `typing.get_type_hints` (what pydantic,
typer, FastAPI and cattrs call) succeeds with default arguments on every public function
and method reachable from `dedupe` and `dedupe.api`, and on the dataclasses they take and
return.

dedupe.api loads most of the engine lazily (tests/test_startup.py), so an annotation may
not name a class the module only imports under TYPE_CHECKING: get_type_hints evaluates it
in the module's namespace, and a module's PEP 562 __getattr__ is no part of that. The
callables are enumerated, not listed by hand, so that a new method is checked too.

A name loaded through the lazy exports is kept in the module (dedupe._lazy), and from then
on an annotation naming it resolves: whether the hints resolved would depend on what ran
before. The check takes those names out of the modules while it runs
(`_lazy_names_not_loaded`), and is also run in an interpreter that has imported nothing
but `dedupe` (run as a script, this file prints what it found): that is how a tool meets
the API.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dedupe

PROJECT_ROOT = Path(dedupe.__file__).resolve().parents[1]
# dedupe.api first: what both export is named after the module that defines it.
PUBLIC_MODULES = ("dedupe.api", "dedupe")
# Classes outside the public modules that the API hands out as handles.
HANDLES = ("Replicas", "Objectives")


def _roots() -> Iterator[tuple[str, Any]]:
    """Every name the public modules export, and every public function and class that
    dedupe.api defines (exported or not), as (qualified name, object)."""
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = set(module.__all__)
        names |= {
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value))
            and value.__module__ == module_name
        }
        for name in sorted(names):
            yield f"{module_name}.{name}", getattr(module, name)


@contextmanager
def _lazy_names_not_loaded() -> Iterator[None]:
    """The public modules as `import dedupe.api` leaves them: the names of their lazy
    exports that a look-up (this test's, or an earlier test's) kept in them are taken out
    for the duration, and put back after."""
    taken: list[tuple[dict[str, Any], str, Any]] = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        namespace = vars(module)
        lazy = getattr(module, "_EXPORTS", None) or module._LAZY_EXPORTS
        taken += [(namespace, name, namespace.pop(name)) for name in lazy if name in namespace]
    try:
        yield
    finally:
        for namespace, name, value in taken:
            namespace[name] = value


def _members(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    """The functions behind the public methods and properties of `cls` (and __init__),
    including those it inherits from dedupe classes."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("dedupe"):
            continue
        for name, attr in vars(klass).items():
            if name in seen or (name.startswith("_") and name != "__init__"):
                continue
            seen.add(name)
            if isinstance(attr, staticmethod | classmethod):
                yield name, attr.__func__
            elif isinstance(attr, property):
                for part in ("fget", "fset", "fdel"):
                    if getattr(attr, part) is not None:
                        yield f"{name}.{part}", getattr(attr, part)
            elif isinstance(attr, functools.cached_property):
                yield name, attr.func
            elif inspect.isfunction(attr):
                yield name, attr


def _classes_in(hint: Any) -> Iterator[type]:
    """The classes a resolved annotation mentions (inside unions, generics, Callable)."""
    if isinstance(hint, list | tuple):  # Callable's parameter list
        for h in hint:
            yield from _classes_in(h)
    elif typing.get_origin(hint) is not None:  # before isinstance: list[X] passes for a type
        for h in typing.get_args(hint):
            yield from _classes_in(h)
    elif isinstance(hint, type):
        yield hint


def _followed(cls: type) -> bool:
    """A class met in a resolved annotation whose own hints are checked too: the public
    dataclasses (reports and records), and the handles the API hands out (repo.replicas,
    repo.objectives), whose methods are API as much as the Repository's."""
    return (
        cls.__module__.startswith("dedupe")
        and not cls.__name__.startswith("_")
        and (dataclasses.is_dataclass(cls) or cls.__qualname__ in HANDLES)
    )


def check_hints() -> tuple[list[str], list[str]]:
    """(what was checked, what failed with why). From the exported names, every public
    dataclass met in a resolved annotation is checked too, transitively: the reports the
    methods return and the records those hold."""
    checked: list[str] = []
    failed: list[str] = []

    def hints(label: str, obj: Any) -> list[Any]:
        checked.append(label)
        try:
            return list(typing.get_type_hints(obj).values())
        except Exception as e:  # NameError mostly; whatever it is, it is a failure
            failed.append(f"{label}: {type(e).__name__}: {e}")
            return []

    queue = list(_roots())  # looking the names up loads the lazy ones: taken out below
    seen: set[int] = set()
    with _lazy_names_not_loaded():
        while queue:
            label, obj = queue.pop(0)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                found = hints(label, obj)
            elif inspect.isclass(obj) and obj.__module__.startswith("dedupe"):
                found = hints(label, obj)  # a dataclass's fields
                for name, func in _members(obj):
                    found += hints(f"{label}.{name}", func)
            else:
                continue  # a type alias or a constant: met through the callables using it
            for cls in (c for hint in found for c in _classes_in(hint)):
                if _followed(cls) and id(cls) not in seen:
                    queue.append((f"{cls.__module__}.{cls.__qualname__}", cls))
    return checked, failed


def test_every_public_callable_has_resolvable_hints() -> None:
    checked, failed = check_hints()
    assert failed == []
    # The enumeration found what it is for: the handle's methods and properties, the key
    # manager's, the sources, and the reports reached only through return annotations.
    for label in (
        "dedupe.api.Repository.backup",
        "dedupe.api.Repository.verify",
        "dedupe.api.Repository.replicas",
        "dedupe.api.Repository.id.fget",
        "dedupe.api.KeyManager.rotate",
        "dedupe.api.postgres_basebackup",
        "dedupe.DamagedObject",
        "dedupe.engine.forget.ForgetDecision",
        "dedupe.engine.repair.SkippedPack",
        "dedupe.engine.keys.EpochStatus",
        "dedupe.replication.Replicas.add",
        "dedupe.objectives.Objectives.status",
    ):
        assert label in checked


def test_hints_resolve_in_an_interpreter_that_imported_only_dedupe(tmp_path: Path) -> None:
    """Here every module is loaded already; a tool reading the hints meets the API as
    `import dedupe` leaves it, with the engine's modules not loaded yet."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    proc = subprocess.run(
        [sys.executable, __file__],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    checked, failed = json.loads(proc.stdout)
    assert len(checked) > 50
    assert failed == []


def test_hints_are_the_classes_themselves() -> None:
    """An annotation resolves to the class the method returns, not to a look-alike."""
    import dedupe.api
    import dedupe.engine.keys
    import dedupe.engine.prune
    import dedupe.engine.verify
    import dedupe.replication

    repo, keys = dedupe.api.Repository, dedupe.api.KeyManager
    assert typing.get_type_hints(repo.prune)["return"] is dedupe.engine.prune.PruneReport
    assert typing.get_type_hints(repo.verify)["return"] is dedupe.engine.verify.VerifyReport
    assert typing.get_type_hints(keys.rotate)["return"] is dedupe.engine.keys.RotateReport
    replicas = repo.__dict__["replicas"].func
    assert typing.get_type_hints(replicas)["return"] is dedupe.replication.Replicas


def test_moved_names_are_the_same_objects_from_every_module() -> None:
    """What moved to dedupe._types (so that the API's annotations can name it without
    loading its old module) is still importable from there, as the same object."""
    import dedupe._types
    import dedupe.api
    import dedupe.engine.databases
    import dedupe.engine.verify

    for name in ("SQLiteDatabase", "PostgresBaseBackupTars"):
        moved = getattr(dedupe._types, name)
        assert moved is getattr(dedupe.engine.databases, name)
        assert moved is getattr(dedupe.api, name)
        assert moved.__module__ == "dedupe._types"
    assert dedupe.SQLiteDatabase is dedupe._types.SQLiteDatabase
    assert dedupe.engine.verify.SubsetSpec is dedupe._types.SubsetSpec
    assert dedupe.api.SubsetSpec is dedupe._types.SubsetSpec


def test_source_is_a_real_type_alias() -> None:
    """`dedupe.api.Source` is the union itself, not a string naming it."""
    import dedupe.api
    from dedupe.engine.commands import Command

    source = dedupe.api.Source
    assert not isinstance(source, str)
    members = set(typing.get_args(source))
    assert {dedupe.api.SQLiteDatabase, dedupe.api.PostgresBaseBackupTars, str} <= members
    assert Command in members
    assert typing.get_type_hints(dedupe.api.Repository.backup)["source"] == source


if __name__ == "__main__":
    print(json.dumps(check_hints()))
