"""metaplastic.safe_io, attacked directly: full and read-only file systems, a parent that is a file, a second
writer, the debris of a killed writer."""
import json
import os
import subprocess
import sys

import pytest

from hostile import remount_read_only, temp_names, tmpfs
from metaplastic.errors import UserError
from metaplastic.safe_io import (DirLock, atomic_dir, atomic_write, check_output_location, clean_stale, host_name,
                                 temp_path)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_output_location_refuses_a_file_parent_and_a_file_in_place_of_a_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        check_output_location(tmp_path / "f" / "out", what="--out")
    with pytest.raises(UserError, match="exists and is not a directory"):
        check_output_location(tmp_path / "f", what="--out")
    with pytest.raises(UserError, match="is a directory"):
        check_output_location(tmp_path, what="--json", kind="file")
    assert check_output_location(tmp_path / "new" / "deeper", what="--out") == tmp_path / "new" / "deeper"


def test_read_only_file_system_is_refused_before_work(tmp_path):
    with tmpfs(tmp_path / "ro") as mnt:
        (mnt / "run").mkdir()
        remount_read_only(mnt)
        for target in (mnt / "run", mnt / "new" / "out"):
            with pytest.raises(UserError, match="read-only file system"):
                check_output_location(target, what="--out")


def test_full_disk_leaves_neither_a_partial_file_nor_a_changed_one(tmp_path):
    with tmpfs(tmp_path / "small", size="64k") as mnt:
        atomic_write(mnt / "a.json", "old")
        with pytest.raises(UserError, match="no space left on device"):
            atomic_write(mnt / "a.json", "x" * 200_000)
        assert (mnt / "a.json").read_text() == "old"
        assert temp_names(mnt) == []
        with pytest.raises(UserError, match="no space left on device"):
            with atomic_dir(mnt / "d") as tmp:
                (tmp / "big").write_bytes(b"x" * 200_000)
        assert not (mnt / "d").exists() and temp_names(mnt) == []


def test_a_killed_writers_debris_is_cleaned_and_a_replaced_dir_put_back(tmp_path):
    pid = dead_pid()
    partial = temp_path(tmp_path / "out", "partial", pid)
    partial.mkdir()
    replaced = temp_path(tmp_path / "out", "replaced", pid)
    replaced.mkdir()
    (replaced / "weights").write_text("complete")
    live = temp_path(tmp_path / "out", "partial", os.getpid())  # a live writer's: left alone
    live.mkdir()
    clean_stale(tmp_path / "out")
    assert (tmp_path / "out" / "weights").read_text() == "complete"  # the killed swap is undone
    assert not partial.exists() and not replaced.exists() and live.exists()


def test_second_writer_is_refused_and_a_dead_owners_lock_taken_over(tmp_path):
    target = tmp_path / "dst"
    with DirLock(target, "DST"):
        with pytest.raises(UserError, match=f"process {os.getpid()} on {host_name()}"):
            DirLock(target, "DST").acquire()
    # a lock file left by a process that died (its flock went with it)
    (tmp_path / ".dst.lock").write_text(json.dumps({"pid": dead_pid(), "host": host_name()}))
    with DirLock(target, "DST") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".dst.lock").exists()
