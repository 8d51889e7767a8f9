"""Where a passphrase comes from, in order: DEDUPE_PASSWORD, DEDUPE_PASSWORD_FILE,
DEDUPE_PASSWORD_COMMAND, then a prompt when standard input is a terminal. A new passphrase
(`key add`, `key passwd`) comes from DEDUPE_NEW_PASSWORD, _FILE, _COMMAND the same way."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping

from dedupe.errors import PassphraseMissing, WrongPassphrase


def get_passphrase(
    confirm: bool = False,
    env: Mapping[str, str] | None = None,
    variable: str = "DEDUPE_PASSWORD",
    prompt: str = "Repository passphrase",
) -> bytes:
    """The passphrase from `variable`, `variable`_FILE, `variable`_COMMAND, or a prompt."""
    env = os.environ if env is None else env
    if variable in env:
        return env[variable].encode()
    if f"{variable}_FILE" in env:
        path = env[f"{variable}_FILE"]
        try:
            with open(path, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as e:
            raise PassphraseMissing(f"cannot read {variable}_FILE {path!r}: {e.strerror}") from None
    if f"{variable}_COMMAND" in env:
        cmd = env[f"{variable}_COMMAND"]
        try:
            out = subprocess.run(shlex.split(cmd), capture_output=True, check=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            raise PassphraseMissing(f"{variable}_COMMAND failed: {e}") from None
        return out.stdout.rstrip(b"\r\n")
    if sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass(f"{prompt}: ").encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
            raise WrongPassphrase("the two passphrases differ; nothing was created")
        return first
    raise PassphraseMissing(
        "no passphrase given",
        hint=f"set {variable}, {variable}_FILE or {variable}_COMMAND, "
        "or run on a terminal to be asked",
    )


def get_new_passphrase(env: Mapping[str, str] | None = None) -> bytes:
    """A new key file's passphrase (asked twice on a terminal)."""
    return get_passphrase(True, env, "DEDUPE_NEW_PASSWORD", "New passphrase")
