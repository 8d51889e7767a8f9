"""Types of the native delta kernel (built from _delta.pyx + csrc/delta.c)."""

from typing import Any

from typing_extensions import Buffer

MAX_PARENT_RECORDS: int

class DeltaBuilder:
    def __init__(
        self, parent: Buffer | None = None, fd: int = -1, n_parent: int | None = None
    ) -> None: ...
    def feed(self, table: Buffer) -> bytes: ...
    def ops(self) -> list[list[Any]]: ...
    def memory_bytes(self) -> int: ...
