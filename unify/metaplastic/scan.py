"""The reference scan: the memory recurrence, token by token, assembled from the objective's settings.

It is slow and exact, differentiable by autograd, and the yardstick every fast path is tested against.
Each step is ``closed_forms.step`` – the same code the sympy derivations check – so no model has its
own function here.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from . import closed_forms
from .objective import Objective
from .readout_solver import ReadoutSolver
from .scan_call import (CHECK_VALUES_ENV, STATE_KEYS, ScanCall, ScanResult, by_sequence, compute_dtype,
                        expand_groups, prepare, state_shapes, validate_inputs, validate_readout, values_checked,
                        zero_state)

Tensor = torch.Tensor
__all__ = ["CHECK_VALUES_ENV", "STATE_KEYS", "ScanCall", "ScanResult", "by_sequence", "compute_dtype", "expand_groups",
           "prepare", "reference_run", "scan", "state_shapes", "validate_inputs", "validate_readout",
           "values_checked", "zero_state"]


def _gates_at(objective: Objective, t: int, log_decay, beta, b, Ip, lam, dtype) -> closed_forms.Gates:
    """Gates of token ``t`` broadcast to ``[B, H, V|1, K|1]``."""
    if objective.forgetting == "none":
        alpha = torch.ones((), dtype=dtype, device=Ip.device)
    elif objective.forgetting == "scalar":
        alpha = log_decay[:, t].to(dtype).exp()[..., None, None]
    else:
        alpha = log_decay[:, t].to(dtype).exp()[..., None, :]
    if beta is None:
        beta_t = torch.ones((), dtype=dtype, device=Ip.device)
    else:
        beta_t = beta[:, t].to(dtype)
        beta_t = beta_t[..., None, None] if beta.dim() == 3 else beta_t[..., :, None]
    if b is None:
        b_t = torch.zeros((), dtype=dtype, device=Ip.device)
    else:
        b_t = b[:, t].to(dtype)
        b_t = b_t[..., None, None] if b.dim() == 3 else b_t[..., :, None]
    lam_t = None if lam is None else lam.to(dtype)
    return closed_forms.Gates(alpha=alpha, beta=beta_t, b=b_t, Ip=Ip.view(1, -1, 1, 1), lam=lam_t)


def scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
         beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
         prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
         initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
         output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
         readout: Optional[ReadoutSolver] = None) -> ScanResult:
    """Run the memory recurrence of ``objective`` over a sequence.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys; v: ``[B, T, H, V]`` values.
        log_decay: ``g ≤ 0``, ``α = exp(g)``: ``[B,T,H]`` (scalar forgetting) or ``[B,T,H,K]`` (vector);
            None for ``forgetting='none'``.
        beta: write rate, ``[B,T,H]`` or ``[B,T,H,V]``; None means 1.
        b: importance rate (diagonal posterior): ``[B,T,H]`` (head-shared) or ``[B,T,H,G]``, one rate per
            group of ``V/G`` contiguous value rows (G must divide V; ``G = V``: per value row); None means 0.
        prior_precision: ``Ip`` of ``p_0``, a float or ``[H]`` (point and diagonal posteriors).
        lam: ``[H, K]`` prior key precision λ of the full posterior.
        scale: read-out scale (``o = scale · E[S] q``).
        initial_state: dict as in :data:`STATE_KEYS`, each ``[N, H, V, K]`` (``H``: ``[N, H, K, K]``).
        output_final_state: return the state after the last token.
        output_variance: return the posterior predictive variance ``[B,T,H,V]`` (diagonal, full).
        cu_seqlens: ``[N+1]`` boundaries of N sequences packed along T (then B must be 1).
        readout: how the full posterior solves its read-out (:class:`~metaplastic.ReadoutSolver`; None:
            exactly). Conjugate gradients started from the previous solution restart at each sequence.

    Computes in float64 if any input is float64, else float32; the output has q's dtype, states fp32/64.
    """
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens, readout=readout)
    return reference_run(call)


def reference_run(call: ScanCall) -> ScanResult:
    """:func:`scan` on a validated :class:`~metaplastic.scan_call.ScanCall`: token by token, per sequence."""
    return by_sequence(call, _scan_dense)


def _scan_dense(c: ScanCall) -> ScanResult:
    """One batch of equal-length sequences: ``closed_forms.step`` token by token."""
    B, T, H, K, V = c.shape
    dtype = c.dtype
    b = expand_groups(c.b, V)
    if c.initial_state is None:
        state = zero_state(c.objective, B, H, K, V, c.prior_precision, dtype, c.q.device)
    else:
        state = {key: x.to(dtype) for key, x in c.initial_state.items()}
    qd, kd, vd = c.q.to(dtype), c.k.to(dtype), c.v.to(dtype)
    outs, vars_ = [], []
    x = None  # the previous token's key solution (full posterior)
    for t in range(T):
        gates = _gates_at(c.objective, t, c.log_decay, c.beta, b, c.prior_precision, c.lam, dtype)
        state, out, var, x = closed_forms.step(c.objective, state, qd[:, t], kd[:, t], vd[:, t], gates, c.scale,
                                               c.output_variance, solver=c.readout, guess=x)
        outs.append(out)
        if c.output_variance:
            vars_.append(var)
    output = torch.stack(outs, dim=1)
    variance = torch.stack(vars_, dim=1) if c.output_variance else None
    return ScanResult(output, state, variance)
