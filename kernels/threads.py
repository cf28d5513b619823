"""A context manager for the number of torch CPU threads (tiny tensors run fastest on one thread)."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (None: leave torch's setting), then restore it."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
