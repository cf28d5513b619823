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

Inputs are read in place, in their own dtype and strides (``[B,T,H,D]`` tensors transposed to ``[B,H,T,D]``),
and cast in registers; each kernel cumulates ``G`` from the per-token log-decay itself. The output and
``dq, dk, dv`` are stored in q's, k's, v's dtypes (rounded once from the compute dtype). A per-token write
rate ``w`` (the point posterior's ``β/Ip``, Palimpsa's ``β``) scales ``v``'s rows as they are loaded; the
backward returns ``dw``. The query may be one per group of ``V/NG`` contiguous value rows
(``[B,H,T,NG,K]``): a value tile never straddles two groups. Launch settings depend on the device's compute
capability (:func:`launch_table`).

Grouped importance, fused. Palimpsa with ``b`` head-shared (docs/theory.md#limit-7-head-shared-importance)
or grouped (limit 8) reads the numerator ``M`` on the rows of group ``g`` with the query ``r = q ⊘ I⁽ᵍ⁾_t``:
:class:`TritonGroupedDiagonal` keeps the group precisions at the chunk boundaries (``_chunk_states_kernel``
with values ``b`` and keys ``k²``) and forms ``J⁽ᵍ⁾``, ``r`` and their cotangents per chunk on chip
(``_grouped_*`` kernels); no ``[B,H,T,NG,K]`` tensor is written. The kernels compute in float32 (``tl.dot``
uses TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set), in float64 for float64 inputs.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

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
def _rounded(x, ptr):
    """``x`` (float32; float64 through float32 for bfloat16) rounded once to ``ptr``'s element type. To
    bfloat16 by its bits, round to nearest even (a NaN stays a NaN): what ``Tensor.to(torch.bfloat16)`` and
    the GPU's conversion give, and the same under the interpreter, whose own conversion truncates."""
    if ptr.dtype.element_ty == tl.bfloat16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _load_tile(x, base, s_t, t, m_t, o_d, m_d, DTYPE: tl.constexpr):
    """The ``[C, BD]`` tile (rows ``t``, columns ``o_d``) of a ``[T, D]`` slice at ``x + base`` with row stride
    ``s_t`` and contiguous columns, loaded in its own dtype and cast to ``DTYPE`` in registers."""
    return tl.load(x + base + t[:, None] * s_t + o_d[None, :], mask=m_t[:, None] & m_d[None, :],
                   other=0.0).to(DTYPE)


@triton.jit
def _load_written(v, base, s_t, t, m_t, o_v, m_v, w, w_base, s_wt, SCALED: tl.constexpr, DTYPE: tl.constexpr):
    """The value tile, its rows scaled by the per-token write ``w`` (at ``w + w_base``, row stride ``s_wt``)
    when ``SCALED``: the write ``(β/Ip) v`` of the point posterior formed on load."""
    vc = _load_tile(v, base, s_t, t, m_t, o_v, m_v, DTYPE)
    if SCALED:
        vc = vc * tl.load(w + w_base + t * s_wt, mask=m_t, other=0.0).to(DTYPE)[:, None]
    return vc


@triton.jit
def _chunk_log_decay(g, base, s_t, n, T, C: tl.constexpr, DTYPE: tl.constexpr):
    """Chunk ``n``'s cumulated log-decay ``G [C]`` (zero past ``T``) and its total ``G_C``, from the
    per-token log-decay at ``g + base`` (row stride ``s_t``)."""
    t = n * C + tl.arange(0, C)
    x = tl.load(g + base + t * s_t, mask=t < T, other=0.0).to(DTYPE)
    return tl.cumsum(x, 0), tl.sum(x, 0)


@triton.jit
def _decay_matrix(g, o_c):
    """``D[t, s] = exp(G_t − G_s)`` for ``s ≤ t``, else 0; the mask is applied before the exponential, so
    no value of a later token (however large or non-finite) reaches an earlier row."""
    causal = o_c[:, None] >= o_c[None, :]
    return tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf"))), causal


@triton.jit
def _chunk_states_kernel(k, s_kb, s_kh, s_kt, v, s_vb, s_vh, s_vt, w, s_wb, s_wh, s_wt, g, s_gb, s_gh, s_gt, h0,
                         states, T, H, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, SQUARE: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
                         DTYPE: tl.constexpr):
    """``states[bh, n] = S`` at the start of chunk ``n`` (``n = N``: the final state), one ``[BV, BK]`` tile of
    it per program. ``k [B,H,T,K]``, ``v [B,H,T,V]``, ``g [B,H,T]`` (per-token log-decay) by their strides
    (``s_·b, s_·h, s_·t``; the last dimension contiguous), ``h0 [BH,V,K]``, ``states [BH,N+1,V,K]``.
    ``SQUARE``: the written key is ``k²`` (the group precisions, ``v := b``); ``SCALED``: the written value is
    ``w ∘ v`` with ``w [B,H,T]`` per token."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_c = tl.arange(0, C)
    # the tile is held transposed, [BK, BV] (the product's rows are the key columns: a narrow value tile, as
    # the group precisions' few rows, still makes a Hopper wgmma, whose tiles have 64 rows)
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] + o_v[None, :] * K
    S = tl.load(h0 + i_bh * V * K + p_kv, mask=m_kv, other=0.0).to(DTYPE)
    for n in range(N):
        tl.store(states + (i_bh * (N + 1) + n) * V * K + p_kv, S, mask=m_kv)
        t = n * C + o_c
        m_t = t < T
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        vc = _load_written(v, i_b * s_vb + i_h * s_vh, s_vt, t, m_t, o_v, m_v, w, i_b * s_wb + i_h * s_wh, s_wt,
                           SCALED, DTYPE)
        G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, n, T, C, DTYPE)
        if SQUARE:
            kc = kc * kc
        kd = kc * tl.exp(g_last - G)[:, None]
        S = S * tl.exp(g_last) + tl.dot(tl.trans(kd), vc, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(states + (i_bh * (N + 1) + N) * V * K + p_kv, S, mask=m_kv)


@triton.jit
def _chunk_output_kernel(q, s_qb, s_qh, s_qt, s_qg, k, s_kb, s_kh, s_kt, v, s_vb, s_vh, s_vt, w, s_wb, s_wh, s_wt,
                         g, s_gb, s_gh, s_gt, states, o, s_ob, s_oh, s_ot, scale, T, H, N, K: tl.constexpr,
                         V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         BV: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``o [B,H,T,V]`` of chunk ``program_id(0)`` from its start state and its own tokens (K in blocks of BK).
    ``q [B,H,T,NG,K]`` (group stride ``s_qg``; 0 with one query per head): one query per group of ``VG``
    value rows. ``SCALED``: the values are ``w ∘ v`` (``w [B,H,T]``)."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, i_n, T, C, DTYPE)
    A = tl.zeros([C, C], dtype=DTYPE)
    out = tl.zeros([C, BV], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qc = _load_tile(q, i_b * s_qb + i_h * s_qh + i_g * s_qg, s_qt, t, m_t, o_k, m_k, DTYPE)
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        S = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                    mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(qc, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        out += tl.dot(qc * tl.exp(G)[:, None], tl.trans(S), input_precision=PRECISION, out_dtype=DTYPE)
    D, causal = _decay_matrix(G, o_c)
    A = tl.where(causal, A * D, 0.0)
    vc = _load_written(v, i_b * s_vb + i_h * s_vh, s_vt, t, m_t, o_v, m_v, w, i_b * s_wb + i_h * s_wh, s_wt, SCALED,
                       DTYPE)
    out += tl.dot(A, vc, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(o + i_b * s_ob + i_h * s_oh + t[:, None] * s_ot + o_v[None, :], _rounded(out * scale, o),
             mask=m_t[:, None] & m_v[None, :])


# ----------------------------------------------------------------------------------------------- backward
@triton.jit
def _chunk_dstates_kernel(q, s_qb, s_qh, s_qt, s_qg, do, s_db, s_dh, s_dt, g, s_gb, s_gh, s_gt, dht, dstates, dh0,
                          scale, T, H, N, K: tl.constexpr, V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
                          DTYPE: tl.constexpr):
    """The inter-chunk recurrence of the state's cotangent, backwards: ``dstates[bh, n]`` is the gradient
    reaching the state at the *end* of chunk ``n``; before chunk ``n`` it becomes
    ``dS · exp(G_C) + scale · doᵀ (q ∘ exp(G))``; ``dh0`` is what reaches the initial state.
    ``dht [BH,V,K]`` (the final state's cotangent), ``dstates [BH,N,V,K]``, ``dh0 [BH,V,K]``."""
    i_k, i_vt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
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
        qc = _load_tile(q, i_b * s_qb + i_h * s_qh + i_g * s_qg, s_qt, t, m_t, o_k, m_k, DTYPE)
        doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
        G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, n, T, C, DTYPE)
        dS = dS * tl.exp(g_last) + scale * tl.dot(tl.trans(doc), qc * tl.exp(G)[:, None], input_precision=PRECISION,
                                                  out_dtype=DTYPE)
    tl.store(dh0 + i_bh * V * K + p_vk, dS, mask=m_vk)


@triton.jit
def _chunk_bwd_dv_kernel(q, s_qb, s_qh, s_qt, s_qg, k, s_kb, s_kh, s_kt, do, s_db, s_dh, s_dt, g, s_gb, s_gh, s_gt,
                         dstates, dv, s_vb, s_vh, s_vt, v, s_xb, s_xh, s_xt, w, s_wb, s_wh, s_wt, dw, s_ei, s_eb,
                         s_eh, s_et, scale, T, H, N, K: tl.constexpr, V: tl.constexpr, VG: tl.constexpr,
                         TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         SCALED: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``dv`` of one chunk and value tile: ``scale · (A ∘ D)ᵀ do + (k ∘ exp(G_C − G)) dS_endᵀ`` with the
    group's scores ``A = q kᵀ``. ``SCALED`` (the values were ``w ∘ v``): that cotangent ``dv'`` gives
    ``dv = w ∘ dv'`` and this value tile's part of ``dw = Σ_v dv' ∘ v`` (``dw [NVT,B,H,T]``)."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, i_n, T, C, DTYPE)
    A = tl.zeros([C, C], dtype=DTYPE)
    acc = tl.zeros([C, BV], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qc = _load_tile(q, i_b * s_qb + i_h * s_qh + i_g * s_qg, s_qt, t, m_t, o_k, m_k, DTYPE)
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                      mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(qc, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        acc += tl.dot(kc * tl.exp(g_last - G)[:, None], tl.trans(dSe), input_precision=PRECISION, out_dtype=DTYPE)
    D, causal = _decay_matrix(G, o_c)
    A = tl.where(causal, A * D, 0.0)
    doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
    acc += scale * tl.dot(tl.trans(A), doc, input_precision=PRECISION, out_dtype=DTYPE)
    if SCALED:
        vc = _load_tile(v, i_b * s_xb + i_h * s_xh, s_xt, t, m_t, o_v, m_v, DTYPE)
        tl.store(dw + i_vt * s_ei + i_b * s_eb + i_h * s_eh + t * s_et, tl.sum(acc * vc, 1), mask=m_t)
        acc *= tl.load(w + i_b * s_wb + i_h * s_wh + t * s_wt, mask=m_t, other=0.0).to(DTYPE)[:, None]
    tl.store(dv + i_b * s_vb + i_h * s_vh + t[:, None] * s_vt + o_v[None, :], _rounded(acc, dv),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _chunk_bwd_dqk_kernel(q, s_qb, s_qh, s_qt, s_qg, k, s_kb, s_kh, s_kt, v, s_vb, s_vh, s_vt, w, s_wb, s_wh, s_wt,
                          do, s_db, s_dh, s_dt, g, s_gb, s_gh, s_gt, states, dstates, dq, s_dqb, s_dqh, s_dqt, s_dqg,
                          dk, s_dkb, s_dkh, s_dkt, dg, s_dgi, s_dgb, s_dgh, s_dgt, scale, T, H, N, NG,
                          K: tl.constexpr, V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr,
                          DTYPE: tl.constexpr):
    """``dq [B,H,T,NG,K]``, ``dk [B,H,T,K]`` of one chunk and key tile, and this key tile's part of the
    log-decay's cotangent ``dg [NK,B,H,T]``. Per group ``g``, its value tiles accumulate
    ``W = scale · (do vᵀ) ∘ D`` (``[C, C]``), ``scale · (do ∘ exp(G)) S_start`` into ``dq⁽ᵍ⁾`` and
    ``(v ∘ exp(G_C − G)) dS_end`` into the inter-chunk ``dk_S``; then ``dq⁽ᵍ⁾ += W k``, ``dk += Wᵀ q⁽ᵍ⁾``.
    The cumulated log-decay's cotangent ``Σ_g q⁽ᵍ⁾∘dq⁽ᵍ⁾ − k∘dk`` plus, on the chunk's last row,
    ``Σ dS_end ∘ S_end = exp(G_C) Σ dS_end ∘ S_start + Σ k ∘ dk_S`` (no read of the end state), is
    reverse-cumulated inside the chunk. ``SCALED``: the values are ``w ∘ v`` (``w [B,H,T]``)."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, i_n, T, C, DTYPE)
    e_start, e_end = tl.exp(G), tl.exp(g_last - G)
    dk_S = tl.zeros([C, BK], dtype=DTYPE)
    dk_W = tl.zeros([C, BK], dtype=DTYPE)
    dg_acc = tl.zeros([C], dtype=DTYPE)
    end_S = tl.zeros([BK], dtype=DTYPE)
    for i_g in range(NG):
        W = tl.zeros([C, C], dtype=DTYPE)
        dq_acc = tl.zeros([C, BK], dtype=DTYPE)
        for i_t in range(TPG):
            o_l = i_t * BV + tl.arange(0, BV)
            o_v = i_g * VG + o_l
            m_v = o_l < VG
            m_vk = m_v[:, None] & m_k[None, :]
            p_vk = o_v[:, None] * K + o_k[None, :]
            doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
            vc = _load_written(v, i_b * s_vb + i_h * s_vh, s_vt, t, m_t, o_v, m_v, w, i_b * s_wb + i_h * s_wh, s_wt,
                               SCALED, DTYPE)
            S0 = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            W += tl.dot(doc, tl.trans(vc), input_precision=PRECISION, out_dtype=DTYPE)
            dq_acc += tl.dot(doc * e_start[:, None], S0, input_precision=PRECISION, out_dtype=DTYPE)
            dk_S += tl.dot(vc * e_end[:, None], dSe, input_precision=PRECISION, out_dtype=DTYPE)
            end_S += tl.sum(dSe * S0, 0)
        D, causal = _decay_matrix(G, o_c)
        W = tl.where(causal, W * D, 0.0) * scale
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        dq_acc = dq_acc * scale + tl.dot(W, kc, input_precision=PRECISION, out_dtype=DTYPE)
        qc = _load_tile(q, i_b * s_qb + i_h * s_qh + i_g * s_qg, s_qt, t, m_t, o_k, m_k, DTYPE)
        dk_W += tl.dot(tl.trans(W), qc, input_precision=PRECISION, out_dtype=DTYPE)
        tl.store(dq + i_b * s_dqb + i_h * s_dqh + i_g * s_dqg + t[:, None] * s_dqt + o_k[None, :],
                 _rounded(dq_acc, dq), mask=m_t[:, None] & m_k[None, :])
        dg_acc += tl.sum(qc * dq_acc, 1)
    kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
    dk_acc = dk_W + dk_S
    dg_acc -= tl.sum(kc * dk_acc, 1)
    end_term = tl.exp(g_last) * tl.sum(end_S, 0) + tl.sum(tl.sum(kc * dk_S, 1), 0)
    dg_acc += tl.where(o_c == C - 1, end_term, 0.0)
    tl.store(dk + i_b * s_dkb + i_h * s_dkh + t[:, None] * s_dkt + o_k[None, :], _rounded(dk_acc, dk),
             mask=m_t[:, None] & m_k[None, :])
    tl.store(dg + i_k * s_dgi + i_b * s_dgb + i_h * s_dgh + t * s_dgt, tl.cumsum(dg_acc, 0, reverse=True), mask=m_t)


# ------------------------------------------------------------------------------ grouped importance, fused
@triton.jit
def _group_read(q, q_base, s_qt, kc, b, b_base, s_bt, i_g, Js, j_base, ip, t, m_t, o_k, m_k, e_start, Dm,
                PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """Group ``i_g``'s precision and read on one chunk and key tile, on chip: ``x = b⁽ᵍ⁾ ∘ k²``,
    ``J = exp(G) ∘ J_start + (D x)`` (``Dm`` the masked decay matrix), ``I = Ip + J``, ``r = q ⊘ I``.
    Returns ``(q, b⁽ᵍ⁾, x, J, I, r)``."""
    qc = _load_tile(q, q_base, s_qt, t, m_t, o_k, m_k, DTYPE)
    bg = tl.load(b + b_base + t * s_bt + i_g, mask=m_t, other=0.0).to(DTYPE)
    js = tl.load(Js + j_base + o_k, mask=m_k, other=0.0)
    x = bg[:, None] * kc * kc
    J = e_start[:, None] * js[None, :] + tl.dot(Dm, x, input_precision=PRECISION, out_dtype=DTYPE)
    I = ip + J
    return qc, bg, x, J, I, qc / I


@triton.jit
def _grouped_output_kernel(q, s_qb, s_qh, s_qt, k, s_kb, s_kh, s_kt, v, s_vb, s_vh, s_vt, w, s_wb, s_wh, s_wt,
                           g, s_gb, s_gh, s_gt, b, s_bb, s_bh, s_bt, Ip, states, Js, o, s_ob, s_oh, s_ot, var, s_rb,
                           s_rh, s_rt, scale, T, H, N, NG, K: tl.constexpr, V: tl.constexpr, VG: tl.constexpr,
                           TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           SCALED: tl.constexpr, VAR: tl.constexpr,
                           PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """``o [B,H,T,V]`` of chunk ``program_id(0)`` and one value tile of group ``g``: the read of ``M`` with
    the group's query ``r = q ⊘ I⁽ᵍ⁾`` formed per key tile from the group's precision at the chunk start
    (``Js [BH,N+1,NG,K]``); ``VAR``: also ``var⁽ᵍ⁾ = scale² Σ_k q r`` (``var [B,H,T,NG]``, by the group's first
    value tile). ``SCALED``: the written values are ``w ∘ v`` (``w [B,H,T]``: ``β`` per token)."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, i_n, T, C, DTYPE)
    e_start = tl.exp(G)
    Dm, causal = _decay_matrix(G, o_c)
    ip = tl.load(Ip + i_h).to(DTYPE)
    A = tl.zeros([C, C], dtype=DTYPE)
    out = tl.zeros([C, BV], dtype=DTYPE)
    qr = tl.zeros([C], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        qc, bg, x, J, I, r = _group_read(q, i_b * s_qb + i_h * s_qh, s_qt, kc, b, i_b * s_bb + i_h * s_bh, s_bt, i_g,
                                         Js, ((i_bh * (N + 1) + i_n) * NG + i_g) * K, ip, t, m_t, o_k, m_k, e_start,
                                         Dm, PRECISION, DTYPE)
        S = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                    mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(r, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        out += tl.dot(r * e_start[:, None], tl.trans(S), input_precision=PRECISION, out_dtype=DTYPE)
        if VAR:
            qr += tl.sum(qc * r, 1)
    A = tl.where(causal, A * Dm, 0.0)
    vc = _load_written(v, i_b * s_vb + i_h * s_vh, s_vt, t, m_t, o_v, m_v, w, i_b * s_wb + i_h * s_wh, s_wt, SCALED,
                       DTYPE)
    out += tl.dot(A, vc, input_precision=PRECISION, out_dtype=DTYPE)
    tl.store(o + i_b * s_ob + i_h * s_oh + t[:, None] * s_ot + o_v[None, :], _rounded(out * scale, o),
             mask=m_t[:, None] & m_v[None, :])
    if VAR:
        if i_vt % TPG == 0:
            tl.store(var + i_b * s_rb + i_h * s_rh + t * s_rt + i_g, qr * scale * scale, mask=m_t)


@triton.jit
def _grouped_dstates_kernel(q, s_qb, s_qh, s_qt, k, s_kb, s_kh, s_kt, do, s_db, s_dh, s_dt, g, s_gb, s_gh, s_gt,
                            b, s_bb, s_bh, s_bt, Ip, Js, dht, dstates, dh0, scale, T, H, N, NG, K: tl.constexpr,
                            V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """:func:`_chunk_dstates_kernel` with the group's query ``r = q ⊘ I⁽ᵍ⁾`` formed on chip."""
    i_k, i_vt, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_c = tl.arange(0, C)
    m_vk = m_v[:, None] & m_k[None, :]
    p_vk = o_v[:, None] * K + o_k[None, :]
    ip = tl.load(Ip + i_h).to(DTYPE)
    dS = tl.load(dht + i_bh * V * K + p_vk, mask=m_vk, other=0.0).to(DTYPE)
    for i_r in range(N):
        n = N - 1 - i_r
        tl.store(dstates + (i_bh * N + n) * V * K + p_vk, dS, mask=m_vk)
        t = n * C + o_c
        m_t = t < T
        G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, n, T, C, DTYPE)
        e_start = tl.exp(G)
        Dm, causal = _decay_matrix(G, o_c)
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        qc, bg, x, J, I, r = _group_read(q, i_b * s_qb + i_h * s_qh, s_qt, kc, b, i_b * s_bb + i_h * s_bh, s_bt, i_g,
                                         Js, ((i_bh * (N + 1) + n) * NG + i_g) * K, ip, t, m_t, o_k, m_k, e_start,
                                         Dm, PRECISION, DTYPE)
        doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
        dS = dS * tl.exp(g_last) + scale * tl.dot(tl.trans(doc), r * e_start[:, None], input_precision=PRECISION,
                                                  out_dtype=DTYPE)
    tl.store(dh0 + i_bh * V * K + p_vk, dS, mask=m_vk)


@triton.jit
def _grouped_dv_kernel(q, s_qb, s_qh, s_qt, k, s_kb, s_kh, s_kt, do, s_db, s_dh, s_dt, g, s_gb, s_gh, s_gt,
                       b, s_bb, s_bh, s_bt, Ip, Js, dstates, dv, s_vb, s_vh, s_vt, v, s_xb, s_xh, s_xt,
                       w, s_wb, s_wh, s_wt, dw, s_ei, s_eb, s_eh, s_et, scale, T, H, N, NG, K: tl.constexpr,
                       V: tl.constexpr, VG: tl.constexpr, TPG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                       BV: tl.constexpr, SCALED: tl.constexpr, PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """:func:`_chunk_bwd_dv_kernel` (``SCALED`` included) with the group's query ``r = q ⊘ I⁽ᵍ⁾`` formed on
    chip."""
    i_n, i_bh, i_vt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_g, o_v, m_v = _value_rows(i_vt, VG, BV, TPG)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, i_n, T, C, DTYPE)
    e_start = tl.exp(G)
    Dm, causal = _decay_matrix(G, o_c)
    ip = tl.load(Ip + i_h).to(DTYPE)
    A = tl.zeros([C, C], dtype=DTYPE)
    acc = tl.zeros([C, BV], dtype=DTYPE)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        qc, bg, x, J, I, r = _group_read(q, i_b * s_qb + i_h * s_qh, s_qt, kc, b, i_b * s_bb + i_h * s_bh, s_bt, i_g,
                                         Js, ((i_bh * (N + 1) + i_n) * NG + i_g) * K, ip, t, m_t, o_k, m_k, e_start,
                                         Dm, PRECISION, DTYPE)
        dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                      mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(r, tl.trans(kc), input_precision=PRECISION, out_dtype=DTYPE)
        acc += tl.dot(kc * tl.exp(g_last - G)[:, None], tl.trans(dSe), input_precision=PRECISION, out_dtype=DTYPE)
    A = tl.where(causal, A * Dm, 0.0)
    doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
    acc += scale * tl.dot(tl.trans(A), doc, input_precision=PRECISION, out_dtype=DTYPE)
    if SCALED:
        vc = _load_tile(v, i_b * s_xb + i_h * s_xh, s_xt, t, m_t, o_v, m_v, DTYPE)
        tl.store(dw + i_vt * s_ei + i_b * s_eb + i_h * s_eh + t * s_et, tl.sum(acc * vc, 1), mask=m_t)
        acc *= tl.load(w + i_b * s_wb + i_h * s_wh + t * s_wt, mask=m_t, other=0.0).to(DTYPE)[:, None]
    tl.store(dv + i_b * s_vb + i_h * s_vh + t[:, None] * s_vt + o_v[None, :], _rounded(acc, dv),
             mask=m_t[:, None] & m_v[None, :])


@triton.jit
def _decayed_sum(a1, x1, a2, x2):
    """The combine of ``S_t = a_t S_{t-1} + x_t`` as a scan over pairs ``(a, x)``: ``(a1 a2, x1 a2 + x2)``."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _group_precision(q_raw, kc, b, b_base, s_bt, i_g, Js, j_base, ip, t, m_t, o_k, m_k, e_start, a_in,
                     DTYPE: tl.constexpr):
    """Group ``i_g``'s precision and query on one chunk and key tile: ``x = b⁽ᵍ⁾ ∘ k²``,
    ``J = exp(G) ∘ J_start + D x`` (the decayed sum as a scan, ``a_in`` the tokens' decays), ``I = Ip + J``,
    ``r = q ⊘ I``. Returns ``(q, b⁽ᵍ⁾, x, J, I, r)``."""
    qc = q_raw.to(DTYPE)
    bg = tl.load(b + b_base + t * s_bt + i_g, mask=m_t, other=0.0).to(DTYPE)
    js = tl.load(Js + j_base + o_k, mask=m_k, other=0.0)
    x = bg[:, None] * kc * kc
    J = e_start[:, None] * js[None, :] + tl.associative_scan((a_in, x), 0, _decayed_sum)[1]
    I = ip + J
    return qc, bg, x, J, I, qc / I


@triton.jit
def _grouped_dqk_kernel(q, s_qb, s_qh, s_qt, k, s_kb, s_kh, s_kt, v, s_vb, s_vh, s_vt, w, s_ub, s_uh, s_ut,
                        do, s_db, s_dh, s_dt,
                        g, s_gb, s_gh, s_gt, b, s_bb, s_bh, s_bt, Ip, states, Js, dstates, dvar, s_wb, s_wh, s_wt,
                        dq, s_dqb, s_dqh, s_dqt, dk, s_dkb, s_dkh, s_dkt, db, s_bi, s_bbb, s_bbh, s_bbt,
                        dg, s_dgi, s_dgb, s_dgh, s_dgt, dJs, dIp, scale, T, H, N, NG, K: tl.constexpr,
                        V: tl.constexpr, VG: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        VAR: tl.constexpr, SCALED: tl.constexpr, PRECISION_FIRST: tl.constexpr,
                        PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """One chunk and key tile of the grouped backward, every group in turn: the groups' sums of ``dq``, ``dk``
    and of the log-decay's cotangent are carried in registers, and ``dq`` is written once, in the query's
    dtype. Per group ``g``: the read of ``M`` with query ``r⁽ᵍ⁾`` as :func:`_chunk_bwd_dqk_kernel` over the
    group's value rows gives ``dr⁽ᵍ⁾`` (plus ``scale² dvar⁽ᵍ⁾ q`` with ``VAR``) and its part of ``dk`` and of
    the log-decay's cotangent; then ``dq += dr ⊘ I (+ scale² dvar r)``, ``dI = −dr ∘ r ⊘ I``, and the
    precision chain inside the chunk: ``dX = Dᵀ dI`` (the cotangent of the write ``x = b k²`` from this
    chunk's tokens), ``db⁽ᵍ⁾ = Σ_k dX ∘ k²``, ``dk += 2 b⁽ᵍ⁾ k ∘ dX``, the cumulated log-decay's
    ``Σ_k dI ∘ J − x ∘ dX``. The decayed sums ``D x`` (in ``J``) and ``Dᵀ dI`` are scans along the chunk,
    ``J_t = α_t J_{t−1} + x_t`` forwards and ``dX_t = α_{t+1} dX_{t+1} + dI_t`` backwards (``α_t`` the token's
    decay), which keeps two ``[C, C]`` operands out of registers. Writes per chunk
    ``dJs[bh, n, g] = Σ_t exp(G_t) dI_t`` (what reaches the group precision at the chunk start) and ``dIp[g]``
    partials ``Σ dI``; what reaches the chunk's end from later chunks is added by :func:`_grouped_dJ_kernel`.
    ``dk`` (compute dtype), ``db [NK,B,H,T,NG]`` and ``dg [NK,B,H,T]`` are per key tile (the log-decay's
    already reverse-cumulated inside the chunk). ``SCALED``: the written values are ``w ∘ v``
    (``w [B,H,T]``). ``PRECISION_FIRST`` (a schedule, the same values): form each group's precision and query
    before its read rather than after (fewer live registers with wgmma, more with mma.sync)."""
    i_k, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    m_tk = m_t[:, None] & m_k[None, :]
    p_g = g + i_b * s_gb + i_h * s_gh + t * s_gt
    lg = tl.load(p_g, mask=m_t, other=0.0).to(DTYPE)
    G, g_last = tl.cumsum(lg, 0), tl.sum(lg, 0)
    a_in = tl.broadcast_to(tl.exp(lg)[:, None], [C, BK])  # α_t
    lg_next = tl.where(o_c < C - 1, tl.gather(lg, tl.minimum(o_c + 1, C - 1), 0), 0.0)  # the next token's
    a_out = tl.broadcast_to(tl.exp(lg_next)[:, None], [C, BK])  # α_{t+1} (not used on the chunk's last row)
    ip = tl.load(Ip + i_h).to(DTYPE)
    kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
    q_raw = tl.load(q + i_b * s_qb + i_h * s_qh + t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
    if SCALED:  # the per-token write, loaded once
        wt = tl.load(w + i_b * s_ub + i_h * s_uh + t * s_ut, mask=m_t, other=0.0).to(DTYPE)
    dq_acc = tl.zeros([C, BK], dtype=DTYPE)
    dk_acc = tl.zeros([C, BK], dtype=DTYPE)
    dg_acc = tl.zeros([C], dtype=DTYPE)
    end_S = tl.sum(tl.zeros([C], dtype=DTYPE), 0)  # Σ dS_end ∘ S_start over every group's rows
    for i_g in tl.range(0, NG, num_stages=1):
        j_base = ((i_bh * (N + 1) + i_n) * NG + i_g) * K
        if PRECISION_FIRST:
            qc, bg, x, J, I, r = _group_precision(q_raw, kc, b, i_b * s_bb + i_h * s_bh, s_bt, i_g, Js, j_base, ip,
                                                  t, m_t, o_k, m_k, tl.exp(G), a_in, DTYPE)
        W = tl.zeros([C, C], dtype=DTYPE)
        dr = tl.zeros([C, BK], dtype=DTYPE)
        # the group's value tiles; the trip count (VG / BV rounded up) is formed from NG at run time so that
        # one tile per group stays a loop: unrolled, its loads are scheduled across the whole group and the
        # kernel spills
        for i_t in range(tl.cdiv(V // NG, BV)):
            o_l = i_t * BV + tl.arange(0, BV)
            o_v = i_g * VG + o_l
            m_v = o_l < VG
            m_vk = m_v[:, None] & m_k[None, :]
            p_vk = o_v[:, None] * K + o_k[None, :]
            doc = _load_tile(do, i_b * s_db + i_h * s_dh, s_dt, t, m_t, o_v, m_v, DTYPE)
            vc = _load_tile(v, i_b * s_vb + i_h * s_vh, s_vt, t, m_t, o_v, m_v, DTYPE)
            if SCALED:
                vc = vc * wt[:, None]
            S0 = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            dSe = tl.load(dstates + (i_bh * N + i_n) * V * K + p_vk, mask=m_vk, other=0.0)
            W += tl.dot(doc, tl.trans(vc), input_precision=PRECISION, out_dtype=DTYPE)
            dr += tl.dot(doc * tl.exp(G)[:, None], S0, input_precision=PRECISION, out_dtype=DTYPE)
            dk_S = tl.dot(vc * tl.exp(g_last - G)[:, None], dSe, input_precision=PRECISION, out_dtype=DTYPE)
            dk_acc += dk_S
            kdk = tl.sum(kc * dk_S, 1)
            dg_acc += tl.where(o_c == C - 1, tl.sum(kdk, 0), 0.0) - kdk
            end_S += tl.sum(tl.sum(dSe * S0, 0), 0)
        Dm, causal = _decay_matrix(G, o_c)
        W = tl.where(causal, W * Dm, 0.0) * scale
        dr = dr * scale + tl.dot(W, kc, input_precision=PRECISION, out_dtype=DTYPE)
        if not PRECISION_FIRST:
            qc, bg, x, J, I, r = _group_precision(q_raw, kc, b, i_b * s_bb + i_h * s_bh, s_bt, i_g, Js, j_base, ip,
                                                  t, m_t, o_k, m_k, tl.exp(G), a_in, DTYPE)
        dk_W = tl.dot(tl.trans(W), r, input_precision=PRECISION, out_dtype=DTYPE)
        dk_acc += dk_W
        dg_acc += tl.sum(r * dr - kc * dk_W, 1)
        if VAR:
            dvg = scale * scale * tl.load(dvar + i_b * s_wb + i_h * s_wh + t * s_wt + i_g, mask=m_t,
                                          other=0.0).to(DTYPE)
            dr += dvg[:, None] * qc
            dq_acc += dvg[:, None] * r
        dq_acc += dr / I
        dI = -dr * r / I
        dX = tl.associative_scan((a_out, dI), 0, _decayed_sum, reverse=True)[1]
        tl.store(db + i_k * s_bi + i_b * s_bbb + i_h * s_bbh + t * s_bbt + i_g, tl.sum(dX * kc * kc, 1), mask=m_t)
        dk_acc += 2.0 * bg[:, None] * kc * dX
        dg_acc += tl.sum(dI * J - x * dX, 1)
        tl.store(dJs + ((i_bh * N + i_n) * NG + i_g) * K + o_k, tl.sum(dI * tl.exp(G)[:, None], 0), mask=m_k)
        tl.store(dIp + ((i_g * tl.num_programs(0) + i_k) * tl.num_programs(2) + i_bh) * N + i_n,
                 tl.sum(tl.sum(dI, 0), 0))
    dg_acc += tl.where(o_c == C - 1, tl.exp(g_last) * end_S, 0.0)
    tl.store(dq + i_b * s_dqb + i_h * s_dqh + t[:, None] * s_dqt + o_k[None, :], _rounded(dq_acc, dq), mask=m_tk)
    tl.store(dk + i_b * s_dkb + i_h * s_dkh + t[:, None] * s_dkt + o_k[None, :], dk_acc, mask=m_tk)
    tl.store(dg + i_k * s_dgi + i_b * s_dgb + i_h * s_dgh + t * s_dgt, tl.cumsum(dg_acc, 0, reverse=True), mask=m_t)


@triton.jit
def _grouped_dJ_kernel(k, s_kb, s_kh, s_kt, g, s_gb, s_gh, s_gt, b, s_bb, s_bh, s_bt, Js, dJs, dJT, dJ0,
                       dk, dk_out, s_dkb, s_dkh, s_dkt, db, s_bi, s_bbb, s_bbh, s_bbt, dg, s_dgi, s_dgb, s_dgh, s_dgt,
                       T, H, N, NG, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BG: tl.constexpr,
                       PRECISION: tl.constexpr, DTYPE: tl.constexpr):
    """The group precisions' cotangent across chunks, backwards, one key tile of every group per program:
    ``dJ`` (``[NG, BK]``) reaching chunk ``n``'s end adds, for its tokens, ``dX = exp(G_C − G) dJ``:
    ``db⁽ᵍ⁾ += Σ_k dX ∘ k²``, ``dk += 2 Σ_g b⁽ᵍ⁾ k ∘ dX``, the cumulated log-decay ``−Σ x ∘ dX`` (plus
    ``Σ dJ ∘ J_end`` on the chunk's last row, reverse-cumulated); then ``dJ ← exp(G_C) dJ + dJs[n]`` reaches
    the chunk's start. Seeded with the final precision's cotangent ``dJT [BH,NG,K]``; ``dJ0`` is what
    reaches the initial one. Adds into the ``db``, ``dg`` that :func:`_grouped_dqk_kernel` wrote, and writes
    the ``dk`` it wrote plus its own part to ``dk_out`` (the key's dtype, the same strides; may be ``dk``)."""
    i_k, i_bh = tl.program_id(0), tl.program_id(1)
    i_bh = i_bh.to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_g = tl.arange(0, BG)
    m_g = o_g < NG
    o_c = tl.arange(0, C)
    m_gk = m_g[:, None] & m_k[None, :]
    p_gk = o_g[:, None] * K + o_k[None, :]
    dJ = tl.load(dJT + i_bh * NG * K + p_gk, mask=m_gk, other=0.0).to(DTYPE)
    for i_r in range(N):
        n = N - 1 - i_r
        t = n * C + o_c
        m_t = t < T
        G, g_last = _chunk_log_decay(g, i_b * s_gb + i_h * s_gh, s_gt, n, T, C, DTYPE)
        e_end = tl.exp(g_last - G)
        kc = _load_tile(k, i_b * s_kb + i_h * s_kh, s_kt, t, m_t, o_k, m_k, DTYPE)
        bt = _load_tile(b, i_b * s_bb + i_h * s_bh, s_bt, t, m_t, o_g, m_g, DTYPE)
        Je = tl.load(Js + (i_bh * (N + 1) + n + 1) * NG * K + p_gk, mask=m_gk, other=0.0)
        P = tl.dot(kc * kc, tl.trans(dJ), input_precision=PRECISION, out_dtype=DTYPE) * e_end[:, None]  # [C, BG]
        Q = tl.dot(bt, dJ, input_precision=PRECISION, out_dtype=DTYPE)  # [C, BK]
        m_tg = m_t[:, None] & m_g[None, :]
        p_db = db + i_k * s_bi + i_b * s_bbb + i_h * s_bbh + t[:, None] * s_bbt + o_g[None, :]
        tl.store(p_db, tl.load(p_db, mask=m_tg, other=0.0) + P, mask=m_tg)
        m_tk = m_t[:, None] & m_k[None, :]
        p_dk = dk + i_b * s_dkb + i_h * s_dkh + t[:, None] * s_dkt + o_k[None, :]
        p_dko = dk_out + i_b * s_dkb + i_h * s_dkh + t[:, None] * s_dkt + o_k[None, :]
        dk_t = tl.load(p_dk, mask=m_tk, other=0.0) + 2.0 * kc * Q * e_end[:, None]
        tl.store(p_dko, _rounded(dk_t, dk_out), mask=m_tk)
        dgc = tl.where(o_c == C - 1, tl.sum(tl.sum(dJ * Je, 1), 0), 0.0) - tl.sum(bt * P, 1)
        p_dg = dg + i_k * s_dgi + i_b * s_dgb + i_h * s_dgh + t * s_dgt
        tl.store(p_dg, tl.load(p_dg, mask=m_t, other=0.0) + tl.cumsum(dgc, 0, reverse=True), mask=m_t)
        dJ = dJ * tl.exp(g_last) + tl.load(dJs + (i_bh * N + n) * NG * K + p_gk, mask=m_gk, other=0.0)
    tl.store(dJ0 + i_bh * NG * K + p_gk, dJ, mask=m_gk)


# ----------------------------------------------------------------------------------------------- host side
# Launch settings per kernel: warps, pipeline stages and, where given, the key tile BK (at most the default
# 64) and the value tile BV (up to V) that replace the defaults; "_wide": for 4- and 8-byte inputs (twice the
# registers per tile); "dqk_grouped": the point dq, dk kernel with one query per group; "grouped_dqk": the
# fused grouped dq, dk kernel with b head-shared (one group), "grouped_dqk_groups" with several
# (PRECISION_FIRST: its schedule, see _grouped_dqk_kernel). Chosen at the
# benchmark's shapes (C = 64, K = V = 128) from `metaplastic bench compile` at sm_90a and sm_80 (registers,
# spills, shared memory) and `metaplastic bench traffic` (a smaller key tile re-reads do and v).
LAUNCH = {
    "states": dict(num_warps=8, num_stages=2),
    "output": dict(num_warps=8, num_stages=2),
    "dstates": dict(num_warps=8, num_stages=2),
    "dv": dict(num_warps=8, num_stages=2),
    "dqk": dict(num_warps=8, num_stages=2, BV=32),
    "dqk_grouped": dict(num_warps=8, num_stages=1, BK=32),
    "grouped_output": dict(num_warps=8, num_stages=2, BK=32, BV=128),
    "grouped_output_wide": dict(num_warps=8, num_stages=2, BK=16, BV=128),
    "grouped_dstates": dict(num_warps=8, num_stages=2, BK=32),
    "grouped_dstates_wide": dict(num_warps=8, num_stages=2, BK=16),
    "grouped_dv": dict(num_warps=8, num_stages=2, BK=32, BV=128),
    "grouped_dv_wide": dict(num_warps=8, num_stages=2, BK=16, BV=128),
    "grouped_dqk": dict(num_warps=8, num_stages=2, BK=32, BV=32),
    "grouped_dqk_wide": dict(num_warps=8, num_stages=2, BK=16),
    "grouped_dqk_groups": dict(num_warps=8, num_stages=1, BK=32, BV=32, PRECISION_FIRST=True),
    "grouped_dJ": dict(num_warps=4, num_stages=2),
}
# What differs below compute capability 9 (Ampere: mma.sync, whose accumulators stay in registers; no wgmma).
LAUNCH_SM80 = {
    "grouped_dqk": dict(num_warps=8, num_stages=2, BK=16, BV=32),
    "grouped_dqk_groups": dict(num_warps=8, num_stages=1, BK=16, BV=32, PRECISION_FIRST=False),
    "grouped_dqk_groups_wide": dict(num_warps=8, num_stages=1, BK=16, BV=16, PRECISION_FIRST=False),
}


def device_capability(x: Tensor) -> Optional[Tuple[int, int]]:
    """The compute capability of the CUDA device holding ``x``; None off CUDA (the interpreter)."""
    return torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None


def launch_table(x: Tensor) -> Dict[str, Dict]:
    """The launch settings for the device holding ``x``: :data:`LAUNCH`, with :data:`LAUNCH_SM80` over it
    below compute capability 9."""
    cap = device_capability(x)
    return LAUNCH if cap is None or cap >= (9, 0) else {**LAUNCH, **LAUNCH_SM80}


def _kernel_chunk(C: int) -> int:
    """The kernels' chunk: a power of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, triton.next_power_of_2(C))


def _tile(n: int, block: Optional[int]) -> int:
    return block or max(16, min(64, triton.next_power_of_2(n)))


def _precision(x: Tensor, dt: torch.dtype) -> str:
    if dt == torch.float64 or not x.is_cuda:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _triton_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: what the kernels compute in and write."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _rows_last(x: Tensor) -> Tensor:
    """``x`` itself when its last dimension is contiguous (any other strides are passed to the kernels),
    else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _strides(x: Tensor):
    """``(x, s_b, s_h, s_t)`` of a ``[B,H,T,...]`` tensor (a ``[B,H,T,1]`` log-decay included)."""
    return (x,) + tuple(x.stride()[:3])


def _written(w: Optional[Tensor], other: Tensor):
    """``(w, s_b, s_h, s_t)`` of a per-token write ``w [B,H,T,1]`` (any strides, an expanded one included), or
    a placeholder (``other``, zero strides) without one."""
    return _strides(w) if w is not None else (other, 0, 0, 0)


def _query(q: Tensor):
    """``(q, s_b, s_h, s_t, s_g)`` of ``q [B,H,T,K]`` (``s_g = 0``) or ``[B,H,T,NG,K]``, and ``NG``."""
    q = _rows_last(q)
    if q.dim() == 4:
        return (q,) + tuple(q.stride()[:3]) + (0,), 1
    return (q,) + tuple(q.stride()[:4]), q.shape[3]


def _groups(V: int, NG: int, BV: int):
    if V % NG:
        raise ValueError(f"{NG} query groups do not divide V = {V}")
    VG = V // NG
    BVG = min(BV, max(16, triton.next_power_of_2(VG)))
    return VG, BVG, triton.cdiv(VG, BVG)


def _launch(table: Dict[str, Dict], name: str, K: int, V: int, NG: int, BK: int, BV: int, wide: bool = False):
    """``table[name]``'s warps and stages (``table[name + "_wide"]`` for 4- and 8-byte inputs, where it is
    given), its key tile (``BK`` or the smaller one it names) and its value tiling
    ``(rows per group, tile, tiles per group)``."""
    opts = dict(table.get(name + "_wide", table[name]) if wide else table[name])
    BKx = min(BK, opts.pop("BK", BK))
    BVx = opts.pop("BV", BV)
    return opts, BKx, _groups(V, NG, max(16, min(BVx, triton.next_power_of_2(V))))


def chunk_dot_triton_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int,
                             block_k: Optional[int] = None, block_v: Optional[int] = None,
                             w: Optional[Tensor] = None):
    """``q [B,H,T,K]`` (or one query per group of value rows, ``[B,H,T,NG,K]``), ``k [B,H,T,K]``,
    ``v [B,H,T,V]``, ``g [B,H,T,1]``, ``S0 [B,H,V,K]`` -> ``o [B,H,T,V]`` in q's dtype (accumulated in the
    compute dtype, :func:`compute_dtype`, and rounded once on store) and the boundary states ``[B,H,N+1,V,K]``
    in the compute dtype. The inputs are read in place in their
    own dtype and strides (e.g. ``[B,T,H,D]`` tensors transposed to ``[B,H,T,D]``; only the last dimension
    must be contiguous, else it is copied). ``C``: a power of two ≥ 16; ``block_k``, ``block_v``: tile sizes
    (powers of two ≥ 16; default up to 64). ``w [B,H,T,1]`` (any strides): the written values are ``w ∘ v``,
    scaled in the kernels as they load ``v`` (the point posterior's ``β/Ip``)."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    dt = compute_dtype(q, k, v)
    table = launch_table(q)
    qa, NG = _query(q)
    k, v = _rows_last(k), _rows_last(v)
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    VG, BVG, TPG = _groups(V, NG, BV)
    states = torch.empty(B, H, N + 1, V, K, dtype=dt, device=q.device)
    out = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    meta = dict(K=K, V=V, C=C, BK=BK, PRECISION=_precision(q, dt), DTYPE=_triton_dtype(dt))
    ws = _written(w, g)
    meta["SCALED"] = w is not None
    _chunk_states_kernel[(triton.cdiv(K, BK), triton.cdiv(V, BV), B * H)](
        *_strides(k), *_strides(v), *ws, *_strides(g), S0.to(dt).contiguous(), states, T, H, N, BV=BV, SQUARE=False,
        **meta, **table["states"])
    _chunk_output_kernel[(N, B * H, NG * TPG)](
        *qa, *_strides(k), *_strides(v), *ws, *_strides(g), states, out, out.stride(0), out.stride(2),
        out.stride(1), float(scale), T, H, N, VG=VG, TPG=TPG, BV=BVG, **meta, **table["output"])
    return out.transpose(1, 2), states


def chunk_dot_triton_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, states: Tensor, do: Tensor,
                              dS_final: Optional[Tensor], scale: float, C: int, block_k: Optional[int] = None,
                              block_v: Optional[int] = None, w: Optional[Tensor] = None):
    """Cotangents ``(dq, dk, dv, dg, dS0)`` of :func:`chunk_dot_triton_forward` (same shapes as its inputs;
    dq, dk, dv in q's, k's, v's dtype, accumulated in the compute dtype and rounded once on store; dg, dS0 in
    the compute dtype) from ``do [B,H,T,V]`` (any dtype and strides, like the inputs) and the final state's
    ``dS_final [B,H,V,K]`` (None: zero), given the boundary ``states`` that the forward returned. With the
    forward's per-token write ``w``, also ``dw [B,H,T,1]`` (compute dtype) after ``dS0``."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    dt = states.dtype
    table = launch_table(q)
    qa, NG = _query(q)
    k, v, do = (_rows_last(x) for x in (k, v, do))
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    VG, BVG, TPG = _groups(V, NG, BV)
    NK = triton.cdiv(K, BK)
    dev = q.device
    dht = torch.zeros(B, H, V, K, dtype=dt, device=dev) if dS_final is None else dS_final.to(dt).contiguous()
    dstates = torch.empty(B, H, N, V, K, dtype=dt, device=dev)
    dS0 = torch.empty(B, H, V, K, dtype=dt, device=dev)
    dq = torch.empty(B, T, H, NG, K, dtype=q.dtype, device=dev)
    dk = torch.empty(B, T, H, K, dtype=k.dtype, device=dev)
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    meta = dict(K=K, V=V, VG=VG, TPG=TPG, C=C, BK=BK, BV=BVG, PRECISION=_precision(q, dt), DTYPE=_triton_dtype(dt))
    sc = float(scale)
    gs, dos, ws = _strides(g), _strides(do), _written(w, g)
    _chunk_dstates_kernel[(NK, NG * TPG, B * H)](*qa, *dos, *gs, dht, dstates, dS0, sc, T, H, N, **meta,
                                                 **table["dstates"])
    scaled = w is not None
    dW = torch.empty(NG * TPG, B, T, H, dtype=dt, device=dev) if scaled else dv
    _chunk_bwd_dv_kernel[(N, B * H, NG * TPG)](
        *qa, *_strides(k), *dos, *gs, dstates, dv, dv.stride(0), dv.stride(2), dv.stride(1), *_strides(v), *ws, dW,
        *((dW.stride(0), dW.stride(1), dW.stride(3), dW.stride(2)) if scaled else (0, 0, 0, 0)), sc, T, H, N,
        SCALED=scaled, **meta, **table["dv"])
    opts, BKq, (VG, BVG, TPG) = _launch(table, "dqk" if NG == 1 else "dqk_grouped", K, V, NG, BK, BV)
    NK = triton.cdiv(K, BKq)
    dG = torch.empty(NK, B, T, H, dtype=dt, device=dev)
    meta.update(VG=VG, TPG=TPG, BV=BVG, BK=BKq)
    _chunk_bwd_dqk_kernel[(NK, N, B * H)](
        *qa, *_strides(k), *_strides(v), *ws, *dos, *gs, states, dstates, dq, dq.stride(0), dq.stride(2),
        dq.stride(1), dq.stride(3), dk, dk.stride(0), dk.stride(2), dk.stride(1), dG, dG.stride(0), dG.stride(1),
        dG.stride(3), dG.stride(2), sc, T, H, N, NG, SCALED=scaled, **meta, **opts)
    dg = (dG[0] if NK == 1 else dG.sum(0)).transpose(1, 2)[..., None]
    dq = dq.transpose(1, 2)
    grads = (dq if q.dim() == 5 else dq[:, :, :, 0]), dk.transpose(1, 2), dv.transpose(1, 2), dg, dS0
    if scaled:
        grads += ((dW[0] if dW.shape[0] == 1 else dW.sum(0)).transpose(1, 2)[..., None],)
    return grads


class TritonChunkDot(torch.autograd.Function):
    """:class:`~metaplastic.kernels.chunk.ChunkDot` on the Triton kernels, forward and backward:
    ``o_t = scale · S_t q_t`` with ``S_t = exp(g_t) S_{t-1} + v_t ⊗ k_t`` (one decay per head and token);
    returns ``o`` in q's dtype and ``S_T`` in the compute dtype (float64 if any of q, k, v is, else float32);
    the gradients of q, k, v come in their dtypes, each accumulated in the compute dtype and rounded once.
    ``q [B,H,T,K]``, or ``[B,H,T,NG,K]``: value rows ``[i·V/NG, (i+1)·V/NG)`` are read with query ``i``
    (grouped importance, docs/theory.md#limit-8-grouped-importance). q, k, v are read in their own dtype and
    strides. ``w [B,H,T,1]``
    (optional, with one query per head): the written values are ``w ∘ v`` (the point posterior's ``β/Ip``),
    formed in the kernels; its gradient is returned too. Saves the inputs and the ``N + 1`` boundary states
    (``V·K/C`` numbers per token and head)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int,
                w: Optional[Tensor] = None):
        if g.shape[-1] != 1:
            raise ValueError("the chunked Triton kernel supports scalar (per-head) forgetting only, not vector")
        if w is not None and (q.dim() != 4 or w.shape != k.shape[:3] + (1,)):
            raise ValueError(f"the per-token write must be [B,H,T,1] with one query per head, got {tuple(w.shape)}")
        C = _kernel_chunk(C)
        o, states = chunk_dot_triton_forward(q, k, v, g, S0, scale, C, w=w)
        ctx.save_for_backward(q, k, v, g, states, w)
        ctx.scale, ctx.C, ctx.S0_dtype = scale, C, S0.dtype
        return o, states[:, :, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dS_final: Tensor):
        q, k, v, g, states, w = ctx.saved_tensors
        grads = chunk_dot_triton_backward(q, k, v, g, states, do, dS_final, ctx.scale, ctx.C, w=w)
        dq, dk, dv, dg, dS0 = grads[:5]
        dw = grads[5].to(w.dtype) if w is not None else None
        return dq, dk, dv, dg.to(g.dtype), dS0.to(ctx.S0_dtype), None, None, dw


def grouped_diagonal_triton_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, Ip: Tensor, M0: Tensor,
                                    J0: Tensor, scale: float, C: int, variance: bool,
                                    block_k: Optional[int] = None, block_v: Optional[int] = None,
                                    w: Optional[Tensor] = None):
    """Palimpsa with ``b`` head-shared or grouped, fused: ``q, k [B,H,T,K]``, ``v [B,H,T,V]`` (the write
    ``β v``), ``g [B,H,T,1]``, ``b [B,H,T,NG]`` (NG divides V), ``Ip [H]``, ``M0 [B,H,V,K]``,
    ``J0 [B,H,NG,K]`` (the initial precision minus ``Ip``, one row per group), in any dtype and strides (last
    dimension contiguous). Returns ``o [B,H,T,V]`` (q's dtype, rounded once), ``var [B,H,T,NG]`` (None without
    ``variance``), the
    boundary numerators ``[B,H,N+1,V,K]`` and group precisions minus ``Ip`` ``[B,H,N+1,NG,K]``. ``w [B,H,T,1]``
    (``β`` per token, any strides): the write is ``w ∘ v``, formed in the kernels."""
    B, H, T, K = k.shape
    V, NG = v.shape[-1], b.shape[-1]
    N = triton.cdiv(T, C)
    dt = compute_dtype(q, k, v)
    table = launch_table(q)
    q, k, v, b = (_rows_last(x) for x in (q, k, v, b))
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    BJ = _tile(NG, None)
    dev = q.device
    states = torch.empty(B, H, N + 1, V, K, dtype=dt, device=dev)
    Js = torch.empty(B, H, N + 1, NG, K, dtype=dt, device=dev)
    out = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
    var = torch.empty(B, T, H, NG, dtype=dt, device=dev) if variance else out
    meta = dict(K=K, C=C, BK=BK, PRECISION=_precision(q, dt), DTYPE=_triton_dtype(dt))
    NK = triton.cdiv(K, BK)
    _chunk_states_kernel[(NK, triton.cdiv(V, BV), B * H)](
        *_strides(k), *_strides(v), *_written(w, g), *_strides(g), M0.to(dt).contiguous(), states, T, H, N, V=V,
        BV=BV, SQUARE=False, SCALED=w is not None, **meta, **table["states"])
    _chunk_states_kernel[(NK, triton.cdiv(NG, BJ), B * H)](
        *_strides(k), *_strides(b), *_written(None, g), *_strides(g), J0.to(dt).contiguous(), Js, T, H, N, V=NG,
        BV=BJ, SQUARE=True, SCALED=False, **meta, **table["states"])
    opts, BKo, (VGo, BVo, TPGo) = _launch(table, "grouped_output", K, V, NG, BK, BV, q.element_size() > 2)
    _grouped_output_kernel[(N, B * H, NG * TPGo)](
        *_strides(q), *_strides(k), *_strides(v), *_written(w, g), *_strides(g), *_strides(b), Ip.to(dt).contiguous(),
        states, Js, out, out.stride(0), out.stride(2), out.stride(1), var, var.stride(0), var.stride(2),
        var.stride(1), float(scale), T, H, N, NG, V=V, VG=VGo, TPG=TPGo, BV=BVo, SCALED=w is not None, VAR=variance,
        **dict(meta, BK=BKo), **opts)
    return out.transpose(1, 2), (var.transpose(1, 2) if variance else None), states, Js


def grouped_diagonal_triton_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, Ip: Tensor,
                                     states: Tensor, Js: Tensor, do: Tensor, dvar: Optional[Tensor],
                                     dM_final: Optional[Tensor], dJ_final: Optional[Tensor], scale: float, C: int,
                                     block_k: Optional[int] = None, block_v: Optional[int] = None,
                                     w: Optional[Tensor] = None):
    """Cotangents ``(dq, dk, dv, dg, db, dIp, dM0, dJ0)`` of :func:`grouped_diagonal_triton_forward` (shapes of
    its inputs; dq, dk, dv in q's, k's, v's dtype, rounded once from the compute dtype; the others in the
    compute dtype) from ``do [B,H,T,V]``, ``dvar [B,H,T,NG]`` and the final numerator's and
    precision's (None: zero), given the boundary states it returned. With the forward's ``w``, also
    ``dw [B,H,T,1]`` (compute dtype) last."""
    B, H, T, K = k.shape
    V, NG = v.shape[-1], b.shape[-1]
    N = triton.cdiv(T, C)
    dt = states.dtype
    table = launch_table(q)
    q, k, v, b, do = (_rows_last(x) for x in (q, k, v, b, do))
    BK, BV = _tile(K, block_k), _tile(V, block_v)
    dev = q.device
    Ipc = Ip.to(dt).contiguous()
    wide = q.element_size() > 2
    dht = torch.zeros(B, H, V, K, dtype=dt, device=dev) if dM_final is None else dM_final.to(dt).contiguous()
    dJT = torch.zeros(B, H, NG, K, dtype=dt, device=dev) if dJ_final is None else dJ_final.to(dt).contiguous()
    dstates = torch.empty(B, H, N, V, K, dtype=dt, device=dev)
    dM0 = torch.empty(B, H, V, K, dtype=dt, device=dev)
    dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
    meta = dict(K=K, C=C, PRECISION=_precision(q, dt), DTYPE=_triton_dtype(dt))
    sc = float(scale)
    qs, ks, gs, bs, dos = (_strides(x) for x in (q, k, g, b, do))
    opts, BKs, (VGs, BVs, TPGs) = _launch(table, "grouped_dstates", K, V, NG, BK, BV, wide)
    _grouped_dstates_kernel[(triton.cdiv(K, BKs), NG * TPGs, B * H)](
        *qs, *ks, *dos, *gs, *bs, Ipc, Js, dht, dstates, dM0, sc, T, H, N, NG, V=V, VG=VGs, TPG=TPGs, BK=BKs, BV=BVs,
        **meta, **opts)
    opts, BKv, (VGv, BVv, TPGv) = _launch(table, "grouped_dv", K, V, NG, BK, BV, wide)
    scaled, ws = w is not None, _written(w, g)
    dW = torch.empty(NG * TPGv, B, T, H, dtype=dt, device=dev) if scaled else dv
    _grouped_dv_kernel[(N, B * H, NG * TPGv)](
        *qs, *ks, *dos, *gs, *bs, Ipc, Js, dstates, dv, dv.stride(0), dv.stride(2), dv.stride(1), *_strides(v), *ws,
        dW, *((dW.stride(0), dW.stride(1), dW.stride(3), dW.stride(2)) if scaled else (0, 0, 0, 0)), sc, T, H, N, NG,
        V=V, VG=VGv, TPG=TPGv, BK=BKv, BV=BVv, SCALED=scaled, **meta, **opts)
    opts, BKq, (VGq, BVq, _) = _launch(table, "grouped_dqk" if NG == 1 else "grouped_dqk_groups", K, V, NG, BK,
                                       BV, wide)
    NKq = triton.cdiv(K, BKq)
    dq = torch.empty(B, T, H, K, dtype=q.dtype, device=dev)
    dk = torch.empty(B, T, H, K, dtype=dt, device=dev)
    dk_out = dk if k.dtype == dt else torch.empty(B, T, H, K, dtype=k.dtype, device=dev)
    db = torch.empty(NKq, B, T, H, NG, dtype=dt, device=dev)
    dG = torch.empty(NKq, B, T, H, dtype=dt, device=dev)
    dJs = torch.empty(B, H, N, NG, K, dtype=dt, device=dev)
    dIp = torch.empty(NG, NKq, B, H, N, dtype=dt, device=dev)
    variance = dvar is not None
    dvs = _strides(dvar) if variance else (dv, 0, 0, 0)
    first = opts.pop("PRECISION_FIRST", False)
    _grouped_dqk_kernel[(NKq, N, B * H)](
        *qs, *ks, *_strides(v), *ws, *dos, *gs, *bs, Ipc, states, Js, dstates, *dvs, dq, dq.stride(0), dq.stride(2),
        dq.stride(1), dk, dk.stride(0), dk.stride(2), dk.stride(1), db, db.stride(0), db.stride(1), db.stride(3),
        db.stride(2), dG, dG.stride(0), dG.stride(1), dG.stride(3), dG.stride(2), dJs, dIp, sc, T, H, N, NG, V=V,
        VG=VGq, BK=BKq, BV=BVq, VAR=variance, SCALED=scaled, PRECISION_FIRST=first, **meta, **opts)
    dJ0 = torch.empty(B, H, NG, K, dtype=dt, device=dev)
    _grouped_dJ_kernel[(NKq, B * H)](*ks, *gs, *bs, Js, dJs, dJT, dJ0, dk, dk_out, dk.stride(0), dk.stride(2),
                                     dk.stride(1), db, db.stride(0), db.stride(1), db.stride(3), db.stride(2), dG,
                                     dG.stride(0), dG.stride(1), dG.stride(3), dG.stride(2), T, H, N, NG, BK=BKq,
                                     BG=max(16, triton.next_power_of_2(NG)), **meta, **table["grouped_dJ"])
    dg = (dG[0] if NKq == 1 else dG.sum(0)).transpose(1, 2)[..., None]
    db = (db[0] if NKq == 1 else db.sum(0)).transpose(1, 2)
    grads = (dq.transpose(1, 2), dk_out.transpose(1, 2), dv.transpose(1, 2), dg, db, dIp.sum((0, 1, 2, 4)), dM0,
             dJ0)
    if scaled:
        grads += ((dW[0] if dW.shape[0] == 1 else dW.sum(0)).transpose(1, 2)[..., None],)
    return grads


class TritonGroupedDiagonal(torch.autograd.Function):
    """Palimpsa / MetaMamba2 with ``b`` head-shared or grouped on the fused Triton kernels
    (docs/theory.md#limit-8-grouped-importance; one group: limit 7): ``M_t = α M_{t-1} + v_t ⊗ k_t`` (``v``
    the write ``β v``), the group precisions ``J⁽ᵍ⁾_t = α J⁽ᵍ⁾_{t-1} + b⁽ᵍ⁾_t k_t²`` and ``I = Ip + J``,
    ``o = scale · M_t (q ⊘ I⁽ᵍ⁾_t)`` on the rows of group ``g``; the precisions and reads are formed on chip.
    Returns ``(o [B,H,T,V], var [B,H,T,NG] or None, M_T, J_T)``. ``w [B,H,T,1]`` (optional): the write is
    ``w ∘ v`` (``β`` per token), formed in the kernels, its gradient returned too. Saves the inputs and the
    boundary states."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, b: Tensor, Ip: Tensor, M0: Tensor, J0: Tensor,
                scale: float, C: int, variance: bool, w: Optional[Tensor] = None):
        if g.shape[-1] != 1:
            raise ValueError("the chunked Triton kernel supports scalar (per-head) forgetting only, not vector")
        if w is not None and w.shape != k.shape[:3] + (1,):
            raise ValueError(f"the per-token write must be [B,H,T,1], got {tuple(w.shape)}")
        C = _kernel_chunk(C)
        o, var, states, Js = grouped_diagonal_triton_forward(q, k, v, g, b, Ip, M0, J0, scale, C, variance, w=w)
        ctx.save_for_backward(q, k, v, g, b, Ip, states, Js, w)
        ctx.scale, ctx.C, ctx.variance = scale, C, variance
        ctx.dtypes = (M0.dtype, J0.dtype)
        return o, var, states[:, :, -1], Js[:, :, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do: Tensor, dvar: Optional[Tensor], dM: Tensor, dJ: Tensor):
        q, k, v, g, b, Ip, states, Js, w = ctx.saved_tensors
        grads = grouped_diagonal_triton_backward(q, k, v, g, b, Ip, states, Js, do, dvar if ctx.variance else None,
                                                 dM, dJ, ctx.scale, ctx.C, w=w)
        dq, dk, dv, dg, db, dIp, dM0, dJ0 = grads[:8]
        dw = grads[8].to(w.dtype) if w is not None else None
        return (dq, dk, dv, dg.to(g.dtype), db.to(b.dtype), dIp.to(Ip.dtype),
                dM0.to(ctx.dtypes[0]), dJ0.to(ctx.dtypes[1]), None, None, None, dw)


class TritonRead:
    """The chunked router's read primitives on Triton: called, :class:`TritonChunkDot` (the gated
    linear-attention read); ``grouped_diagonal``, :class:`TritonGroupedDiagonal`."""

    def __call__(self, *args):
        return TritonChunkDot.apply(*args)

    @staticmethod
    def grouped_diagonal(*args):
        return TritonGroupedDiagonal.apply(*args)


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
    return chunk_run(call, chunk_size, TritonRead())
