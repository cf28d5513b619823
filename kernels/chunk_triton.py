"""The chunked path on Triton, forward and backward, for the GPU (``dot``; ``dot_diag`` with ``b`` head-shared
``[B,T,H]`` or grouped ``[B,T,H,G]``; scalar or no forgetting). See docs/gpu_kernels.md.

Gated linear attention ``S_t = exp(g_t) S_{t-1} + v_t ⊗ k_t``, ``o_t = scale · S_t q_t`` (one decay per head
and token) in chunks of ``C`` tokens, with ``G`` the log-decay cumulated inside a chunk and the masked decay
matrix ``D[t, s] = exp(G_t − G_s)`` (``s ≤ t``; the mask is applied before the exponential):

Forward. ``_chunk_states_kernel`` (grid key tile × value tile × sequence·head) walks the chunks and writes
the state at every chunk boundary, ``S ← exp(G_C) S + vᵀ (k ∘ exp(G_C − G))`` (the only thing saved besides
the inputs); ``_chunk_output_kernel`` (grid chunk × sequence·head × value tile) computes
``o = scale · [(q ∘ exp(G)) S_startᵀ + ((q kᵀ) ∘ D) v]``.

Backward. ``_chunk_dstates_kernel`` runs the state's cotangent backwards over the chunk boundaries;
``_chunk_bwd_dv_kernel`` and ``_chunk_bwd_dqk_kernel`` compute a chunk's ``dv`` and ``dq, dk`` and the
cumulated log-decay's cotangent from its start state, its end-state cotangent and its own tokens.

Groups. The query may be one per group of ``V/NG`` contiguous value rows (``[B,H,T,NG,K]``): a value tile
never straddles two groups. Palimpsa with ``b`` head-shared (docs/theory.md#limit-7-head-shared-importance) or grouped (limit 8) is this
read of the numerator ``M`` with the query ``q ⊘ I⁽ᵍ⁾_t``; the group precisions come from the torch
:class:`~metaplastic.kernels.chunk.DecayedScan` (width ``NG``). The kernels compute in float32 (``tl.dot``
uses TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set), in float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import triton
import triton.language as tl

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult

from .chunk import chunk_run
from .coverage import triton_chunk_reason
from .entry import ScanCall, prepare, triton_unavailable_reason

Tensor = torch.Tensor


@triton.jit
def _value_rows(i_vt, VG: tl.constexpr, BV: tl.constexpr, TPG: tl.constexpr):
    """Value tile ``i_vt`` of a head whose ``V`` rows form groups of ``VG`` rows, ``TPG`` tiles per group:
    its group, its rows ``o_v`` and their mask (a tile never straddles two groups)."""
    i_g = i_vt // TPG
    o_l = (i_vt % TPG) * BV + tl.arange(0, BV)
    return i_g, i_g * VG + o_l, o_l < VG


@triton.jit
def _decay_matrix(g, o_c):
    """``D[t, s] = exp(G_t − G_s)`` for ``s ≤ t``, else 0; the mask is applied before the exponential, so
    no value of a later token (however large or non-finite) reaches an earlier row."""
    causal = o_c[:, None] >= o_c[None, :]
    return tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf"))), causal


@triton.jit
def _chunk_states_kernel(k, v, G, h0, states, T, Tp, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``states[bh, n] = S`` at the start of chunk ``n`` (``n = N``: the final state), one ``[BV, BK]`` tile of
    it per program. Layouts: ``k [BH,T,K]``, ``v [BH,T,V]``, ``G [BH,Tp]`` (log-decay cumulated inside each
    chunk), ``h0 [BH,V,K]``, ``states [BH,N+1,V,K]``."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_kv = (o_v[:, None] < V) & (o_k[None, :] < K)
    p_vk = o_v[:, None] * K + o_k[None, :]
    S = tl.load(h0 + i_bh * V * K + p_vk, mask=m_kv, other=0.0).to(DTYPE)
    for n in range(N):
        tl.store(states + (i_bh * (N + 1) + n) * V * K + p_vk, S, mask=m_kv)
        t = n * C + o_c
        m_t = t < T
        kc = tl.load(k + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K),
                     other=0.0)
        vc = tl.load(v + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V),
                     other=0.0)
        g = tl.load(G + i_bh * Tp + n * C + o_c)
        g_last = tl.load(G + i_bh * Tp + n * C + C - 1)
        kd = kc * tl.exp(g_last - g)[:, None]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(vc), kd, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(states + (i_bh * (N + 1) + N) * V * K + p_vk, S, mask=m_kv)


@triton.jit
def _chunk_output_kernel(q, k, v, G, states, o, scale, T, Tp, N, NG, K: tl.constexpr, V: tl.constexpr,
                         VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``o [BH,T,V]`` of chunk ``program_id(0)`` from its start state and its own tokens (K in blocks of BK).
    ``q [BH,NG,T,K]``: one query per group of ``VG`` value rows (``NG = 1``: one per head)."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    g = tl.load(G + i_bh * Tp + i_n * C + o_c)
    A = tl.zeros([C, C], dtype=DTYPE)
    out = tl.zeros([C, BV], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        qc = tl.load(q + ((i_bh * NG + i_g) * T + t[:, None]) * K + o_k[None, :], mask=m_tk, other=0.0)
        kc = tl.load(k + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        S = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                    mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(qc, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        out += tl.dot(qc * tl.exp(g)[:, None], tl.trans(S), input_precision=PRECISION, out_dtype=DTYPE)
    D, causal = _decay_matrix(g, o_c)
    A = tl.where(causal, A * D, 0.0)
    vc = tl.load(v + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    out += tl.dot(A.to(vc.dtype), vc, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(o + i_bh * T * V + t[:, None] * V + o_v[None, :], out * scale, mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _chunk_dstates_kernel(q, do, G, dht, dstates, dh0, scale, T, Tp, N, NG, K: tl.constexpr, V: tl.constexpr,
                          VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """The inter-chunk recurrence of the state's cotangent, backwards: ``dstates[bh, n]`` is the gradient
    reaching the state at the *end* of chunk ``n``; before chunk ``n`` it becomes
    ``dS · exp(G_C) + scale · doᵀ (q ∘ exp(G))``; ``dh0`` is what reaches the initial state.
    ``dht [BH,V,K]`` (the final state's cotangent), ``dstates [BH,N,V,K]``, ``dh0 [BH,V,K]``."""
    i_k, i_vt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_c = tl.arange(0, C)
    m_vk = m_v[:, None] & m_k[None, :]
    p_vk = o_v[:, None] * K + o_k[None, :]
    dS = tl.load(dht + i_bh * V * K + p_vk, mask=m_vk, other=0.0).to(DTYPE)
    for i_r in range(N):
        n = N - 1 - i_r
        tl.store(dstates + (i_bh * N + n) * V * K + p_vk, dS, mask=m_vk)
        t = n * C + o_c
        m_t = t < T
        qc = tl.load(q + ((i_bh * NG + i_g) * T + t[:, None]) * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                     other=0.0)
        doc = tl.load(do + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                      other=0.0)
        g = tl.load(G + i_bh * Tp + n * C + o_c)
        g_last = tl.load(G + i_bh * Tp + n * C + C - 1)
        dS = dS * tl.exp(g_last) + scale * tl.dot(tl.trans(doc), qc * tl.exp(g)[:, None], input_precision=PRECISION,
                                                  out_dtype=DTYPE)
    tl.store(dh0 + i_bh * V * K + p_vk, dS, mask=m_vk)


@triton.jit
def _chunk_bwd_dv_kernel(q, k, do, G, dstates, dv, scale, T, Tp, N, NG, K: tl.constexpr, V: tl.constexpr,
                         VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``dv`` of one chunk and value tile: ``scale · (A ∘ D)ᵀ do + (k ∘ exp(G_C − G)) dS_endᵀ`` with the
    group's scores ``A = q kᵀ``."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    g = tl.load(G + i_bh * Tp + i_n * C + o_c)
    g_last = tl.load(G + i_bh * Tp + i_n * C + C - 1)
    A = tl.zeros([C, C], dtype=DTYPE)
    acc = tl.zeros([C, BV], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        qc = tl.load(q + ((i_bh * NG + i_g) * T + t[:, None]) * K + o_k[None, :], mask=m_tk, other=0.0)
        kc = tl.load(k + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                      mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(qc, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        acc += tl.dot(kc * tl.exp(g_last - g)[:, None], tl.trans(dSe), input_precision=PRECISION, out_dtype=DTYPE)
    D, causal = _decay_matrix(g, o_c)
    A = tl.where(causal, A * D, 0.0)
    doc = tl.load(do + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    acc += scale * tl.dot(tl.trans(A).to(doc.dtype), doc, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(dv + i_bh * T * V + t[:, None] * V + o_v[None, :], acc, mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _chunk_bwd_dqk_kernel(q, k, v, do, G, states, dstates, dq, dk, dG, scale, T, Tp, N, NG, K: tl.constexpr,
                          V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``dq [BH,NG,T,K]``, ``dk [BH,T,K]`` of one chunk and key tile, and this key tile's part of the
    cumulated log-decay's cotangent ``dG [NK,BH,Tp]`` (``Σ_g q⁽ᵍ⁾∘dq⁽ᵍ⁾ − k∘dk``, plus ``Σ dS_end ∘ S_end`` on the
    chunk's last row). Per group ``g``, over its value tiles: ``W = scale · (do vᵀ) ∘ D``,
    ``dq⁽ᵍ⁾ = W k + scale · (do S_start) ∘ exp(G)``, ``dk += Wᵀ q⁽ᵍ⁾ + (v dS_end) ∘ exp(G_C − G)``."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    m_tk = m_t[:, None] & m_k[None, :]
    g = tl.load(G + i_bh * Tp + i_n * C + o_c)
    g_last = tl.load(G + i_bh * Tp + i_n * C + C - 1)
    D, causal = _decay_matrix(g, o_c)
    kc = tl.load(k + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    dk_acc = tl.zeros([C, BK], dtype=DTYPE)
    dg_acc = tl.zeros([C], dtype=DTYPE)
    end_term = tl.zeros([BK], dtype=DTYPE)
    for i_g in range(NG):
        p_q = ((i_bh * NG + i_g) * T + t[:, None]) * K + o_k[None, :]
        qc = tl.load(q + p_q, mask=m_tk, other=0.0)
        dq_acc = tl.zeros([C, BK], dtype=DTYPE)
        for i_t in range(TPG):
            o_l = i_t * BV + tl.arange(0, BV)
            o_v = i_g * VG + o_l
            m_v = o_l < VG
            m_tv = m_t[:, None] & m_v[None, :]
            m_vk = m_v[:, None] & m_k[None, :]
            p_vk = o_v[:, None] * K + o_k[None, :]
            doc = tl.load(do + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            vc = tl.load(v + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
            S0 = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            S1 = tl.load(states + (i_bh * (N + 1) + i_n + 1) * V * K + p_vk, mask=m_vk, other=0.0)
            dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            W = scale * tl.dot(doc, tl.trans(vc), input_precision=PRECISION, out_dtype=DTYPE)
            W = tl.where(causal, W * D, 0.0).to(kc.dtype)
            dq_acc += tl.dot(W, kc, input_precision=PRECISION, out_dtype=DTYPE)
            dq_acc += scale * tl.dot(doc, S0, input_precision=PRECISION, out_dtype=DTYPE) * tl.exp(g)[:, None]
            dk_acc += tl.dot(tl.trans(W), qc, input_precision=PRECISION, out_dtype=DTYPE)
            dk_acc += tl.dot(vc, dSe, input_precision=PRECISION, out_dtype=DTYPE) * tl.exp(g_last - g)[:, None]
            end_term += tl.sum(dSe * S1, 0)
        tl.store(dq + p_q, dq_acc, mask=m_tk)
        dg_acc += tl.sum(qc * dq_acc, 1)
    dg_acc -= tl.sum(kc * dk_acc, 1)
    dg_acc += tl.where(o_c == C - 1, tl.sum(end_term, 0), 0.0)
    tl.store(dk + i_bh * T * K + t[:, None] * K + o_k[None, :], dk_acc, mask=m_tk)
    tl.store(dG + (i_k * tl.num_programs(2) + i_bh) * Tp + i_n * C + o_c, dg_acc)


# ----------------------------------------------------------------------------------------------- host side
def _kernel_chunk(C: int) -> int:
    """The kernels' chunk: a power of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, triton.next_power_of_2(C))


def _tile(n: int, block: Optional[int]) -> int:
    return block or max(16, min(64, triton.next_power_of_2(n)))


def _precision(x: Tensor) -> str:
    if x.dtype == torch.float64 or not x.is_cuda:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _triton_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def _grouped_layout(q: Tensor) -> Tensor:
    """``q [B,H,T,K]`` or ``[B,H,T,NG,K]`` -> ``[B,H,NG,T,K]`` contiguous."""
    return (q[:, :, None] if q.dim() == 4 else q.transpose(2, 3)).contiguous()


def _cumulated_decay(g: Tensor, C: int, dt: torch.dtype) -> Tensor:
    """``g [B,H,T,1]`` -> ``G [B,H,N·C]``: zero-padded, cumulated inside each chunk of ``C``."""
    B, H, T = g.shape[:3]
    N = triton.cdiv(T, C)
    gp = torch.zeros(B, H, N * C, dtype=dt, device=g.device)
    gp[:, :, :T] = g[..., 0]
    return gp.view(B, H, N, C).cumsum(-1).view(B, H, N * C).contiguous()


def chunk_dot_triton_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int,
                             block_k: Optional[int] = None, block_v: Optional[int] = None):
    """``q [B,H,T,K]`` (or one query per group of value rows, ``[B,H,T,NG,K]``), ``k [B,H,T,K]``,
    ``v [B,H,T,V]``, ``g [B,H,T,1]``, ``S0 [B,H,V,K]`` -> ``o [B,H,T,V]`` and the boundary states
    ``[B,H,N+1,V,K]``, in the compute dtype (float64 for float64 inputs, else float32). ``C``: a power of
    two ≥ 16; ``block_k``, ``block_v``: tile sizes (powers of two ≥ 16; default up to 64)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = _grouped_layout(q.to(dt))
    NG = qg.shape[2]
    if V % NG:
        raise ValueError(f"{NG} query groups do not divide V = {V}")
    VG = V // NG
    kf, vf = (x.to(dt).contiguous() for x in (k, v))
    G = _cumulated_decay(g, C, dt)
    states = torch.empty(B, H, N + 1, V, K, dtype=dt, device=q.device)
    out = torch.empty(B, H, T, V, dtype=dt, device=q.device)
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    BVG = min(BV, max(16, triton.next_power_of_2(VG)))
    TPG = triton.cdiv(VG, BVG)
    meta = dict(C=C, BK=BK, PRECISION=_precision(q), DTYPE=_triton_dtype(dt))
    _chunk_states_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        kf, vf, G, S0.to(dt).contiguous(), states, T, N * C, N, K=K, V=V, BV=BV, **meta)
    _chunk_output_kernel[(N, B * H, NG * TPG)](qg, kf, vf, G, states, out, float(scale), T, N * C, N, NG, K=K, V=V,
                                               VG=VG, TPG=TPG, BV=BVG, **meta)
    return out, states


def chunk_dot_triton_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, states: Tensor, do: Tensor,
                              dS_final: Optional[Tensor], scale: float, C: int, block_k: Optional[int] = None,
                              block_v: Optional[int] = None):
    """Cotangents ``(dq, dk, dv, dg, dS0)`` of :func:`chunk_dot_triton_forward` (same shapes as its inputs,
    compute dtype) from ``do [B,H,T,V]`` and the final state's ``dS_final [B,H,V,K]`` (None: zero), given the
    boundary ``states`` that the forward returned."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    Tp = N * C
    dt = states.dtype
    grouped = q.dim() == 5
    qg = _grouped_layout(q.to(dt))
    NG = qg.shape[2]
    VG = V // NG
    kf, vf, dof = (x.to(dt).contiguous() for x in (k, v, do))
    G = _cumulated_decay(g, C, dt)
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    BVG = min(BV, max(16, triton.next_power_of_2(VG)))
    TPG = triton.cdiv(VG, BVG)
    NK = triton.cdiv(K, BK)
    dev = q.device
    dht = torch.zeros(B, H, V, K, dtype=dt, device=dev) if dS_final is None else dS_final.to(dt).contiguous()
    dstates = torch.empty(B, H, N, V, K, dtype=dt, device=dev)
    dS0 = torch.empty(B, H, V, K, dtype=dt, device=dev)
    dq = torch.empty_like(qg)
    dk = torch.empty(B, H, T, K, dtype=dt, device=dev)
    dv = torch.empty(B, H, T, V, dtype=dt, device=dev)
    dG = torch.empty(NK, B * H, Tp, dtype=dt, device=dev)
    meta = dict(K=K, V=V, VG=VG, TPG=TPG, C=C, BK=BK, BV=BVG, PRECISION=_precision(q), DTYPE=_triton_dtype(dt))
    sc = float(scale)
    _chunk_dstates_kernel[(NK, NG * TPG, B * H)](qg, dof, G, dht, dstates, dS0, sc, T, Tp, N, NG, **meta)
    _chunk_bwd_dv_kernel[(N, B * H, NG * TPG)](qg, kf, dof, G, dstates, dv, sc, T, Tp, N, NG, **meta)
    _chunk_bwd_dqk_kernel[(NK, N, B * H)](qg, kf, vf, dof, G, states, dstates, dq, dk, dG, sc, T, Tp, N, NG, **meta)
    dG = dG.sum(0).view(B, H, N, C)
    dg = dG.flip(-1).cumsum(-1).flip(-1).reshape(B, H, Tp)[:, :, :T, None]
    dq = dq.transpose(2, 3) if grouped else dq[:, :, 0]
    return dq, dk, dv, dg, dS0


class TritonChunkDot(torch.autograd.Function):
    """:class:`~metaplastic.kernels.chunk.ChunkDot` on the Triton kernels, forward and backward:
    ``o_t = scale · S_t q_t`` with ``S_t = exp(g_t) S_{t-1} + v_t ⊗ k_t`` (one decay per head and token);
    returns ``(o, S_T)``. ``q [B,H,T,K]``, or ``[B,H,T,NG,K]``: value rows ``[i·V/NG, (i+1)·V/NG)`` are read
    with query ``i`` (grouped importance, docs/theory.md#limit-8-grouped-importance). Saves the inputs and the ``N + 1`` boundary
    states (``V·K/C`` numbers per token and head)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int):
        if g.shape[-1] != 1:
            raise ValueError("the chunked Triton kernel supports scalar (per-head) forgetting only, not vector")
        C = _kernel_chunk(C)
        o, states = chunk_dot_triton_forward(q, k, v, g, S0, scale, C)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.C, ctx.S0_dtype = scale, C, S0.dtype
        return o.to(q.dtype), states[:, :, -1].to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dS_final: Tensor):
        q, k, v, g, states = ctx.saved_tensors
        dq, dk, dv, dg, dS0 = chunk_dot_triton_backward(q, k, v, g, states, do, dS_final, ctx.scale, ctx.C)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dS0.to(ctx.S0_dtype), None, None


def chunk_triton_scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *,
                      log_decay: Optional[Tensor] = None, beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
                      prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
                      initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
                      output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
                      chunk_size: int = 64) -> ScanResult:
    """:func:`metaplastic.scan` by the chunked Triton forward (same arguments and result, plus ``chunk_size``,
    rounded up to a power of two ≥ 16). Raises ``ValueError`` naming the setting it does not cover."""
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens)
    return chunk_triton_run(call, chunk_size)


def chunk_triton_run(call: ScanCall, chunk_size: int = 64) -> ScanResult:
    """:func:`chunk_triton_scan` on a validated :class:`~metaplastic.kernels.entry.ScanCall`: the chunked router
    (:func:`~metaplastic.kernels.chunk.chunk_run`, which sanitises, floors and poisons) with
    :class:`TritonChunkDot` as its read (one query per importance group with grouped ``b``)."""
    reason = triton_chunk_reason(call.objective, call.b, call.initial_state, call.check_values, call.shape[-1])
    if reason is None:
        reason = triton_unavailable_reason(call.q.device)
    if reason is not None:
        raise ValueError(reason)
    return chunk_run(call, chunk_size, TritonChunkDot.apply)
