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


# --- SIGTERM: what schedulers and `timeout` send -------------------------------------------------------------
# The child writes, touches READY at a known moment, then keeps writing slowly; the parent sends SIGTERM once
# READY exists, so the signal always arrives mid-write.
_SLOW_CONVERT = """
import sys, time
from pathlib import Path
from metaplastic.cli import main
from metaplastic.models.checkpoint_io import StreamingSafetensorsWriter
original = StreamingSafetensorsWriter.write
def slow_write(self, name, tensor):
    original(self, name, tensor)
    Path(sys.argv[3]).touch()
    time.sleep(0.5)
StreamingSafetensorsWriter.write = slow_write
sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--no-progress"]))
"""

_SLOW_DIR = """
import sys, time
from pathlib import Path
from metaplastic.safe_io import DirLock, Terminated, atomic_dir, sigterm_as_interrupt
dst = Path(sys.argv[1])
try:
    with sigterm_as_interrupt(), DirLock(dst, "DST"), atomic_dir(dst) as tmp:
        (tmp / "half").write_bytes(bytes(1 << 20))
        Path(sys.argv[2]).touch()
        time.sleep(120)
except Terminated:
    sys.exit(Terminated.exit_code)
"""


def _terminate_mid_write(script, *args, ready, timeout=300.0):
    """Run ``python -c script *args``, send SIGTERM once ``ready`` exists; returns ``(exit code, stderr)``."""
    import signal
    import time
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None and not ready.exists():
        time.sleep(0.01)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_inside_an_atomic_dir_removes_it_and_the_lock(tmp_path):
    dst = tmp_path / "dst"
    code, err = _terminate_mid_write(_SLOW_DIR, dst, tmp_path / "ready", ready=tmp_path / "ready")
    assert code == 143, err
    assert temp_names(tmp_path) == [] and not (tmp_path / ".dst.lock").exists() and not dst.exists()


def test_a_conversion_stopped_by_sigterm_leaves_nothing(tmp_path):
    """``metaplastic convert`` gets SIGTERM while writing DST: it exits 143 (128 + SIGTERM) and leaves no
    ``.DST.partial-*`` directory, no ``.DST.lock`` and no DST."""
    pytest.importorskip("transformers")
    from metaplastic.demo import build_tiny_mamba2
    src = build_tiny_mamba2(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "dst"
    code, err = _terminate_mid_write(_SLOW_CONVERT, src, dst, tmp_path / "ready", ready=tmp_path / "ready")
    assert code == 143, err
    assert temp_names(out) == [] and not (out / ".dst.lock").exists() and not dst.exists()
    assert sorted(p.name for p in out.iterdir()) == []
