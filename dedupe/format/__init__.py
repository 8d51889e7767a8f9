"""Bytes <-> records for every object in a repository (docs/FORMAT.md), with no I/O and no
cryptography: callers hand in sealed bytes and get sealed bytes back."""
