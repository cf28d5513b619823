"""The entry layer of every fast path: one validation, one compute dtype, one varlen split, one Triton check.

:func:`prepare` turns the arguments of :func:`metaplastic.scan` into a :class:`ScanCall` (validated once);
each path (``chunk``, ``triton_chunk``, ``triton_recurrent``, ``triton_per_value``) takes a ``ScanCall``, so the
dispatcher validates a call once and the paths carry no copies of the checks.

Value checks never synchronise the host with a GPU: Python numbers and CPU tensors are checked directly;
for CUDA tensors the checks are on-device asserts (``torch._assert_async``: a bad value fails at a later
CUDA call, not at this line), or host checks when ``check_values=True``. One exception: packed sequences
need their boundaries on the host, so a CUDA ``cu_seqlens`` is copied once (pass a CPU tensor to avoid it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Union

import torch

from metaplastic.objective import Objective
from metaplastic.readout_solver import ReadoutSolver
from metaplastic.scan import ScanResult, validate_inputs, validate_readout, zero_state

Tensor = torch.Tensor


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can: CUDA, or the interpreter)."""
    if torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernels need CUDA tensors (got {torch.device(device).type}), or TRITON_INTERPRET=1 "
            "set before triton is imported")


def compute_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    """float64 if any of ``xs`` is float64, else float32 (fp16 / bf16 inputs are computed in float32)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _host_checkable(x: Tensor, check_values: Optional[bool]) -> bool:
    """Check ``x``'s values on the host: CPU tensors always, GPU tensors only on request."""
    return x.device.type == "cpu" or bool(check_values)


def rows_constant(x: Tensor, check_values: Optional[bool] = None) -> bool:
    """Whether ``x [N,H,V,K]`` is the same in every value row (the initial precision of the fast paths).

    On a GPU without ``check_values`` the answer is True and an on-device assert guards it."""
    if _host_checkable(x, check_values):
        return bool((x == x[:, :, :1]).all())
    torch._assert_async((x == x[:, :, :1]).all(), "initial_state['I'] varies over value rows: pass "
                        "check_values=True (routes it to the per-value path) or b per value channel")
    return True


def rows_constant_in_groups(x: Tensor, groups: int, check_values: Optional[bool] = None) -> bool:
    """Whether ``x [N,H,V,K]`` is the same in every value row of each of ``groups`` contiguous row groups."""
    N, H, V, K = x.shape
    return rows_constant(x.reshape(N, H * groups, V // groups, K), check_values)


@dataclass(frozen=True)
class ScanCall:
    """A validated call of :func:`metaplastic.scan` (same argument names).

    ``prior_precision`` is a ``[H]`` tensor in the compute ``dtype``; ``bounds`` the host list of
    ``cu_seqlens`` (None for a dense batch); ``b_groups`` the number of importance rates per head and token
    (0: no ``b``; 1: head-shared ``[B,T,H]``; G: grouped ``[B,T,H,G]``, G = V per value channel)."""

    objective: Objective
    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Optional[Tensor]
    beta: Optional[Tensor]
    b: Optional[Tensor]
    prior_precision: Tensor
    lam: Optional[Tensor]
    scale: float
    initial_state: Optional[Dict[str, Tensor]]
    output_final_state: bool
    output_variance: bool
    bounds: Optional[List[int]]
    dtype: torch.dtype
    check_values: Optional[bool] = None
    ip_requires_grad: bool = False
    readout: Optional[ReadoutSolver] = None

    @property
    def shape(self):
        """``(B, T, H, K, V)``."""
        B, T, H, K = self.q.shape
        return B, T, H, K, self.v.shape[-1]

    @property
    def b_groups(self) -> int:
        if self.b is None:
            return 0
        return 1 if self.b.dim() == 3 else self.b.shape[-1]

    def with_b_per_value(self) -> "ScanCall":
        """This call with a grouped ``b [B,T,H,G]`` (1 < G < V) expanded to one rate per value row (exact:
        row ``i`` uses ``b[..., i // (V/G)]``); other calls unchanged."""
        G, V = self.b_groups, self.shape[-1]
        if G <= 1 or G == V:
            return self
        return replace(self, b=self.b.repeat_interleave(V // G, -1))

    def kwargs(self) -> Dict:
        """The keyword arguments of :func:`metaplastic.scan` that this call stands for."""
        cu = None if self.bounds is None else torch.tensor(self.bounds, dtype=torch.int64)
        return dict(log_decay=self.log_decay, beta=self.beta, b=self.b, prior_precision=self.prior_precision,
                    lam=self.lam, scale=self.scale, initial_state=self.initial_state,
                    output_final_state=self.output_final_state, output_variance=self.output_variance,
                    cu_seqlens=cu, readout=self.readout)

    def needs_grad(self) -> bool:
        """Whether autograd will ask this call for gradients."""
        xs = [self.q, self.k, self.v, self.log_decay, self.beta, self.b, self.lam]
        xs += list((self.initial_state or {}).values())
        return torch.is_grad_enabled() and (self.ip_requires_grad or any(x is not None and x.requires_grad
                                                                          for x in xs))


def prepare(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
            beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
            prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
            initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
            output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
            check_values: Optional[bool] = None, readout: Optional[ReadoutSolver] = None) -> ScanCall:
    """Validate the arguments of :func:`metaplastic.scan` once (``ValueError`` naming the argument) and
    return them as a :class:`ScanCall`. See the module docstring for which value checks run where."""
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a tensor [B, T, H, K], got {type(q).__name__}")
    ip_check: Union[float, Tensor] = prior_precision
    if isinstance(prior_precision, Tensor) and not _host_checkable(prior_precision, check_values):
        if tuple(prior_precision.shape) not in ((), (q.shape[2],)):
            raise ValueError(f"prior_precision must be a float or [H] = [{q.shape[2]}], "
                             f"got {list(prior_precision.shape)}")
        torch._assert_async((prior_precision > 0).all(), "prior_precision must be positive")
        ip_check = 1.0  # its value is checked on the device
    bounds = None
    cu_check = cu_seqlens
    if cu_seqlens is not None and isinstance(cu_seqlens, Tensor):
        bounds = [int(x) for x in cu_seqlens.tolist()]  # one copy to the host: the split needs it
        cu_check = torch.tensor(bounds, dtype=torch.int64) if cu_seqlens.dim() == 1 else cu_seqlens
    if isinstance(b, Tensor) and b.dim() == 4 and b.shape[-1] == 1 and v.shape[-1] > 1:
        b = b[..., 0]  # one importance group: head-shared
    b_check = b
    if isinstance(b, Tensor) and b.dim() == 4 and b.shape[:3] == q.shape[:3]:
        G, V = b.shape[-1], v.shape[-1]
        if G != V:
            if V % G != 0:
                raise ValueError(f"b [B,T,H,G] needs G dividing V = {V} (grouped importance), got G = {G}")
            b_check = b[..., :1].expand(*b.shape[:3], V)  # a per-value stand-in of the same validity
    validate_inputs(objective, q, k, v, log_decay, beta, b_check, ip_check, lam, initial_state, cu_check)
    validate_readout(objective, readout)
    if output_variance and objective.posterior == "point":
        raise ValueError("output_variance=True needs posterior='diagonal' or 'full'; 'point' has no variance")
    dtype = compute_dtype(q, k, v)
    H = q.shape[2]
    ip = torch.as_tensor(prior_precision, device=q.device).to(dtype)
    ip = ip.expand(H) if ip.dim() == 0 else ip
    return ScanCall(objective, q, k, v, log_decay, beta, b, ip, lam, float(scale), initial_state,
                    bool(output_final_state), bool(output_variance), bounds, dtype, check_values,
                    isinstance(prior_precision, Tensor) and prior_precision.requires_grad,
                    None if readout is None or readout.is_exact else readout)


def by_sequence(call: ScanCall, run_dense: Callable[[ScanCall], ScanResult]) -> ScanResult:
    """Run ``run_dense`` on each packed sequence of ``call`` (or once on a dense batch) and assemble the
    :class:`ScanResult` (output in q's dtype; final states in the compute dtype, an empty sequence keeping its
    initial state). ``run_dense`` gets dense calls (``bounds`` None) and returns the final state when the call
    asks for it (packed sequences always ask)."""
    if call.bounds is None:
        res = run_dense(call)
        return ScanResult(res.output.to(call.q.dtype), res.final_state if call.output_final_state else None,
                          res.variance)
    B, T, H, K, V = call.shape
    outs, vars_, finals = [], [], []
    pick = (lambda x, sl: None if x is None else x[:, sl])
    for n, (start, end) in enumerate(zip(call.bounds[:-1], call.bounds[1:])):
        init = None if call.initial_state is None else {key: x[n:n + 1] for key, x in call.initial_state.items()}
        if end == start:
            zero = zero_state(call.objective, 1, H, K, V, call.prior_precision, call.dtype, call.q.device)
            finals.append(zero if init is None else {key: x.to(call.dtype) for key, x in init.items()})
            continue
        sl = slice(start, end)
        sub = replace(call, q=call.q[:, sl], k=call.k[:, sl], v=call.v[:, sl], log_decay=pick(call.log_decay, sl),
                      beta=pick(call.beta, sl), b=pick(call.b, sl), initial_state=init, bounds=None,
                      output_final_state=True)
        res = run_dense(sub)
        outs.append(res.output)
        vars_.append(res.variance)
        finals.append(res.final_state)
    output = torch.cat(outs, 1).to(call.q.dtype)
    variance = torch.cat(vars_, 1) if call.output_variance else None
    final = None
    if call.output_final_state:
        final = {key: torch.cat([f[key].to(call.dtype) for f in finals], 0) for key in finals[0]}
    return ScanResult(output, final, variance)
