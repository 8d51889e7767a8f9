"""The CLI's glibc malloc settings (dedupe.cli.tune_allocator), seen in glibc's own
report: what a process that allocates from several threads ends up with."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Run in a fresh interpreter: the settings are process-wide and must come before any
# thread allocates. Four threads allocate at once (blocks under the mmap threshold, so
# from an arena); malloc_info then lists one <heap> per arena.
_CHILD = r"""
import ctypes, os, sys, threading
if sys.argv[1] == "tuned":
    from dedupe.cli import tune_allocator
    tune_allocator()
start = threading.Barrier(4)
def work():
    start.wait()
    keep = [bytearray(100_000) for _ in range(20)]
    start.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(fp))
libc.fclose(ctypes.c_void_p(fp))
"""


def _arenas(tmp_path: os.PathLike[str], mode: str) -> int:
    report = os.path.join(tmp_path, f"{mode}.xml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    subprocess.run([sys.executable, "-c", _CHILD, mode, report], check=True, env=env)
    with open(report) as f:
        return f.read().count("<heap nr=")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
def test_the_command_keeps_malloc_to_two_arenas(tmp_path: os.PathLike[str]) -> None:
    assert _arenas(tmp_path, "plain") > 2  # what glibc does by default: one a thread
    assert _arenas(tmp_path, "tuned") <= 2
