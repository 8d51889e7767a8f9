"""Where a passphrase comes from, in order: DEDUPE_PASSWORD, DEDUPE_PASSWORD_FILE,
DEDUPE_PASSWORD_COMMAND, then a prompt when standard input is a terminal."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping

from dedupe.errors import PassphraseMissing, WrongPassphrase


def get_passphrase(confirm: bool = False, env: Mapping[str, str] | None = None) -> bytes:
    env = os.environ if env is None else env
    if "DEDUPE_PASSWORD" in env:
        return env["DEDUPE_PASSWORD"].encode()
    if "DEDUPE_PASSWORD_FILE" in env:
        path = env["DEDUPE_PASSWORD_FILE"]
        try:
            with open(path, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as e:
            raise PassphraseMissing(
                f"cannot read DEDUPE_PASSWORD_FILE {path!r}: {e.strerror}"
            ) from None
    if "DEDUPE_PASSWORD_COMMAND" in env:
        cmd = env["DEDUPE_PASSWORD_COMMAND"]
        try:
            out = subprocess.run(shlex.split(cmd), capture_output=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            raise PassphraseMissing(f"DEDUPE_PASSWORD_COMMAND failed: {e}") from None
        return out.stdout.rstrip(b"\r\n")
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("Repository passphrase: ").encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
            raise WrongPassphrase("the two passphrases differ; nothing was created")
        return first
    raise PassphraseMissing(
        "no passphrase given",
        hint="set DEDUPE_PASSWORD, DEDUPE_PASSWORD_FILE or DEDUPE_PASSWORD_COMMAND, "
        "or run on a terminal to be asked",
    )
