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
    """The passphrase from `variable`, `variable`_FILE, `variable`_COMMAND, or a prompt.
    More than one of the three set is refused (which one was meant?), and so is an empty
    passphrase from any source: an empty variable or file is a mistake, never a key."""
    env = os.environ if env is None else env
    sources = [v for v in (variable, f"{variable}_FILE", f"{variable}_COMMAND") if v in env]
    if len(sources) > 1:
        raise PassphraseMissing(
            f"{' and '.join(sources)} are set together: it is not clear which one to use",
            hint="unset all but one",
        )
    if sources:
        source = sources[0]
        passphrase = _from_source(source, env[source])
    elif sys.stdin is not None and sys.stdin.isatty():
        source = "the passphrase typed"
        passphrase = getpass.getpass(f"{prompt}: ").encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != passphrase:
            raise WrongPassphrase("the two passphrases differ; nothing was created")
    else:
        raise PassphraseMissing(
            "no passphrase given",
            hint=f"set {variable}, {variable}_FILE or {variable}_COMMAND, "
            "or run on a terminal to be asked",
        )
    if not passphrase:
        raise PassphraseMissing(
            f"{source} is empty", hint="a passphrase must have at least one character"
        )
    return passphrase


def _from_source(source: str, value: str) -> bytes:
    if source.endswith("_FILE"):
        try:
            with open(value, "rb") as f:
                return f.read().rstrip(b"\r\n")
        except OSError as e:
            raise PassphraseMissing(f"cannot read {source} {value!r}: {e.strerror}") from None
    if source.endswith("_COMMAND"):
        try:
            out = subprocess.run(shlex.split(value), capture_output=True, timeout=60)
        except ValueError as e:  # shlex: unbalanced quotes
            raise PassphraseMissing(f"{source} cannot be parsed: {e}") from None
        except subprocess.TimeoutExpired:
            raise PassphraseMissing(f"{source} ran for 60 s without finishing") from None
        except OSError as e:
            raise PassphraseMissing(f"{source} could not be run: {e.strerror}") from None
        if out.returncode != 0:
            said = out.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise PassphraseMissing(
                f"{source} failed with exit status {out.returncode}"
                + (f": {' / '.join(said)}" if said else " and printed nothing on stderr"),
                hint=f"run it yourself to see why: {value}",
            )
        return out.stdout.rstrip(b"\r\n")
    return value.encode()


def get_new_passphrase(env: Mapping[str, str] | None = None) -> bytes:
    """A new key file's passphrase (asked twice on a terminal)."""
    return get_passphrase(True, env, "DEDUPE_NEW_PASSWORD", "New passphrase")
