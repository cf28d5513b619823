"""Test set-up: Triton runs through its interpreter on machines without a GPU (that is how CI tests it)."""
import os

try:  # must happen before triton is imported anywhere
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings

warnings.filterwarnings("ignore", message="Triton is not supported on current platform")
