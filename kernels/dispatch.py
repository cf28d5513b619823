"""``metaplastic.kernels.scan``: one entry point, the backend chosen from the device and the settings.

Backends:

- ``reference``:        :func:`metaplastic.scan`, token by token, autograd (every objective, any device);
- ``chunk``:            :func:`metaplastic.kernels.chunk.chunk_scan`, torch, likelihood ``dot`` / ``dot_diag``;
- ``triton_chunk``:     :func:`metaplastic.kernels.chunk_triton.chunk_triton_scan`, Triton forward of the
                        chunked path (``dot``; ``dot_diag`` with a head-shared ``b``; scalar or no forgetting);
- ``triton_recurrent``: :func:`metaplastic.kernels.fused_recurrent.fused_recurrent_scan`, every objective
                        (grouped importance ``b [B,T,H,G]`` is expanded to one rate per value row);
- ``triton``:           ``triton_chunk`` where it covers the settings, else ``triton_recurrent``;
- ``auto``:             ``triton`` on CUDA tensors; on other devices ``chunk`` where it covers the
                        likelihood, else ``reference``.

The Triton modules are imported only when chosen.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult, expand_groups, validate_inputs
from metaplastic.scan import scan as reference_scan

from . import chunk as _chunk

Tensor = torch.Tensor
BACKENDS = ("auto", "triton", "triton_chunk", "triton_recurrent", "chunk", "reference")


def _triton_usable(device: torch.device) -> Optional[str]:
    """Why Triton cannot run on ``device`` (None when it can)."""
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels need CUDA tensors (got {device.type}), or TRITON_INTERPRET=1 set before "
            "triton is imported")


def triton_chunk_reason(objective: Objective, b: Optional[Tensor], initial_state: Optional[Dict[str, Tensor]]
                        ) -> Optional[str]:
    """Why the chunked Triton path cannot run these settings (None when it can)."""
    reason = _chunk.unsupported_reason(objective)
    if reason is not None:
        return reason.replace("the chunked path", "the chunked Triton path")
    if objective.forgetting == "vector":
        return "the chunked Triton path supports forgetting 'none' or 'scalar', not 'vector' (GLA)"
    if objective.likelihood == "dot_diag":
        if b is not None and b.dim() == 4 and b.shape[-1] != 1:
            return ("the chunked Triton path needs a head-shared importance rate b [B,T,H] (THEORY.md limit 7); "
                    f"b has G = {b.shape[-1]} importance groups [B,T,H,G] (G = V: per value channel)")
        I0 = None if initial_state is None else initial_state.get("I")
        if isinstance(I0, Tensor) and I0.dim() >= 3:
            if not bool((I0 == I0[:, :, :1]).all()):
                return "the chunked Triton path needs an initial precision I that is constant over value rows"
    return None


def select_backend(objective: Objective, device: torch.device, backend: str = "auto",
                   b: Optional[Tensor] = None, initial_state: Optional[Dict[str, Tensor]] = None) -> str:
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
    reason = _triton_usable(device)
    if reason is not None:
        raise ValueError(f"backend={backend!r}: {reason}")
    if backend == "triton_recurrent":
        return backend
    reason = triton_chunk_reason(objective, b, initial_state)
    if backend == "triton_chunk":
        if reason is not None:
            raise ValueError(f"backend='triton_chunk' cannot run {objective.describe()}: {reason}")
        return backend
    return "triton_chunk" if reason is None else "triton_recurrent"


def scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
         beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
         prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
         initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
         output_variance: bool = False, cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
         chunk_size: int = 64) -> ScanResult:
    """:func:`metaplastic.scan` (same arguments, same :class:`~metaplastic.ScanResult`) run by ``backend``.

    ``backend``: ``"auto" | "triton" | "triton_chunk" | "triton_recurrent" | "chunk" | "reference"`` (see
    the module docstring). ``chunk_size`` is the chunk length of the chunked paths.
    """
    kwargs = dict(log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision, lam=lam, scale=scale,
                  initial_state=initial_state, output_final_state=output_final_state,
                  output_variance=output_variance, cu_seqlens=cu_seqlens)
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a tensor [B, T, H, K], got {type(q).__name__}")
    if isinstance(b, Tensor) and b.dim() == 4 and b.shape[-1] == 1:  # one importance group: head-shared
        b = kwargs["b"] = b[..., 0]
    chosen = select_backend(objective, q.device, backend, b, initial_state)
    if chosen == "reference":
        return reference_scan(objective, q, k, v, **kwargs)
    if chosen == "chunk":
        return _chunk.chunk_scan(objective, q, k, v, chunk_size=chunk_size, **kwargs)
    if chosen == "triton_chunk":
        from .chunk_triton import chunk_triton_scan
        return chunk_triton_scan(objective, q, k, v, chunk_size=chunk_size, **kwargs)
    from .fused_recurrent import fused_recurrent_scan
    if isinstance(b, Tensor) and isinstance(v, Tensor) and b.dim() == 4:  # groups -> one rate per value row
        validate_inputs(objective, q, k, v, log_decay, beta, b, prior_precision, lam, initial_state, cu_seqlens)
        kwargs["b"] = expand_groups(b, v.shape[-1])
    return fused_recurrent_scan(objective, q, k, v, **kwargs)
