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

The concrete backends are one table, :data:`TABLE` ``{backend: (coverage rule, run)}``: the rules live in
the Triton-free :mod:`metaplastic.kernels.coverage` (``COVERAGE``), and each run imports its backend's module
when called, so the Triton modules are imported only when chosen. The module files do not carry the backend
names: the table's comment names each backend's module. A new backend is one row of :data:`TABLE` (with its
rule in ``COVERAGE``), plus its place in :data:`PREFERENCES` if a composite should choose it; the composites
``triton`` and ``auto`` are lists of concrete backends there.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from metaplastic.objective import Objective
from metaplastic.readout_solver import ReadoutSolver
from metaplastic.scan import ScanResult
from metaplastic.scan import reference_run

from . import chunk as _chunk
from .coverage import COVERAGE, Rule, Settings, per_value_reason, triton_chunk_reason
from .entry import ScanCall, prepare

Tensor = torch.Tensor
#: ``run(call, chunk_size)``: a validated call run by one backend.
Runner = Callable[[ScanCall, int], ScanResult]
__all__ = ["BACKENDS", "PREFERENCES", "TABLE", "per_value_reason", "run", "scan", "select_backend",
           "triton_chunk_reason"]


def _run_reference(call: ScanCall, chunk_size: int) -> ScanResult:
    return reference_run(call)


def _run_chunk(call: ScanCall, chunk_size: int) -> ScanResult:
    return _chunk.chunk_run(call, chunk_size)


def _run_triton_chunk(call: ScanCall, chunk_size: int) -> ScanResult:
    from .chunk_triton import chunk_triton_run
    return chunk_triton_run(call, chunk_size)


def _run_triton_per_value(call: ScanCall, chunk_size: int) -> ScanResult:
    from .per_value import per_value_run
    return per_value_run(call)


def _run_triton_recurrent(call: ScanCall, chunk_size: int) -> ScanResult:
    from .fused_recurrent import fused_recurrent_run
    return fused_recurrent_run(call)


#: Every concrete backend: ``(coverage rule, run)``. The rules live in :mod:`metaplastic.kernels.coverage`
#: (Triton-free); each run imports its module when called. Module of each backend: ``reference``
#: :mod:`metaplastic.scan`, ``chunk`` :mod:`~metaplastic.kernels.chunk`, ``triton_chunk``
#: :mod:`~metaplastic.kernels.chunk_triton`, ``triton_per_value`` :mod:`~metaplastic.kernels.per_value`,
#: ``triton_recurrent`` :mod:`~metaplastic.kernels.fused_recurrent`.
TABLE: Dict[str, Tuple[Rule, Runner]] = {
    "reference": (COVERAGE["reference"], _run_reference),
    "chunk": (COVERAGE["chunk"], _run_chunk),
    "triton_chunk": (COVERAGE["triton_chunk"], _run_triton_chunk),
    "triton_per_value": (COVERAGE["triton_per_value"], _run_triton_per_value),
    "triton_recurrent": (COVERAGE["triton_recurrent"], _run_triton_recurrent),
}
#: The composite backends: the first backend of the list whose rule covers the settings. ``auto`` means
#: ``triton`` on CUDA tensors. A composite that none covers refuses with its last backend's refusal, worded
#: with the composite's name.
PREFERENCES: Dict[str, Tuple[str, ...]] = {
    "triton": ("triton_chunk", "triton_per_value", "triton_recurrent"),
    "auto": ("chunk", "reference"),
}
BACKENDS = ("auto", "triton", "triton_chunk", "triton_per_value", "triton_recurrent", "chunk", "reference")


def select_backend(objective: Objective, device: torch.device, backend: str = "auto",
                   b: Optional[Tensor] = None, initial_state: Optional[Dict[str, Tensor]] = None,
                   check_values: Optional[bool] = None, V: Optional[int] = None) -> str:
    """The concrete backend (a key of :data:`TABLE`) that ``backend`` means for these settings on ``device``;
    ``ValueError`` naming why if it cannot run. ``b``: ``[B,T,H]``, ``[B,T,H,G]`` or ``[B,T,H,V]`` (None);
    ``V``: the value width (None: a 4-d ``b`` counts as per value channel)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    settings = Settings(objective, torch.device(device), b, initial_state, check_values, V)
    if backend == "auto" and settings.device.type == "cuda":
        backend = "triton"
    *first, last = PREFERENCES.get(backend, (backend,))
    for name in first:
        rule, _ = TABLE[name]
        if rule(name, settings) is None:
            return name
    rule, _ = TABLE[last]
    refusal = rule(backend, settings)  # a composite's refusal carries its own name
    if refusal is not None:
        raise ValueError(refusal)
    return last


def scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
         beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
         prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
         initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
         output_variance: bool = False, cu_seqlens: Optional[Tensor] = None, backend: str = "auto",
         chunk_size: int = 64, check_values: Optional[bool] = None,
         readout: Optional[ReadoutSolver] = None) -> ScanResult:
    """:func:`metaplastic.scan` (same arguments, same :class:`~metaplastic.ScanResult`) run by ``backend``.

    ``backend``: one of :data:`BACKENDS` (see
    the module docstring). ``chunk_size`` is the chunk length of the chunked paths. ``check_values``: check
    the values of CUDA tensors on the host (a synchronisation; by default they are checked on the device,
    see :mod:`metaplastic.kernels.entry`). ``readout``: the full posterior's read-out solve
    (:class:`~metaplastic.ReadoutSolver`; None: exact), run by ``reference`` and ``triton_recurrent``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens, check_values=check_values,
                   readout=readout)
    chosen = select_backend(objective, q.device, backend, call.b, initial_state, check_values, call.shape[-1])
    return run(call, chosen, chunk_size)


def run(call: ScanCall, backend: str, chunk_size: int = 64) -> ScanResult:
    """Run a validated call by a concrete backend (one that :func:`select_backend` returns)."""
    if backend not in TABLE:
        raise ValueError(f"backend={backend!r} is not a concrete fast path")
    _, runner = TABLE[backend]
    return runner(call, chunk_size)
