"""The front door of every scan: one validation, one compute dtype, one varlen split, one value-check rule.

:func:`prepare` turns the arguments of :func:`metaplastic.scan` into a :class:`ScanCall` (validated once):
the reference scan and every fast path of :mod:`metaplastic.kernels` start from it, so each refuses
exactly what the others refuse. :func:`by_sequence` runs a dense computation on each packed sequence of a
call and assembles the :class:`ScanResult`. The compute dtype is float64 if any of ``q, k, v`` is float64,
else float32 (:func:`compute_dtype`).

Value checks (:func:`values_checked`) never synchronise the host with an accelerator unless asked: Python
numbers and CPU tensors are checked directly; tensors on an accelerator only with ``check_values=True`` or
``METAPLASTIC_CHECK_VALUES=1``.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, NamedTuple, Optional, Union

import torch

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


def values_checked(x: Tensor, check_values: Optional[bool] = None) -> bool:
    """Whether the values of ``x`` are checked on the host: always on the CPU (no synchronisation to pay); on
    an accelerator only with ``check_values=True`` or ``METAPLASTIC_CHECK_VALUES=1`` (each check would wait
    for the device)."""
    return x.device.type == "cpu" or bool(check_values) or os.environ.get(CHECK_VALUES_ENV, "") == "1"


def _gate(name: str, x, shapes: str) -> None:
    _check(isinstance(x, Tensor), f"{name} must be a tensor {shapes}, got {type(x).__name__}"
           + (f" {x!r}" if isinstance(x, (int, float)) else ""))
    _check(x.is_floating_point(), f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_values(name: str, x: Tensor, rule: str, check_values: Optional[bool] = None) -> None:
    """``rule``: 'nonpositive' (``g ≤ 0``; +inf refused, NaN – e.g. from a diverged training step – passes and
    shows in the output) or 'positive' (finite and ``> 0``)."""
    if not values_checked(x, check_values):
        return
    if torch.compiler.is_compiling():
        # Under torch.compile the same checks run on every call, as an assert inside the graph: reading the
        # verdict into Python (bool(), item()) would break the graph at every check. A bad value then raises
        # RuntimeError naming the rule, without the offending value.
        with torch.no_grad():
            want = "≤ 0 (a decay α = exp(g) ≤ 1)" if rule == "nonpositive" else "finite and > 0"
            ok = ~(x > 0).any() if rule == "nonpositive" else (torch.isfinite(x) & (x > 0)).all()  # NaN: as below
            torch._assert_async(ok, f"{name} must be {want}")
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
                    initial_state: Optional[Dict[str, Tensor]], cu_seqlens: Optional[Tensor] = None,
                    check_values: Optional[bool] = None) -> None:
    """Raise ``ValueError`` naming the argument for every shape or setting the scan cannot handle.

    Shapes, dtypes and Python numbers are always checked. The values of the gates (``log_decay ≤ 0``;
    ``prior_precision`` and ``lam`` finite and ``> 0``) are checked for CPU tensors; for tensors on an
    accelerator only with ``check_values=True`` or when the environment sets ``METAPLASTIC_CHECK_VALUES=1`` (a
    check waits for the device; :func:`values_checked`)."""
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
        _check_values("log_decay", log_decay, "nonpositive", check_values)
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
        _check_values("prior_precision", prior_precision, "positive", check_values)
    else:
        _check(isinstance(prior_precision, numbers.Real) and not isinstance(prior_precision, bool),
               f"prior_precision must be a float or a tensor [H], got {type(prior_precision).__name__}")
        _check(math.isfinite(prior_precision) and prior_precision > 0,
               f"prior_precision must be finite and positive, got {prior_precision}")
    if objective.posterior == "full":
        _check(lam is not None, "lam [H, K] (the prior key precision λ) is required for posterior='full'")
        _gate("lam", lam, f"[H, K] = [{H}, {K}]")
        _check(tuple(lam.shape) == (H, K), f"lam must be [H, K] = [{H}, {K}], got {list(lam.shape)}")
        _check_values("lam", lam, "positive", check_values)
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
    (docs/theory.md#limit-8-grouped-importance). ``[B,T,H]`` (head-shared) and None pass through unchanged."""
    if b is None or b.dim() == 3 or b.shape[-1] == V:
        return b
    return b.repeat_interleave(V // b.shape[-1], dim=-1)


def compute_dtype(*xs: Optional[Tensor]) -> torch.dtype:
    """float64 if any of ``xs`` is float64, else float32 (fp16 / bf16 inputs are computed in float32)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32



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
    """The front door of every scan, the reference's and the fast paths': validate the arguments of
    :func:`metaplastic.scan` once (``ValueError`` naming the argument) and return them as a :class:`ScanCall`.

    Values are checked by :func:`values_checked`'s rule; a ``prior_precision`` tensor whose values are not
    checked on the host gets an on-device assert (``torch._assert_async``: a bad value fails at a later
    device call, no synchronisation). A ``cu_seqlens`` on an accelerator is copied to the host once (the
    split needs its boundaries; pass a CPU tensor to avoid it)."""
    if not isinstance(q, Tensor):
        raise ValueError(f"q must be a tensor [B, T, H, K], got {type(q).__name__}")
    if isinstance(cu_seqlens, Tensor):
        cu_seqlens = cu_seqlens.cpu()
    validate_inputs(objective, q, k, v, log_decay, beta, b, prior_precision, lam, initial_state, cu_seqlens,
                    check_values)
    validate_readout(objective, readout)
    if output_variance and objective.posterior == "point":
        raise ValueError("output_variance=True needs posterior='diagonal' or 'full'; 'point' has no variance")
    if isinstance(prior_precision, Tensor) and not values_checked(prior_precision, check_values):
        torch._assert_async((prior_precision > 0).all(), "prior_precision must be positive")
    bounds = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    if b is not None and b.dim() == 4 and b.shape[-1] == 1 and v.shape[-1] > 1:
        b = b[..., 0]  # one importance group: head-shared
    dtype = compute_dtype(q, k, v)
    H = q.shape[2]
    ip = torch.as_tensor(prior_precision, dtype=dtype, device=q.device)  # a Python float straight to dtype
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
