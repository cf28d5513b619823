"""Safe output for every command: check an output location before long work, write files and directories
beside their final place and rename them in, lock a destination against a second writer, and remove what a
killed writer left behind.

Names used beside a final path ``P`` (in the same directory, so a rename is atomic):

- ``.P.partial-PID@HOST``: being written by process PID on HOST (removed when that process is gone);
- ``.P.replaced-PID@HOST``: the previous ``P`` while a new one takes its place (put back if the new one never
  arrived, removed otherwise);
- ``.P.lock``: held (``flock``) by the one process writing ``P``; it records that process's pid and host.

Every ``OSError`` raised while writing becomes a :class:`~metaplastic.errors.UserError` naming the path and the
reason (disk full, read-only file system, permission denied), after what was written has been removed.

A process stopped by SIGINT (``KeyboardInterrupt``) or, inside :func:`sigterm_as_interrupt`, by SIGTERM (what
schedulers and ``timeout`` send; :class:`Terminated`) removes what it was writing and releases its locks on the
way out. Only SIGKILL leaves names behind, which the next writer of the same path removes.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import UserError

PathLike = Union[str, os.PathLike]
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<tag>partial|replaced)-(?P<pid>\d+)@(?P<host>.+)$")


def host_name() -> str:
    """This machine's host name (as recorded in lock files and temporary names)."""
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """True if a process with id ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def describe(exc: OSError) -> str:
    """One line for an ``OSError``: what failed on which path."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif exc.errno == errno.EROFS:
        reason = "read-only file system"
    target = exc.filename if exc.filename is not None else None
    return f"{target}: {reason}" if target is not None else reason


def temp_path(final: PathLike, tag: str = "partial", pid: Optional[int] = None) -> Path:
    """The name beside ``final`` that process ``pid`` (default: this one) writes before renaming it in."""
    final = Path(final)
    return final.parent / f".{final.name}.{tag}-{os.getpid() if pid is None else pid}@{host_name()}"


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: the error that brought us here is the one to report


# ----------------------------------------------------------------------------------------------- signals

class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread as SIGINT raises ``KeyboardInterrupt`` (of which it is a kind), so
    the same clean-up runs: every ``except BaseException`` / ``finally`` that removes partial outputs and
    releases locks. A command stopped this way exits with 128 + 15 = 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the clean-up
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`Terminated` in the main thread; the previous handler is restored
    after. Does nothing outside the main thread or where SIGTERM already has a handler of the program's own."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------ output locations

def check_output_location(path: PathLike, *, what: str, kind: str = "dir") -> Path:
    """Check, before any long work, that ``path`` can be written as a ``kind`` (``"dir"`` or ``"file"``).

    Refuses (UserError naming ``what``): an existing path of the other kind, a parent that is a file, and a
    location where a file cannot actually be created (read-only file system, permissions – probed by
    creating and removing a file, so it also holds for root). Missing parents are fine (they are created)."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    path = Path(path).expanduser()
    if str(path) == "":
        raise UserError(f"{what}: an empty path")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise UserError(f"{what} {path} exists and is not a directory")
        if kind == "file" and path.is_dir():
            raise UserError(f"{what} {path} is a directory, not a file")
    ancestor = path.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{what} {path}: {ancestor} is not a directory")
    probe_dir = path if kind == "dir" and path.is_dir() else ancestor
    try:
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".metaplastic-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {probe_dir} ({describe_reason(exc)})") from None
    return path


def describe_reason(exc: OSError) -> str:
    """The reason of an ``OSError`` alone (no path)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    return exc.strerror or str(exc) or type(exc).__name__


@contextlib.contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a one-line UserError ``cannot write WHAT: reason``."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {what}: {describe(exc)}") from None


# ------------------------------------------------------------------------------------------ atomic writes

@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed onto ``path`` (replacing it).

    On any error the temporary file is removed and ``path`` is untouched; ``OSError`` becomes UserError."""
    path = Path(path)
    tmp = temp_path(path)
    clean_stale(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise UserError(f"cannot write {path}: {describe_reason(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


def atomic_write(path: PathLike, data: Union[str, bytes]) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` all at once: beside it, then renamed in."""
    path = Path(path)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def replace_dir(tmp: PathLike, final: PathLike) -> None:
    """Rename the finished directory ``tmp`` onto ``final``; an existing ``final`` is moved aside first and
    removed only once ``tmp`` is in place (a kill in between is repaired by :func:`clean_stale`)."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.rename(tmp, final)
        return
    old = temp_path(final, "replaced")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``final``; on a clean exit it becomes ``final``.

    ``replace=False`` refuses an existing ``final`` (UserError); with ``replace=True`` the caller has decided
    that ``final`` may go (it is its own earlier output). On any error the directory is removed."""
    final = Path(final)
    clean_stale(final)
    tmp = temp_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if final.exists() and not replace:
            raise UserError(f"{final} appeared while it was being written; the new output was discarded")
        replace_dir(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise UserError(f"cannot write {final}: {describe(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


def clean_stale(final: PathLike) -> list:
    """Remove the temporary names beside ``final`` whose writer is gone (same host, dead pid); put a
    ``replaced`` directory back when ``final`` itself is missing. Returns the paths acted on."""
    final = Path(final)
    parent = final.parent
    acted = []
    if not parent.is_dir():
        return acted
    try:
        entries = list(parent.iterdir())
    except OSError:
        return acted
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or m["name"] != final.name:
            continue
        if m["host"] != host_name() or pid_alive(int(m["pid"])):
            continue  # a live writer, or one on another machine: not ours to judge
        if m["tag"] == "replaced" and not final.exists():
            try:
                os.rename(entry, final)
                acted.append(entry)
                continue
            except OSError:
                pass
        _remove(entry)
        acted.append(entry)
    return acted


def clean_stale_in(directory: PathLike) -> list:
    """:func:`clean_stale` for every temporary name found in ``directory``."""
    directory = Path(directory)
    acted = []
    if not directory.is_dir():
        return acted
    names = {m["name"] for e in directory.iterdir() if (m := _TEMP.match(e.name))}
    for name in sorted(names):
        acted += clean_stale(directory / name)
    return acted


# ----------------------------------------------------------------------------------------------- locks

class DirLock:
    """An exclusive lock on writing ``target``: the file ``.NAME.lock`` beside it, held with ``flock``.

    A second writer is refused with a UserError naming the owner's pid and host. The kernel releases the
    lock when its owner dies, so a lock left by a killed process is taken over."""

    def __init__(self, target: PathLike, what: str) -> None:
        self.target = Path(target)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.what = what
        self.fd: Optional[int] = None

    def acquire(self) -> "DirLock":
        try:
            return self._acquire()
        except OSError as exc:
            raise UserError(f"{self.what} {self.target}: cannot take the lock {self.path} "
                            f"({describe_reason(exc)})") from None

    def _acquire(self) -> "DirLock":
        import fcntl
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{self.what} {self.target} is being written by {self._owner()} "
                                f"(lock {self.path}); wait for it to finish") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file between our open and our flock: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": host_name(), "since": time.time()}).encode())
            self.fd = fd
            return self
        raise UserError(f"{self.what} {self.target}: could not take the lock {self.path}")

    def _owner(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"process {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # unlinked while still held: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
