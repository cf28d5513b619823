"""Non-finite inputs on the chunked paths: computed as the reference scan computes them, causally.

A chunk is a block of matrix products, and ``0 · NaN = NaN``: a NaN at token 30 would reach the outputs of
tokens 0–29 of its chunk through any product that contracts over tokens. So before the chunked work every
non-finite entry is replaced by 0 (``torch.where``, not a product), and afterwards the entries that the
token-by-token recurrence makes non-finite are set to NaN:

- ``q_t`` non-finite: the output of token t (all value rows);
- ``k_t`` (or a vector log-decay) non-finite in key channel j: column j of every later state, so every
  later output;
- ``v_t``, a per-value ``beta_t`` or ``b_t`` non-finite in value row i: row i of every later state and output
  (a grouped ``b_t [G]``: the rows of its group);
- a scalar log-decay that is NaN or ``+inf``, a head-shared ``beta_t`` or ``b_t``: everything after;
- a non-finite initial-state entry: that entry of every state, its row of every output.

One difference remains: after an infinite (not NaN) key the reference's precision is ``inf`` in that column
and its variance reads ``1/inf = 0`` there, a finite number; here that variance is NaN.

A log-decay of ``-inf`` is finite for this purpose (``α = 0``, a reset). The precision ``I`` of the diagonal
posterior (and so the variance) depends on ``k``, the log-decay and ``b`` only, not on ``v`` or ``beta``.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult

Tensor = torch.Tensor


def _bad(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else ~torch.isfinite(x)


def _clean(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _so_far(x: Tensor) -> Tensor:
    """Along time (dim 1): true from the first true entry on."""
    return x.cumsum(1, dtype=torch.int32) > 0


def _or(*xs: Optional[Tensor]) -> Optional[Tensor]:
    out = None
    for x in xs:
        if x is not None:
            out = x if out is None else out | x
    return out


class Poison(NamedTuple):
    """Where the recurrence turns non-finite: per token ``[B,T,H,1|V]`` for the output (``out``) and the
    variance (``var``); per final-state entry ``[B,H,V,K]`` for the numerator (``num``) and precision (``prec``)."""

    out: Optional[Tensor]
    var: Optional[Tensor]
    num: Optional[Tensor]
    prec: Optional[Tensor]


def all_finite(q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor], beta: Optional[Tensor],
               b: Optional[Tensor], initial_state: Optional[Dict[str, Tensor]]) -> Tensor:
    """A 0-d boolean tensor, on the inputs' device: true when no input needs :func:`sanitize`'s masks.

    One reduction per input, each reading it once and writing a scalar: the sum of a tensor is finite when
    every entry is (a NaN or an infinity makes it NaN or infinite), and a log-decay's sum is neither NaN nor
    ``+inf`` when none of its entries is (``-inf``, a reset, is allowed). A sum that overflows from finite
    entries only reads as non-finite: the call then takes the masked path, which is exact for finite inputs
    too, only slower."""
    def total(x: Tensor) -> Tensor:
        return x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    tensors = [q, k, v, beta, b] + ([] if initial_state is None else list(initial_state.values()))
    ok = torch.isfinite(torch.stack([total(x) for x in tensors if x is not None])).all()
    if log_decay is not None:
        s = total(log_decay)
        ok = ok & ~(torch.isnan(s) | (s == float("inf")))
    return ok


def may_read_on_host(x: Tensor) -> bool:
    """Whether the call may read :func:`all_finite` into Python: not while ``torch.compile`` traces (it would
    break the graph) nor while a CUDA graph is captured (a capture cannot synchronise with the host). There
    the masks are always computed: elementwise work on the device, no synchronisation."""
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def read_on_host(flag: Tensor) -> bool:
    """``flag`` read into Python (on a GPU, one synchronisation with the host)."""
    return bool(flag)


def sanitize(objective: Objective, q: Tensor, k: Tensor, v: Tensor, log_decay: Optional[Tensor],
             beta: Optional[Tensor], b: Optional[Tensor], initial_state: Optional[Dict[str, Tensor]]
             ) -> Tuple[Tuple, Optional[Poison]]:
    """``((q, k, v, log_decay, beta, b, initial_state), poison)`` with every non-finite entry set to 0 and
    ``poison`` None when every input is finite (then the inputs come back unchanged). Outside a compiled graph or
    a CUDA-graph capture the all-finite case is found first by :func:`all_finite` (one read of each input and
    one host synchronisation) and costs nothing more; inside one the masks are always computed."""
    if may_read_on_host(q) and read_on_host(all_finite(q, k, v, log_decay, beta, b, initial_state)):
        return (q, k, v, log_decay, beta, b, initial_state), None
    g_bad = None if log_decay is None else torch.isnan(log_decay) | (log_decay == float("inf"))
    state_bad = None
    if initial_state is not None:
        state_bad = _or(*(_bad(x) for x in initial_state.values()))
    parts = [_bad(q), _bad(k), _bad(v), g_bad, _bad(beta), _bad(b), state_bad]
    q_bad, k_bad, v_bad, _, beta_bad, b_bad, _ = parts
    clean_g = None if log_decay is None else torch.where(g_bad, torch.zeros_like(log_decay), log_decay)
    clean_state = None if initial_state is None else {key: _clean(x) for key, x in initial_state.items()}
    if initial_state is not None and objective.posterior == "diagonal":
        clean_state["I"] = torch.where(torch.isfinite(initial_state["I"]), initial_state["I"],
                                       torch.ones_like(initial_state["I"]))
    cleaned = (_clean(q), _clean(k), _clean(v), clean_g, _clean(beta), _clean(b), clean_state)

    def split(x: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """A gate ``[B,T,H]`` hits every row (``[B,T,H,1]``); ``[B,T,H,V]`` its own row."""
        if x is None:
            return None, None
        return (x[..., None], None) if x.dim() == 3 else (None, x)

    g_all, g_col = split(g_bad) if objective.forgetting != "vector" else (None, g_bad)
    beta_all, beta_row = split(beta_bad)
    if b_bad is not None and b_bad.dim() == 4 and b_bad.shape[-1] != v.shape[-1]:  # grouped: G rows each
        b_bad = b_bad.repeat_interleave(v.shape[-1] // b_bad.shape[-1], -1)
    b_all, b_row = split(b_bad)
    col = _so_far(_or(k_bad, g_col))  # [B,T,H,K]
    shared = _so_far(_or(g_all, col.any(-1, keepdim=True)))  # [B,T,H,1]: key columns reach every row
    num_rows = _so_far(_or(v_bad, beta_row, beta_all))  # numerator only
    prec_rows = _so_far(b_row) if b_row is not None else None
    prec_all = _so_far(b_all) if b_all is not None else None
    init_row = None if state_bad is None else state_bad.any(-1)[:, None]  # [B,1,H,V]
    init_prec_row = None
    if initial_state is not None and objective.posterior == "diagonal":
        init_prec_row = _bad(initial_state["I"]).any(-1)[:, None]
    q_tok = q_bad.any(-1, keepdim=True)
    out = _or(q_tok, shared, num_rows, prec_rows, prec_all, init_row)
    var = _or(q_tok, shared, prec_rows, prec_all, init_prec_row)

    def last(x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x[:, -1]  # [B,H,·]

    col_T, shared_T = last(col), last(_so_far(g_all) if g_all is not None else None)
    prec = _or(None if col_T is None else col_T[:, :, None, :],
               None if shared_T is None else shared_T[..., None],
               None if prec_rows is None else last(prec_rows)[..., None],
               None if prec_all is None else last(prec_all)[..., None],
               None if initial_state is None or objective.posterior != "diagonal" else _bad(initial_state["I"]))
    num = _or(prec, None if num_rows is None else last(num_rows)[..., None], state_bad)
    return cleaned, Poison(out, var, num, prec)


def _nan_where(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return x
    return torch.where(mask, torch.full_like(x, float("nan")), x)


def poison(objective: Objective, result: ScanResult, marks: Optional[Poison]) -> ScanResult:
    """``result`` with NaN where the recurrence of the original (non-finite) inputs is non-finite."""
    if marks is None:
        return result
    output = _nan_where(result.output, marks.out)
    variance = None if result.variance is None else _nan_where(result.variance, marks.var)
    final = result.final_state
    if final is not None:
        if objective.posterior == "point":
            final = {"S": _nan_where(final["S"], marks.num)}
        else:
            final = {"mu": _nan_where(final["mu"], marks.num), "I": _nan_where(final["I"], marks.prec)}
    return ScanResult(output, final, variance)
