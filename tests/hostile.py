"""Tools of the hostile tests: small file systems (full, read-only), the CLI in-process and as a subprocess."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import pytest

from metaplastic.cli import main

ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *argv: str) -> Tuple[int, str]:
    """Run ``metaplastic ARGV`` in this process: ``(exit code, stderr)``."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(err: str, *words: str) -> None:
    """``err`` is one ``metaplastic ...: error: ...`` line (no traceback) naming every one of ``words``."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    for word in words:
        assert word in errors[0], (word, errors[0])


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only; the test is skipped otherwise), unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def spawn(argv: Sequence[str], **kwargs) -> subprocess.Popen:
    """``python -m metaplastic ARGV`` as a subprocess (one thread), stdout and stderr captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "metaplastic", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT), **kwargs)


def temp_names(directory: Path) -> List[str]:
    """The names of the temporary files/directories (``.X.partial-…``, ``.X.replaced-…``) in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)
