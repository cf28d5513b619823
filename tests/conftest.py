"""Test set-up: ``tests/`` on ``sys.path`` (``from helpers import ...`` in every folder); Triton runs through its
interpreter on machines without a GPU (that is how CI tests it)."""
import os
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS))

try:  # must happen before triton is imported anywhere
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings

warnings.filterwarnings("ignore", message="Triton is not supported on current platform")


import pytest  # noqa: E402


@pytest.fixture
def ieee_fp32():
    """float32 matmuls and convolutions in IEEE precision on CUDA (no TF32) for the test, restored after."""
    import torch
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
