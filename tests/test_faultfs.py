"""The crash simulator itself must behave like a real file system would."""

import errno

import pytest

from engine.fs import write_atomically
from engine.testing.faultfs import FaultFileSystem


def test_unsynced_data_is_lost_synced_data_survives():
    fs = FaultFileSystem()
    fs.makedirs("/d")
    fs.sync_dir("/")
    f = fs.open_append("/d/log")
    fs.sync_dir("/d")
    f.write(b"durable")
    f.sync()
    f.write(b"-volatile")
    fs.crash(tear=False)
    assert fs.read_file("/d/log") == b"durable"


def test_a_file_not_in_a_synced_directory_vanishes():
    fs = FaultFileSystem()
    fs.makedirs("/d")
    fs.sync_dir("/")
    f = fs.open_write("/d/new")
    f.write(b"x")
    f.sync()
    fs.crash()
    assert not fs.exists("/d/new")


def test_rename_is_durable_only_after_directory_sync():
    fs = FaultFileSystem()
    write_atomically(fs, "/a", b"old")
    f = fs.open_write("/a.tmp")
    f.write(b"new")
    f.sync()
    fs.rename("/a.tmp", "/a")
    fs.crash()
    assert fs.read_file("/a") == b"old"
    write_atomically(fs, "/a", b"new")
    fs.crash()
    assert fs.read_file("/a") == b"new"


def test_torn_tail_keeps_a_prefix_of_the_last_write():
    for seed in range(20):
        fs = FaultFileSystem(seed=seed)
        f = fs.open_append("/log")
        fs.sync_dir("/")
        f.write(b"A" * 100)
        f.sync()
        f.write(b"B" * 100)
        fs.crash(tear=True)
        data = fs.read_file("/log")
        assert data[:100] == b"A" * 100 and len(data) <= 200


def test_handles_from_before_a_crash_fail():
    fs = FaultFileSystem()
    f = fs.open_append("/log")
    fs.crash()
    with pytest.raises(OSError):
        f.write(b"x")


def test_nth_operation_fails_with_the_chosen_errno():
    fs = FaultFileSystem()
    f = fs.open_append("/log")
    fs.fail(after=2, err=errno.ENOSPC, ops={"write"})
    f.write(b"1")
    with pytest.raises(OSError) as e:
        f.write(b"2")
    assert e.value.errno == errno.ENOSPC
    f.write(b"3")  # not sticky
    fs.fail(after=1, err=errno.EIO, ops={"sync"}, sticky=True)
    for _ in range(3):
        with pytest.raises(OSError):
            f.sync()
