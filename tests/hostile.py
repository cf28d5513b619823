"""Tools of the hostile tests: small file systems (full, read-only), the CLI in-process and as a subprocess,
scan inputs outside the theory's domain and non-finite values injected into them."""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import pytest
import torch

from metaplastic.cli import main

from helpers import assert_close, random_inputs

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


# --- scans ------------------------------------------------------------------------------------------

def scan_tensors(B: int = 1, T: int = 5, H: int = 2, K: int = 4, V: int = 3,
                 seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Valid float32 ``q, k [B,T,H,K]`` (N(0, 1)), ``v [B,T,H,V]`` and ``log_decay [B,T,H]`` (decays in
    (1/e, 1)), fresh tensors that a test may damage in place."""
    x = random_inputs("mamba2", B, T, H, K, V, seed=seed, keys=1.0, decay_min=math.exp(-1), dtype=torch.float32)
    return x["q"], x["k"], x["v"], x["log_decay"]


def refused_scan_calls(B: int, T: int, H: int, K: int, V: int,
                       log_decay: torch.Tensor) -> List[Tuple[str, Dict[str, object]]]:
    """``(what, keyword changes)`` of Palimpsa calls (inputs of these sizes, b head-shared) that the reference
    scan refuses."""
    return [
        ("float cu_seqlens", dict(cu_seqlens=torch.tensor([0.0, 2.0, float(T)]))),
        ("2-d cu_seqlens", dict(cu_seqlens=torch.tensor([[0, 2, T]]))),
        ("cu_seqlens not ending at T", dict(cu_seqlens=torch.tensor([0, 2, T - 1]))),
        ("positive log_decay", dict(log_decay=log_decay.abs() + 0.1)),
        ("zero prior_precision", dict(prior_precision=torch.zeros(H))),
        ("integer prior_precision", dict(prior_precision=torch.ones(H, dtype=torch.int64))),
        ("G not dividing V", dict(b=torch.rand(B, T, H, 2))),
        ("b of the wrong length", dict(b=torch.rand(B, T + 1, H))),
        ("lam on a diagonal posterior", dict(lam=torch.ones(H, K))),
        ("variance of nothing", dict(initial_state={"mu": torch.zeros(1, H, V, K)})),
    ]


def damaged(x: Dict[str, torch.Tensor], damage: Sequence[Tuple[str, tuple, float]]) -> Dict[str, torch.Tensor]:
    """A copy of the inputs ``x`` with ``x[key][index] = value`` for each ``(key, index, value)`` of ``damage``."""
    bad = {key: val.clone() for key, val in x.items()}
    for key, index, value in damage:
        bad[key][index] = value
    return bad


def close_where_finite(got: torch.Tensor, ref: torch.Tensor, what: str, *, rtol: float, atol: float = 0.0) -> None:
    """``got`` equals ``ref`` (:func:`helpers.assert_close`) wherever ``ref`` is finite."""
    finite = torch.isfinite(ref)
    assert_close(got[finite], ref[finite], rtol=rtol, atol=atol, msg=what)
