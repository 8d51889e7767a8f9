"""Names a package or module exports but loads on first use (PEP 562): `import dedupe`
then loads none of the engine, so a command starts with the code of its own operation
only (dedupe/__init__.py, dedupe/engine/__init__.py, dedupe/api.py)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(
    module: str, exports: dict[str, str], *, submodules: bool = False
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `module`: each name of `exports` comes from the module it
    maps to, imported when the name is first asked for and then kept in `module`. With
    `submodules`, any other name is tried as a submodule of the package (`import dedupe`
    and then `dedupe.errors.X` worked when the package imported everything)."""

    def __getattr__(name: str) -> object:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[module], name, value)  # looked up once
            return value
        if submodules and not name.startswith("__"):
            try:
                return importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError as e:
                if e.name != f"{module}.{name}":
                    raise
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[module]), *exports})

    return __getattr__, __dir__
