"""Build the native core. Everything else about the package lives in pyproject.toml.

Environment switches:
  DEDUPE_WERROR=1    compile the C kernels with -Werror
  DEDUPE_DEBUG=1     -O0 -g instead of -O3
  DEDUPE_SANITIZE=1  AddressSanitizer + UndefinedBehaviorSanitizer (run with LD_PRELOAD=libasan)
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup


def compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2"]
    args = ["-std=c99", "-Wall", "-Wextra"]
    args += ["-O0", "-g"] if os.environ.get("DEDUPE_DEBUG") else ["-O3"]
    if os.environ.get("DEDUPE_WERROR"):
        args.append("-Werror")
    if os.environ.get("DEDUPE_SANITIZE"):
        args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    return args


def link_args() -> list[str]:
    return ["-fsanitize=address,undefined"] if os.environ.get("DEDUPE_SANITIZE") else []


def kernel(module: str, pyx: str, *names: str) -> Extension:
    """One native module: csrc/NAME.{c,h} for each name plus its thin Cython wrapper."""
    return Extension(
        module,
        sources=[pyx, *(f"csrc/{name}.c" for name in names)],
        include_dirs=["csrc"],
        depends=[f"csrc/{name}.h" for name in names] + ["csrc/blake3lanes.inc"],
        extra_compile_args=compile_args(),
        extra_link_args=link_args(),
    )


extensions = [
    kernel("dedupe.chunking._fastcdc", "dedupe/chunking/_fastcdc.pyx", "fastcdc", "mapread"),
    kernel(
        "dedupe.store._chunkindex", "dedupe/store/_chunkindex.pyx", "chunkindex", "windowplan"
    ),
    kernel("dedupe.store._prunetable", "dedupe/store/_prunetable.pyx", "prunetable"),
    kernel("dedupe.store._blobcodec", "dedupe/store/_blobcodec.pyx", "blobcodec", "blake3many"),
    kernel("dedupe.format._delta", "dedupe/format/_delta.pyx", "delta"),
    kernel("dedupe.hashing._blake3many", "dedupe/hashing/_blake3many.pyx", "blake3many"),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
