"""The chunked torch path for the ``dot`` and ``dot_diag`` likelihoods, with hand-written backwards.

The sequence is cut into chunks of ``C`` tokens. Only the states at chunk boundaries are kept; inside a
chunk the work is matrix products with the decay matrix ``D[t, s] = exp(G_t - G_s)`` (``s ≤ t``, ``G`` the
cumulative log-decay inside the chunk), so every exponent is ≤ 0 and nothing overflows. With vector
(per key channel) decay ``D`` is ``[C, C, K]`` and the chunk is capped at ``VECTOR_CHUNK``.

Two ``torch.autograd.Function``s, each with its own backward:

- :class:`ChunkDot`: the gated linear-attention read ``o_t = scale · S_t q_t`` of
  ``S_t = α_t ∘ S_{t-1} + v_t ⊗ k_t`` (α per head or per key channel). It saves the inputs and the
  chunk-boundary states and recomputes the rest in its backward; the log-decay gradient comes out of
  ``q ∘ dq − k ∘ dk`` plus the chunk-end state term, reverse-cumulated inside each chunk.
- :class:`~metaplastic.kernels.chunk_per_value.DiagonalScan` (defined there, importable here): Palimpsa with
  ``b`` per value row, a two-level scan (see its docstring).

The models (docs/theory.md#closed-forms), selected by the objective's settings:

- ``dot`` / point: ``S_t = α S_{t-1} + (β/Ip) v ⊗ k`` → one :class:`ChunkDot`.
- ``dot_diag`` / diagonal (Palimpsa, meta_mamba2, meta_gla): ``M_t = α M_{t-1} + β v ⊗ k`` and
  ``I_t − Ip = α (I_{t-1} − Ip) + b ⊗ k²``; ``o = scale · (M/I) q``.

  * ``b`` head-shared (``[B,T,H]``) or shared within G < V groups of value rows (``[B,T,H,G]``), and an
    initial precision constant within each group (and not requiring a gradient, which would be per row):
    the precision of group g is a K-vector (docs/theory.md#limit-8-grouped-importance; G = 1: limit 7), so the rows of group g read
    ``scale · M_t (q ⊘ I^{(g)}_t)``: :class:`~metaplastic.kernels.chunk_grouped.GroupedDiagonal`, G simple-GLA
    reads sharing keys, values, decays and ``M``. Cost as simple GLA plus the per-group ``[C, C]`` products.
    (The chunked Triton read forms the same group precisions and queries ``q ⊘ I^{(g)}_t`` on chip:
    :class:`~metaplastic.kernels.chunk_triton.TritonGroupedDiagonal`.)
  * ``b`` per value channel (``[B,T,H,V]``), or any other initial precision: ``Σ_j M_ij q_j / I_ij`` does
    not factor. :func:`metaplastic.kernels.chunk_per_value.per_value_scan`: on a CPU by default the fused C
    kernel of :mod:`metaplastic.kernels.cpu_per_value` where it builds, else :class:`DiagonalScan`, which
    materialises ``M_t, I_t`` one block of ``DIAGONAL_CHUNK`` tokens at a time, on a capped number of
    threads; with scalar decay also a batched-matrix-product form. ``O(T·V·K)`` work, ``O(C·V·K)`` memory.

Elementwise glue (``β v``, ``b k²``, ``q ⊘ I``, the variance) runs through autograd.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult, expand_groups

from . import nonfinite
from .chunk_grouped import grouped_diagonal
from .chunk_per_value import DIAGONAL_CHUNK, DiagonalScan, per_value_scan
from .chunking import (VECTOR_CHUNK, causal_mask, cumulated_log_decay, decay_matrix, exp_to, floor_log_decay,
                       floored_grad, heads_first, pad_chunks, reverse_cumsum, unchunk)
from .coverage import chunk_reason
from .entry import ScanCall, by_sequence, prepare, rows_constant_in_groups

Tensor = torch.Tensor
__all__ = ["ChunkDot", "DiagonalScan", "DIAGONAL_CHUNK", "VECTOR_CHUNK", "chunk_run", "chunk_scan",
           "unsupported_reason"]


# ----------------------------------------------------------------------------------------------- helpers
def unsupported_reason(objective: Objective) -> Optional[str]:
    """Why the chunked path cannot run ``objective`` (None when it can)."""
    return chunk_reason(objective)


# ------------------------------------------------------------------------------------------- ChunkDot
def _scores(qc: Tensor, kc: Tensor, D: Tensor) -> Tensor:
    """Intra-chunk ``A[t, s] = Σ_k q_tk k_sk exp(G_tk - G_sk)`` (masked), ``[..., C, C]``."""
    if D.dim() == qc.dim():  # scalar decay: D [..., C, C]
        A = (qc @ kc.transpose(-1, -2)) * D
    else:
        A = ((qc[..., :, None, :] * kc[..., None, :, :]) * D).sum(-1)
    C = A.shape[-1]
    return torch.where(causal_mask(C, A.device), A, torch.zeros((), dtype=A.dtype, device=A.device))


def chunk_dot_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float,
                      C: int) -> Tuple[Tensor, Tensor]:
    """Forward of :class:`ChunkDot` without autograd.

    ``q, k [B,H,T,K]``, ``v [B,H,T,V]``, ``g [B,H,T,Kg]`` (Kg = 1 or K), ``S0 [B,H,V,K]``.
    Returns ``o [B,H,T,V]`` and the boundary states ``[B,H,N+1,V,K]`` (the last is the final state).
    """
    T = q.shape[2]
    qc, kc, vc, gc = (pad_chunks(x, C) for x in (q, k, v, g))
    G = cumulated_log_decay(gc)  # [B,H,N,C,Kg], float64
    G_last = G[..., -1:, :]
    k_to_end = kc * exp_to(G_last - G, q.dtype)
    U = vc.transpose(-1, -2) @ k_to_end  # [B,H,N,V,K]: what a chunk writes, seen at its end
    chunk_decay = exp_to(G_last, q.dtype)  # [B,H,N,1,Kg]
    states = [S0]
    for n in range(qc.shape[2]):
        states.append(states[-1] * chunk_decay[:, :, n] + U[:, :, n])
    S_all = torch.stack(states, 2)
    D = decay_matrix(G, causal_mask(C, q.device), q.dtype)
    o = (qc * exp_to(G, q.dtype)) @ S_all[:, :, :-1].transpose(-1, -2) + _scores(qc, kc, D) @ vc
    return unchunk(o * scale, T), S_all


class ChunkDot(torch.autograd.Function):
    """``o_t = scale · S_t q_t`` with ``S_t = exp(g_t) ∘ S_{t-1} + v_t ⊗ k_t``; returns ``(o, S_T)``.

    Shapes as :func:`chunk_dot_forward`. Saved for the backward: the inputs and the ``N + 1`` boundary
    states (``V·K/C`` numbers per token and head).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int):
        C = C if g.shape[-1] == 1 else min(C, VECTOR_CHUNK)
        o, S_all = chunk_dot_forward(q, k, v, g, S0, scale, C)
        ctx.save_for_backward(q, k, v, g, S_all)
        ctx.scale, ctx.C = scale, C
        return o, S_all[:, :, -1]

    @staticmethod
    def backward(ctx, do: Tensor, dS_final: Tensor):
        q, k, v, g, S_all = ctx.saved_tensors
        scale, C = ctx.scale, ctx.C
        T = q.shape[2]
        qc, kc, vc, gc, doc = (pad_chunks(x, C) for x in (q, k, v, g, do))
        N = qc.shape[2]
        G = cumulated_log_decay(gc)
        eG = exp_to(G, q.dtype)
        G_last = G[..., -1:, :]
        to_end = exp_to(G_last - G, q.dtype)
        chunk_decay = exp_to(G_last, q.dtype)
        # Reverse pass over chunk boundaries: dS_end[n] is the gradient reaching chunk n's end state.
        read = scale * (doc.transpose(-1, -2) @ (qc * eG))  # [B,H,N,V,K]: what chunk n reads of its start
        dS = dS_final
        ends = [None] * N
        for n in reversed(range(N)):
            ends[n] = dS
            dS = dS * chunk_decay[:, :, n] + read[:, :, n]
        dS0 = dS
        dS_end = torch.stack(ends, 2)
        starts = S_all[:, :, :-1]
        # Inside the chunks.
        D = decay_matrix(G, causal_mask(C, q.device), q.dtype)
        dA = (scale * (doc @ vc.transpose(-1, -2))).tril()  # [B,H,N,C,C] = d(o_t)/d(A_ts) summed over V
        if D.dim() == qc.dim():
            W = dA * D
            dq = W @ kc
            dk = W.transpose(-1, -2) @ qc
        else:
            W = dA[..., None] * D  # [B,H,N,C,C,K]
            dq = (W * kc[..., None, :, :]).sum(-2)
            dk = (W * qc[..., :, None, :]).sum(-3)
        dq = dq + scale * (doc @ starts) * eG
        dk = dk + (vc @ dS_end) * to_end
        dv = scale * (_scores(qc, kc, D).transpose(-1, -2) @ doc) + (kc * to_end) @ dS_end.transpose(-1, -2)
        # Log-decay: G_t scales q_t (e^{G_t}) and k_t (e^{-G_t}); the chunk's last G also scales its end state.
        dG = qc * dq - kc * dk
        dG[..., -1, :] += (dS_end * S_all[:, :, 1:]).sum(-2)
        if g.shape[-1] == 1:
            dG = dG.sum(-1, keepdim=True)
        dg = floored_grad(reverse_cumsum(dG, -2), gc)
        return (unchunk(dq, T), unchunk(dk, T), unchunk(dv, T), unchunk(dg, T), dS0, None, None)


# ------------------------------------------------------------------------------------------ the models
def grouped_applies(groups: int, V: int, I0: Tensor, check_values: Optional[bool] = None) -> bool:
    """Whether the grouped path (:mod:`.chunk_grouped`) runs ``groups`` importance groups: fewer groups than
    value rows (``G = V`` is the per-value path), and an initial precision ``I0 [B,H,V,K]`` constant within
    each group that needs no gradient (the grouped path has no per-row gradient of ``I0``)."""
    if not (groups == 1 or groups < V):
        return False
    if torch.is_grad_enabled() and I0.requires_grad:
        return False
    return rows_constant_in_groups(I0, groups, check_values)


NATIVE_MAX_KV = 64 * 64  # K·V up to which grouped b runs on the fused CPU kernel


def native_beats_grouped(K: int, V: int, *xs: Tensor) -> bool:
    """Whether grouped or head-shared ``b`` (fewer groups than value rows) runs on the fused CPU kernel, ``b``
    repeated over each group's rows, rather than on the grouped path: on CPU tensors where the kernel
    builds, for ``K·V ≤ NATIVE_MAX_KV``. The kernel's cost does not depend on G; at K = V = 64 it is faster
    than the grouped path at every G (docs/kernels.md). Above that size the grouped path keeps the saved
    state under 2 KB per token and head, where the kernel's checkpoints take ``2·V·K·4 / NATIVE_CHUNK``
    bytes."""
    from .cpu_per_value import native_reason
    return K * V <= NATIVE_MAX_KV and native_reason(*xs) is None


def _chunk_dense(objective: Objective, q, k, v, log_decay, beta, b, Ip: Tensor, scale: float,
                 initial_state: Optional[Dict[str, Tensor]], output_variance: bool, dtype: torch.dtype,
                 C: int, dot: Optional[Callable] = None, check_values: Optional[bool] = None) -> ScanResult:
    """One batch of equal-length sequences with finite inputs (a log-decay of ``-inf`` allowed). Returns
    output ``[B,T,H,V]`` (dtype), final state, variance. ``dot`` is the gated linear-attention primitive
    (:class:`ChunkDot`, or the Triton one, which reads q, k, v in place and also takes one query per group
    ``[B,H,T,G,K]``; its ``grouped_diagonal``, where present, is the fused head-shared / grouped read)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    torch_read = dot is None
    dot = ChunkDot.apply if dot is None else dot
    # [B,H,T,D]; the Triton reads take q, k, v in their own dtype and strides (no copies)
    in_place = not torch_read
    qh, kh, vh = (x.transpose(1, 2) if in_place else heads_first(x, dtype) for x in (q, k, v))
    g = heads_first(log_decay, dtype)
    # [B,H,T,Kg]; a log-decay at or below the floor is exactly a reset (α = 0) for every primitive below,
    # the Triton one included (-inf would give -inf - -inf = NaN inside a chunk)
    g = qh.new_zeros(B, H, T, 1, dtype=dtype) if g is None else floor_log_decay(g)
    beta_h = heads_first(beta, dtype)  # [B,H,T,1|V]
    Ip4 = Ip.view(1, H, 1, 1)
    init = None if initial_state is None else {key: x.to(dtype) for key, x in initial_state.items()}

    if objective.posterior == "point":
        write = 1 / Ip4 if beta_h is None else beta_h / Ip4
        S0 = qh.new_zeros(B, H, V, K, dtype=dtype) if init is None else init["S"]
        if in_place and write.shape[-1] == 1:  # the Triton read scales v's rows by β/Ip as it loads them
            o, S_T = dot(qh, kh, vh, g, S0, scale, C, write.expand(B, H, T, 1))
        else:
            o, S_T = dot(qh, kh, vh * write, g, S0, scale, C)
        return ScanResult(o.transpose(1, 2), {"S": S_T}, None)

    # dot_diag / diagonal
    if init is None:
        I0, M0 = Ip4.expand(B, H, V, K), qh.new_zeros(B, H, V, K, dtype=dtype)
    else:
        I0, M0 = init["I"], init["I"] * init["mu"]
    groups = 1 if (b is None or b.dim() == 3) else b.shape[-1]
    native = torch_read and groups < V and native_beats_grouped(K, V, qh, kh, vh)
    if torch_read and not native and grouped_applies(groups, V, I0, check_values):
        # docs/theory.md#limit-8-grouped-importance (G = 1: limit 7): G simple-GLA reads sharing keys, values, decays and M (chunk_grouped.py)
        b_h = qh.new_zeros(B, H, T, 1) if b is None else heads_first(b, dtype)
        J0 = I0[:, :, ::V // groups] - Ip4
        o, var, M_T, J_T = grouped_diagonal(qh, kh, vh, beta_h, b_h, g, M0, J0, Ip, scale, C, output_variance)
        I_T = (J_T + Ip4).repeat_interleave(V // groups, dim=2)
        return ScanResult(o.transpose(1, 2), {"mu": M_T / I_T, "I": I_T},
                          None if var is None else var.transpose(1, 2))
    fused = None if torch_read else getattr(dot, "grouped_diagonal", None)
    # docs/theory.md#limit-8-grouped-importance on the Triton read: I_0 constant over the rows of each group and no
    # per-row gradient of I_0; without an initial state I_0 = Ip, whose gradient reaches Ip through J_0 = I_0 − Ip.
    if fused is not None and not (init is not None and torch.is_grad_enabled() and I0.requires_grad) \
            and rows_constant_in_groups(I0, groups, check_values):
        # the group precisions and reads q ⊘ I⁽ᵍ⁾ formed on chip (chunk_triton.py)
        R = V // groups
        b_h = qh.new_zeros(B, H, T, 1, dtype=dtype) if b is None else heads_first(b, dtype)
        J0 = (I0 - Ip4)[:, :, ::R]
        if beta_h is None or beta_h.shape[-1] == 1:  # β per token: the kernels scale v's rows as they load them
            o, var, M_T, J_T = fused(qh, kh, vh, g, b_h, Ip.to(dtype), M0, J0, scale, C, output_variance, beta_h)
        else:
            o, var, M_T, J_T = fused(qh, kh, beta_h * vh, g, b_h, Ip.to(dtype), M0, J0, scale, C, output_variance)
        I_T = (J_T + Ip4).repeat_interleave(R, 2)  # [B,H,V,K]
        var = None if var is None else var.repeat_interleave(R, -1).transpose(1, 2)
        return ScanResult(o.transpose(1, 2), {"mu": M_T / I_T, "I": I_T}, var)
    if in_place:
        qh, kh, vh = (heads_first(x, dtype) for x in (q, k, v))
    bv = vh if beta_h is None else beta_h * vh

    # b per value row (or an initial precision that varies within a group): materialise M_t and I_t,
    # one chunk of at most DIAGONAL_CHUNK tokens at a time.
    b_h = qh.new_zeros(B, H, T, 1) if b is None else heads_first(expand_groups(b, V), dtype)
    Ip5 = Ip.view(1, H, 1, 1, 1)
    o, var, M_T, J_T = per_value_scan(qh, kh, bv, b_h, g, M0, I0 - Ip4, Ip5, scale, C, output_variance)
    I_T = J_T + Ip4
    return ScanResult(o.transpose(1, 2), {"mu": M_T / I_T, "I": I_T}, var.transpose(1, 2) if output_variance else None)


def chunk_scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *, log_decay: Optional[Tensor] = None,
               beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
               prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
               initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
               output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
               chunk_size: int = 64) -> ScanResult:
    """The chunked path: same arguments and result as :func:`metaplastic.scan` (``[B,T,H,D]`` layout), plus
    ``chunk_size``. Covers likelihood ``dot`` (point posterior) and ``dot_diag`` (diagonal posterior);
    anything else raises ``ValueError``. Computes in float64 if any of q, k, v is float64, else float32.
    ``cu_seqlens`` is handled one sequence at a time.
    """
    reason = unsupported_reason(objective)
    if reason is not None:
        raise ValueError(reason)
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens)
    return chunk_run(call, chunk_size)


def chunk_run(call: ScanCall, chunk_size: int = 64, dot: Optional[Callable] = None) -> ScanResult:
    """:func:`chunk_scan` on a validated :class:`~metaplastic.kernels.entry.ScanCall`: the one chunked router
    of the torch (``chunk``) and Triton (``triton_chunk``) backends. ``dot`` is the gated linear-attention
    primitive (:class:`ChunkDot` by default; the Triton one for ``triton_chunk``). Per sequence: non-finite
    inputs sanitised (:func:`~metaplastic.kernels.nonfinite.sanitize`), log-decays floored
    (:func:`~metaplastic.kernels.chunking.floor_log_decay`), the chunked work, then the outputs that the
    recurrence makes non-finite poisoned (:func:`~metaplastic.kernels.nonfinite.poison`)."""
    reason = unsupported_reason(call.objective)
    if reason is not None:
        raise ValueError(reason)
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    C = min(chunk_size, call.shape[1]) if call.bounds is None else chunk_size

    def dense(c: ScanCall) -> ScanResult:
        # non-finite entries: zeroed before the chunked products, their reach marked NaN after (causal)
        inputs, marks = nonfinite.sanitize(c.objective, c.q, c.k, c.v, c.log_decay, c.beta, c.b, c.initial_state)
        q, k, v, log_decay, beta, b, init = inputs
        res = _chunk_dense(c.objective, q, k, v, log_decay, beta, b, c.prior_precision, c.scale, init,
                           c.output_variance, c.dtype, C, dot, c.check_values)
        return nonfinite.poison(c.objective, res, marks)
    return by_sequence(call, dense)
