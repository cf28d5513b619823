"""``metaplastic.kernels.dispatch.scan``: one entry point, the backend chosen from the device and the settings.

Backends:

- ``reference``:        :func:`metaplastic.scan`, token by token, autograd (every objective, any device);
- ``chunk``:            :func:`metaplastic.kernels.chunk.chunk_scan`, torch, likelihood ``dot`` / ``dot_diag``;
- ``triton_chunk``:     :func:`metaplastic.kernels.chunk_triton.chunk_triton_scan`, Triton forward and
                        backward of the chunked path (``dot``; ``dot_diag`` with ``b`` head-shared or grouped
                        ``[B,T,H,G]``; scalar or no forgetting);
- ``triton_per_value``: :func:`metaplastic.kernels.per_value.per_value_run`, Palimpsa (``dot_diag`` /
                        diagonal, scalar or no forgetting) with any ``b``, built for ``b [B,T,H,V]``;
- ``triton_recurrent``: :func:`metaplastic.kernels.fused_recurrent.fused_recurrent_scan`, every objective;
- ``triton``:           ``triton_chunk`` where it covers the settings, else ``triton_per_value`` where it
                        does, else ``triton_recurrent``;
- ``auto``:             ``triton`` on CUDA tensors; on other devices ``chunk`` where it covers the
                        likelihood, else ``reference``.

The Triton modules are imported only when chosen.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from metaplastic.objective import Objective
from metaplastic.readout_solver import ReadoutSolver
from metaplastic.scan import ScanResult
from metaplastic.scan import scan as reference_scan

from . import chunk as _chunk
from .entry import ScanCall, prepare, rows_constant_in_groups, triton_unavailable_reason

Tensor = torch.Tensor
BACKENDS = ("auto", "triton", "triton_chunk", "triton_per_value", "triton_recurrent", "chunk", "reference")


def per_value_reason(objective: Objective) -> Optional[str]:
    """Why the per-value Palimpsa kernel cannot run ``objective`` (None when it can)."""
    if not (objective.likelihood == "dot_diag" and objective.posterior == "diagonal"):
        return ("the per-value kernel runs likelihood 'dot_diag' with posterior 'diagonal', not "
                f"{objective.describe()}")
    if objective.forgetting == "vector":
        return "the per-value kernel supports forgetting 'none' or 'scalar', not 'vector'"
    return None


def triton_chunk_reason(objective: Objective, b: Optional[Tensor], initial_state: Optional[Dict[str, Tensor]],
                        check_values: Optional[bool] = None, V: Optional[int] = None) -> Optional[str]:
    """Why the chunked Triton path cannot run these settings (None when it can). ``V``: the value width
    (None: a 4-d ``b`` counts as per value channel)."""
    reason = _chunk.unsupported_reason(objective)
    if reason is not None:
        return reason.replace("the chunked path", "the chunked Triton path")
    if objective.forgetting == "vector":
        return "the chunked Triton path supports forgetting 'none' or 'scalar', not 'vector' (GLA)"
    if objective.likelihood == "dot_diag":
        groups = 1 if b is None or b.dim() == 3 else b.shape[-1]
        if b is not None and b.dim() == 4 and (V is None or (groups == V and V > 1) or V % groups):
            return ("the chunked Triton path needs a head-shared importance rate b [B,T,H] (THEORY.md limit 7) "
                    "or one per group of value rows [B,T,H,G] (limit 8); b is per value channel [B,T,H,V]")
        I0 = None if initial_state is None else initial_state.get("I")
        if isinstance(I0, Tensor) and I0.dim() == 4:
            if I0.shape[2] % groups or not rows_constant_in_groups(I0, groups, check_values):
                return ("the chunked Triton path needs an initial precision I that is constant over the value "
                        "rows of each importance group")
    return None


def select_backend(objective: Objective, device: torch.device, backend: str = "auto",
                   b: Optional[Tensor] = None, initial_state: Optional[Dict[str, Tensor]] = None,
                   check_values: Optional[bool] = None, V: Optional[int] = None) -> str:
    """The concrete backend (``reference``, ``chunk``, ``triton_chunk`` or ``triton_recurrent``) that
    ``backend`` means for these settings on ``device``; ``ValueError`` naming why if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton"
        else:
            return "chunk" if _chunk.unsupported_reason(objective) is None else "reference"
    if backend == "reference":
        return backend
    if backend == "chunk":
        reason = _chunk.unsupported_reason(objective)
        if reason is not None:
            raise ValueError(f"backend='chunk' cannot run {objective.describe()}: {reason}")
        return backend
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend={backend!r}: {reason}")
    if backend == "triton_recurrent":
        return backend
    if backend == "triton_per_value":
        reason = per_value_reason(objective)
        if reason is not None:
            raise ValueError(f"backend='triton_per_value' cannot run {objective.describe()}: {reason}")
        return backend
    reason = triton_chunk_reason(objective, b, initial_state, check_values, V)
    if backend == "triton_chunk":
        if reason is not None:
            raise ValueError(f"backend='triton_chunk' cannot run {objective.describe()}: {reason}")
        return backend
    if reason is None:
        return "triton_chunk"
    return "triton_per_value" if per_value_reason(objective) is None else "triton_recurrent"


def scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
         beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
         prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
         initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
         output_variance: bool = False, cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
         chunk_size: int = 64, check_values: Optional[bool] = None,
         readout: Optional[ReadoutSolver] = None) -> ScanResult:
    """:func:`metaplastic.scan` (same arguments, same :class:`~metaplastic.ScanResult`) run by ``backend``.

    ``backend``: ``"auto" | "triton" | "triton_chunk" | "triton_recurrent" | "chunk" | "reference"`` (see
    the module docstring). ``chunk_size`` is the chunk length of the chunked paths. ``check_values``: check
    the values of CUDA tensors on the host (a synchronisation; by default they are checked on the device,
    see :mod:`metaplastic.kernels.entry`). ``readout``: the full posterior's read-out solve
    (:class:`~metaplastic.ReadoutSolver`; None: exact), run by ``reference`` and ``triton_recurrent``.
    """
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a tensor [B, T, H, K], got {type(q).__name__}")
    V = v.shape[-1] if isinstance(v, Tensor) and v.dim() == 4 else None
    chosen = select_backend(objective, q.device, backend, b, initial_state, check_values, V)
    if chosen == "reference":
        return reference_scan(objective, q, k, v, log_decay=log_decay, beta=beta, b=b,
                              prior_precision=prior_precision, lam=lam, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, output_variance=output_variance,
                              cu_seqlens=cu_seqlens, readout=readout)
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens, check_values=check_values,
                   readout=readout)
    return run(call, chosen, chunk_size)


def run(call: ScanCall, backend: str, chunk_size: int = 64) -> ScanResult:
    """Run a validated call by a concrete backend (one that :func:`select_backend` returns)."""
    if backend == "chunk":
        return _chunk.chunk_run(call, chunk_size)
    if backend == "triton_chunk":
        from .chunk_triton import chunk_triton_run
        return chunk_triton_run(call, chunk_size)
    if backend == "triton_per_value":
        from .per_value import per_value_run
        return per_value_run(call)
    if backend == "triton_recurrent":
        from .fused_recurrent import fused_recurrent_run
        return fused_recurrent_run(call)
    raise ValueError(f"backend={backend!r} is not a concrete fast path")
