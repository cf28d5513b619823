"""What the fast paths add to the front door (:mod:`metaplastic.scan_call`, re-exported here): whether Triton
can run, and whether an initial precision is constant over value rows (on-device asserts on a GPU).

Every path (``chunk``, ``triton_chunk``, ``triton_recurrent``, ``triton_per_value``) takes a validated
:class:`ScanCall` from :func:`prepare`, the same front door as the reference scan, so each refuses what the
reference refuses and carries no copy of the checks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from metaplastic.scan_call import ScanCall, by_sequence, compute_dtype, prepare, values_checked

__all__ = ["ScanCall", "by_sequence", "compute_dtype", "prepare", "rows_constant", "rows_constant_in_groups",
           "triton_unavailable_reason"]

Tensor = torch.Tensor


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can: CUDA, or the interpreter)."""
    if torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels need CUDA tensors (got {torch.device(device).type}), or TRITON_INTERPRET=1 "
            "set before triton is imported")


def rows_constant(x: Tensor, check_values: Optional[bool] = None) -> bool:
    """Whether ``x [N,H,V,K]`` is the same in every value row (the initial precision of the fast paths).

    On a GPU without ``check_values`` the answer is True and an on-device assert guards it."""
    if values_checked(x, check_values):
        return bool((x == x[:, :, :1]).all())
    torch._assert_async((x == x[:, :, :1]).all(), "initial_state['I'] varies over value rows: pass "
                        "check_values=True (routes it to the per-value path) or b per value channel")
    return True


def rows_constant_in_groups(x: Tensor, groups: int, check_values: Optional[bool] = None) -> bool:
    """Whether ``x [N,H,V,K]`` is the same in every value row of each of ``groups`` contiguous row groups."""
    N, H, V, K = x.shape
    return rows_constant(x.reshape(N, H * groups, V // groups, K), check_values)
