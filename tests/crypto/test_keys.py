"""Key files, epochs, passphrase sources and AEAD behaviour."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from dedupe.crypto import (
    KdfParams,
    RepositoryKeys,
    create_key_file,
    new_epoch,
    open_key_file,
    open_sealed,
    read_epoch_record,
    seal,
)
from dedupe.crypto.passphrase import get_passphrase
from dedupe.errors import IntegrityError, PassphraseMissing, WrongPassphrase

REPO_ID = bytes(range(32))


def test_key_file_opens_with_its_passphrase_only() -> None:
    keys = RepositoryKeys.generate()
    blob = create_key_file(keys, REPO_ID, b"pw", kdf=KdfParams.weakest())
    assert open_key_file(blob, REPO_ID, b"pw") == keys
    with pytest.raises(WrongPassphrase):
        open_key_file(blob, REPO_ID, b"pw ")
    # The key file is bound to its repository id.
    with pytest.raises(WrongPassphrase):
        open_key_file(blob, bytes(32), b"pw")
    # No key material is readable in the file.
    for key in (keys.id_key, keys.meta_key, keys.chunker_key):
        assert key.hex() not in blob.decode() and key not in blob


def test_damaged_key_file_is_not_a_wrong_passphrase() -> None:
    blob = create_key_file(RepositoryKeys.generate(), REPO_ID, b"pw", kdf=KdfParams.weakest())
    with pytest.raises(IntegrityError):
        open_key_file(blob[: len(blob) // 2], REPO_ID, b"pw")


def test_epoch_record_round_trip_and_tamper() -> None:
    keys = RepositoryKeys.generate()
    assert keys.epoch_master is not None
    record, epoch = new_epoch(1, keys.epoch_master, keys.meta_key)
    opened = read_epoch_record(json.loads(json.dumps(record)), keys.meta_key, keys.epoch_master)
    assert opened == epoch
    data_key = os.urandom(32)
    assert opened.unwrap(epoch.wrap(data_key)) == data_key
    # A writer (no epoch_master) sees the public key only.
    writer_view = read_epoch_record(record, keys.meta_key, None)
    assert writer_view.secret_key is None
    # Swapping in another public key breaks the MAC.
    other, _ = new_epoch(1, keys.epoch_master, keys.meta_key)
    forged = dict(record, public_key=other["public_key"])
    with pytest.raises(IntegrityError):
        read_epoch_record(forged, keys.meta_key, keys.epoch_master)


def test_aead_binds_associated_data() -> None:
    key = os.urandom(32)
    sealed = seal(key, b"payload", b"id-1")
    assert open_sealed(key, sealed, b"id-1", "x") == b"payload"
    with pytest.raises(IntegrityError):
        open_sealed(key, sealed, b"id-2", "x")
    flipped = bytearray(sealed)
    flipped[30] ^= 1
    with pytest.raises(IntegrityError):
        open_sealed(key, bytes(flipped), b"id-1", "x")


def test_passphrase_sources(tmp_path: Path) -> None:
    assert get_passphrase(env={"DEDUPE_PASSWORD": "a"}) == b"a"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(f)}) == b"from-file"
    script = tmp_path / "pw.sh"
    script.write_text("#!/bin/sh\necho from-command\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    assert get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": str(script)}) == b"from-command"
    with pytest.raises(PassphraseMissing):
        get_passphrase(env={"DEDUPE_PASSWORD_COMMAND": "false"})
    with pytest.raises(PassphraseMissing):
        get_passphrase(env={"DEDUPE_PASSWORD_FILE": str(tmp_path / "absent")})
