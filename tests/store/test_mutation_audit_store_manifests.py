"""Mutation audit of dedupe/store/manifests.py (issue 12): tests that kill the surviving
mutants that changed a safety property. Each test names the property it pins and the
mutant(s) it was shown red on (bench/README.md, "Mutation testing")."""

from __future__ import annotations

import os
import tempfile

import pytest

from dedupe.errors import ScratchError
from dedupe.store.manifests import read_scratch


def test_a_scratch_file_that_ends_early_is_an_error_never_other_bytes() -> None:
    """read_scratch returns bytes start..end of a spilled file in pieces; when the file
    ends before `end` (truncated under the process), the read that comes up short is
    retried from where it stopped, finds nothing, and raises ScratchError: the caller
    never gets fewer bytes, nor bytes from elsewhere in the file.

    Property: what a manifest or restore reads back from its scratch file is exactly what
    was spilled, or an error (integrity of spilled data). Killed: the retry of a short
    read made wrong (from `pos - len(data)`: the missing tail filled with earlier bytes
    and no error; `return` on the empty retry: a silently short result; the retry's
    arguments None or dropped: TypeError instead of ScratchError)."""
    data = os.urandom(1000)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        assert b"".join(read_scratch(f, 0, 1000, 300)) == data
        assert b"".join(read_scratch(f, 100, 700, 600)) == data[100:700]
        with pytest.raises(ScratchError, match="ended at 1000 of 1400"):
            b"".join(read_scratch(f, 700, 1400, 700))
        with pytest.raises(ScratchError, match="ended at 1000 of 1500"):
            list(read_scratch(f, 0, 1500, 1500))
