"""Atomic file replacement: the old content or the new one, never half of one, and nothing left behind."""

import os
import stat

import numpy as np
import pytest

from ldm_core.atomic_files import leftover_temporaries, write_atomic


def test_writes_bytes_text_and_callbacks(tmp_path):
    assert write_atomic(tmp_path / "a.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert write_atomic(tmp_path / "a.txt", "caf\u00e9\n", fsync=True, sync_folder=True).read_bytes() == b"caf\xc3\xa9\n"
    write_atomic(tmp_path / "a.npy", lambda fh: np.save(fh, np.arange(4)))
    assert np.load(tmp_path / "a.npy").tolist() == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.npy", "a.txt"]


def test_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = write_atomic(tmp_path / "meta.json", '{"old": true}')

    def half_then_fail(fh):
        fh.write(b'{"ne')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail, fsync=True)
    assert target.read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["meta.json"]


def test_permissions_follow_the_umask_and_leftovers_are_found(tmp_path):
    previous = os.umask(0o022)
    try:
        target = write_atomic(tmp_path / "latest", "step-0000001\n")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # not mkstemp's 0o600
    stale = tmp_path / ".latest.123-0a1b2c3d.tmp"  # what a write killed before its rename leaves
    stale.write_text("step-00")
    assert leftover_temporaries(target) == [stale]
