"""The reference scan: the memory recurrence, token by token, assembled from the objective's settings.

It is slow and exact, differentiable by autograd, and the yardstick every fast path is tested against.
Each step is ``closed_forms.step`` – the same code the sympy derivations check – so no model has its
own function here.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Dict, NamedTuple, Optional, Union

import torch

from . import closed_forms
from .objective import Objective
from .readout_solver import ReadoutSolver

Tensor = torch.Tensor


class ScanResult(NamedTuple):
    """``output [B,T,H,V]``; ``final_state`` a dict of ``[N,H,...]`` tensors or None;
    ``variance [B,T,H,V]`` or None."""

    output: Tensor
    final_state: Optional[Dict[str, Tensor]]
    variance: Optional[Tensor]


STATE_KEYS = {"point": ("S",), "diagonal": ("mu", "I"), "full": ("G", "H")}


def state_shapes(objective: Objective, N: int, H: int, K: int, V: int) -> Dict[str, tuple]:
    """Shapes of the state dictionary for ``N`` sequences (value-first)."""
    if objective.posterior == "full":
        return {"G": (N, H, V, K), "H": (N, H, K, K)}
    return {key: (N, H, V, K) for key in STATE_KEYS[objective.posterior]}


def zero_state(objective: Objective, N: int, H: int, K: int, V: int, prior_precision: Tensor,
               dtype: torch.dtype, device: torch.device) -> Dict[str, Tensor]:
    """The state before any token: means 0, ``H = 0``, ``I = Ip``. ``prior_precision`` is ``[H]``."""
    shapes = state_shapes(objective, N, H, K, V)
    state = {key: torch.zeros(shape, dtype=dtype, device=device) for key, shape in shapes.items()}
    if objective.posterior == "diagonal":
        state["I"] = state["I"] + prior_precision.to(dtype).view(1, H, 1, 1)
    return state


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


CHECK_VALUES_ENV = "METAPLASTIC_CHECK_VALUES"


def values_checked(x: Tensor) -> bool:
    """Whether the values of gate ``x`` are checked: always on the CPU (no synchronisation to pay); on an
    accelerator only with ``METAPLASTIC_CHECK_VALUES=1`` (each check would wait for the device)."""
    return x.device.type == "cpu" or os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _gate(name: str, x, shapes: str) -> None:
    _check(isinstance(x, Tensor), f"{name} must be a tensor {shapes}, got {type(x).__name__}"
           + (f" {x!r}" if isinstance(x, (int, float)) else ""))
    _check(x.is_floating_point(), f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_values(name: str, x: Tensor, rule: str) -> None:
    """``rule``: 'nonpositive' (``g ≤ 0``; +inf refused, NaN – e.g. from a diverged training step – passes and
    shows in the output) or 'positive' (finite and ``> 0``)."""
    if not values_checked(x):
        return
    with torch.no_grad():
        if rule == "positive":
            _check(bool(torch.isfinite(x).all()), f"{name} has non-finite values (NaN or inf)")
        bad = x > 0 if rule == "nonpositive" else x <= 0
        if bool(bad.any()):
            worst = x[bad].flatten()[0].item()
            want = "≤ 0 (a decay α = exp(g) ≤ 1; a positive value is growth)" if rule == "nonpositive" else "> 0"
            raise ValueError(f"{name} must be {want}, got {worst:g}")


def validate_inputs(objective: Objective, q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
                    beta: Optional[Tensor], b: Optional[Tensor], prior_precision, lam: Optional[Tensor],
                    initial_state: Optional[Dict[str, Tensor]], cu_seqlens: Optional[Tensor] = None) -> None:
    """Raise ``ValueError`` naming the argument for every shape or setting the scan cannot handle.

    Shapes, dtypes and Python numbers are always checked. The values of the gates (``log_decay ≤ 0``;
    ``prior_precision`` and ``lam`` finite and ``> 0``) are checked for CPU tensors; for tensors on an
    accelerator only when the environment sets ``METAPLASTIC_CHECK_VALUES=1`` (a check waits for the device)."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a metaplastic.Objective, got {type(objective).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check(isinstance(x, Tensor) and x.dim() == 4, f"{name} must be a 4-d tensor [B, T, H, D], got "
               f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        _check(x.is_floating_point(), f"{name} must be a floating-point tensor, got {x.dtype}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check(k.shape == q.shape, f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}: both are [B, T, H, K]")
    _check(v.shape[:3] == q.shape[:3], f"v has shape {tuple(v.shape)}: its [B, T, H] must match q's {tuple(q.shape[:3])}")
    _check(T >= 1 and K >= 1 and V >= 1 and H >= 1 and B >= 1, f"empty input: q {tuple(q.shape)}, v {tuple(v.shape)}")
    f = objective.forgetting
    if f == "none":
        _check(log_decay is None, "log_decay was given but objective.forgetting == 'none'")
    else:
        _check(log_decay is not None, f"log_decay is required for forgetting={f!r}")
        want = (B, T, H) if f == "scalar" else (B, T, H, K)
        _gate("log_decay", log_decay, str(list(want)))
        _check(tuple(log_decay.shape) == want,
               f"log_decay must be {list(want)} for forgetting={f!r}, got {list(log_decay.shape)}")
        _check_values("log_decay", log_decay, "nonpositive")
    if beta is not None:
        _gate("beta", beta, "[B,T,H] or [B,T,H,V]")
        _check(tuple(beta.shape) in ((B, T, H), (B, T, H, V)),
               f"beta must be [B,T,H] or [B,T,H,V] = {[B, T, H]} or {[B, T, H, V]}, got {list(beta.shape)}")
        _check(not (objective.posterior == "full" and beta.dim() == 4),
               "beta per value channel [B,T,H,V] is not defined for posterior='full' (the key precision is shared)")
    if b is not None:
        _check(objective.posterior == "diagonal",
               f"b (importance rate) is only used by posterior='diagonal', not {objective.posterior!r}")
        _gate("b", b, "[B,T,H] or [B,T,H,G]")
        _check(b.dim() in (3, 4) and tuple(b.shape[:3]) == (B, T, H),
               f"b must be [B,T,H] (head-shared) or [B,T,H,G] (G importance groups; G = V: per value row) "
               f"with [B,T,H] = {[B, T, H]}, got {list(b.shape)}")
        if b.dim() == 4:
            G = b.shape[-1]
            _check(G >= 1 and V % G == 0, f"b has G = {G} importance groups (b [B,T,H,G] = {list(b.shape)}) but "
                   f"G must divide the value width V = {V}")
    if isinstance(prior_precision, Tensor):
        _check(tuple(prior_precision.shape) in ((), (H,)), f"prior_precision must be a float or [H] = [{H}], "
               f"got {list(prior_precision.shape)}")
        _check(prior_precision.is_floating_point(), f"prior_precision must be floating-point, got "
               f"{prior_precision.dtype}")
        _check_values("prior_precision", prior_precision, "positive")
    else:
        _check(isinstance(prior_precision, numbers.Real) and not isinstance(prior_precision, bool),
               f"prior_precision must be a float or a tensor [H], got {type(prior_precision).__name__}")
        _check(math.isfinite(prior_precision) and prior_precision > 0,
               f"prior_precision must be finite and positive, got {prior_precision}")
    if objective.posterior == "full":
        _check(lam is not None, "lam [H, K] (the prior key precision λ) is required for posterior='full'")
        _gate("lam", lam, f"[H, K] = [{H}, {K}]")
        _check(tuple(lam.shape) == (H, K), f"lam must be [H, K] = [{H}, {K}], got {list(lam.shape)}")
        _check_values("lam", lam, "positive")
    else:
        _check(lam is None, f"lam is only used by posterior='full', not {objective.posterior!r}")
    N = B
    if cu_seqlens is not None:
        _check(B == 1, f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={B}")
        _check(isinstance(cu_seqlens, Tensor), f"cu_seqlens must be an integer tensor [N+1], got "
               f"{type(cu_seqlens).__name__}")
        _check(not cu_seqlens.is_floating_point() and not cu_seqlens.is_complex() and cu_seqlens.dtype != torch.bool,
               f"cu_seqlens must hold integers (int32/int64 boundaries), got {cu_seqlens.dtype}")
        _check(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2, "cu_seqlens must be a 1-d tensor [N+1]")
        cs = cu_seqlens.tolist()
        _check(cs[0] == 0 and cs[-1] == T and all(a <= b_ for a, b_ in zip(cs, cs[1:])),
               f"cu_seqlens must start at 0, be non-decreasing and end at T={T}, got {cs}")
        N = len(cs) - 1
    if initial_state is not None:
        _check(isinstance(initial_state, dict), "initial_state must be a dict of tensors "
               f"with keys {STATE_KEYS[objective.posterior]}")
        shapes = state_shapes(objective, N, H, K, V)
        for key, shape in shapes.items():
            _check(key in initial_state, f"initial_state is missing {key!r}; posterior={objective.posterior!r} "
                   f"needs {tuple(shapes)}")
            _check(tuple(initial_state[key].shape) == shape,
                   f"initial_state[{key!r}] must be {list(shape)}, got {list(initial_state[key].shape)}")
        extra = set(initial_state) - set(shapes)
        _check(not extra, f"initial_state has unexpected keys {sorted(extra)}; expected {tuple(shapes)}")


def validate_readout(objective: Objective, readout: Optional[ReadoutSolver]) -> None:
    """``readout`` is None or a :class:`ReadoutSolver`; a non-exact one only for ``posterior='full'``."""
    if readout is None:
        return
    _check(isinstance(readout, ReadoutSolver), f"readout must be a metaplastic.ReadoutSolver or None, got "
           f"{type(readout).__name__}")
    _check(readout.is_exact or objective.posterior == "full", f"readout {readout.describe()} solves the full "
           f"posterior's read-out; posterior={objective.posterior!r} reads out without a solve")


def expand_groups(b: Optional[Tensor], V: int) -> Optional[Tensor]:
    """``b [B,T,H,G]`` -> ``[B,T,H,V]``, each group's rate repeated over its ``V/G`` contiguous value rows
    (THEORY.md limit 8). ``[B,T,H]`` (head-shared) and None pass through unchanged."""
    if b is None or b.dim() == 3 or b.shape[-1] == V:
        return b
    return b.repeat_interleave(V // b.shape[-1], dim=-1)


def _per_head(x: Union[float, Tensor], H: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.as_tensor(x, dtype=dtype, device=device)
    return x.expand(H) if x.dim() == 0 else x


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
    validate_inputs(objective, q, k, v, log_decay, beta, b, prior_precision, lam, initial_state, cu_seqlens)
    validate_readout(objective, readout)
    if output_variance and objective.posterior == "point":
        raise ValueError("output_variance=True needs posterior='diagonal' or 'full'; 'point' has no variance")
    B, T, H, K = q.shape
    V = v.shape[-1]
    b = expand_groups(b, V)
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    device = q.device
    Ip = _per_head(prior_precision, H, dtype, device)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outs, vars_, finals = [], [], []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            sl = slice(start, end)
            init = None if initial_state is None else {key: x[n:n + 1] for key, x in initial_state.items()}
            if end == start:
                zero = zero_state(objective, 1, H, K, V, Ip, dtype, device)
                finals.append(init if init is not None else zero)
                continue
            res = _scan_dense(objective, q[:, sl], k[:, sl], v[:, sl],
                              None if log_decay is None else log_decay[:, sl], None if beta is None else beta[:, sl],
                              None if b is None else b[:, sl], Ip, lam, scale, init, output_variance, dtype, readout)
            outs.append(res.output)
            vars_.append(res.variance)
            finals.append(res.final_state)
        output = torch.cat(outs, dim=1).to(q.dtype)
        variance = torch.cat(vars_, dim=1) if output_variance else None
        final = {key: torch.cat([f[key] for f in finals], dim=0) for key in finals[0]} if output_final_state else None
        return ScanResult(output, final, variance)
    res = _scan_dense(objective, q, k, v, log_decay, beta, b, Ip, lam, scale, initial_state, output_variance, dtype,
                      readout)
    return ScanResult(res.output.to(q.dtype), res.final_state if output_final_state else None, res.variance)


def _scan_dense(objective, q, k, v, log_decay, beta, b, Ip, lam, scale, initial_state, output_variance,
                dtype, readout=None) -> ScanResult:
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        state = zero_state(objective, B, H, K, V, Ip, dtype, q.device)
    else:
        state = {key: x.to(dtype) for key, x in initial_state.items()}
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    outs, vars_ = [], []
    x = None  # the previous token's key solution (full posterior)
    for t in range(T):
        gates = _gates_at(objective, t, log_decay, beta, b, Ip, lam, dtype)
        state, out, var, x = closed_forms.step(objective, state, qd[:, t], kd[:, t], vd[:, t], gates, scale,
                                               output_variance, solver=readout, guess=x)
        outs.append(out)
        if output_variance:
            vars_.append(var)
    output = torch.stack(outs, dim=1)
    variance = torch.stack(vars_, dim=1) if output_variance else None
    return ScanResult(output, state, variance)
