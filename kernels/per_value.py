"""Palimpsa with an importance rate per value row (``b [B,T,H,V]``): Triton forward and backward.

The ``dot_diag`` recurrence is elementwise in (value row i, key column j) (docs/theory.md#closed-forms):

    M_t = α_t M_{t-1} + (β v_t) ⊗ k_t,   J_t = α_t J_{t-1} + b_t ⊗ k_t²,   I_t = Ip + J_t,
    o_t = scale · Σ_j (M_t / I_t)_ij q_t,j,   var_t = scale² · Σ_j q_t,j² / I_t,ij

Only the read-out (a sum over keys) and ``dq``, ``dk`` (sums over values) couple the synapses.

Forward (``_pv_fwd_kernel``): one program per (value tile of ``BV`` rows, sequence·head) holds ``M, J``
for its rows and all ``K`` columns in registers and walks the tokens; the read-out's sum over keys stays
inside the program; ``o`` is stored in q's dtype. Every ``C`` tokens (a segment, ``SEGMENT = 64``) it
stores ``(M, J)`` (``2·V·K·4/C`` bytes per token and head: 2 KB at ``K = V = 128``); autograd keeps these
and the final state, nothing else.

Backward (``_pv_bwd_kernel``): one program per (value tile of ``BV`` rows, sequence·head) walks the
segments in reverse. For a segment it loads its rows of ``β v``, ``b``, ``do`` and the decays once, then
loops over the key columns ``j``; per column it loads ``q_j, k_j`` over the segment, the column of its saved
start state and of its end state (the next segment's start, or the final state) and the cotangent carried
from the later segment, and works on ``[C, BV]`` tensors (a row per token):

- the states ``M_t = α_t M_{t-1} + β v_t k_t`` (and ``J``) as one associative scan over the tokens of the
  pairs ``(α_t, β v_t k_t)``, the first row's input ``α_0 M_start + β v_0 k_0`` put in by a select;
- the read-out's local gradients ``L_M = s q / I``, ``L_J = -P_J`` (``P_J = L_M M / I``, plus the
  variance's ``s_var q² / I²``), ``dq`` over the tile's rows;
- the adjoint states ``Ĥ_t = L_t + α_{t+1} Ĥ_{t+1}`` as the same scan in reverse, its first input (the last
  token's ``L`` from the end state, plus the carried cotangent) put in by a select; ``α_0 Ĥ_0`` is the
  cotangent of the start state, carried to the segment before through ``dM0, dJ0`` (which end as the
  initial state's cotangents);
- ``d(βv)``, ``db`` accumulated over the columns in registers (written once per segment, in the inputs'
  dtypes), ``dk`` per column. The decay's cotangent is ``Ip Σ P_J − Σ Ĥ ∘ write`` per token (with
  ``Σ L ∘ S = Ip Σ P_J``, since ``P_J ∘ J = P_J ∘ I − Ip P_J`` and ``Σ_j L_M ∘ M = q · dq``), summed from the
  segment's end plus ``Σ Ĥ_start ∘ S_start`` of the segment after it (exact: no division by a decay).

Nothing goes to global memory per token and synapse. ``dq``, ``dk``, ``dg`` (and a head-shared ``b``'s or
``β``'s gradient) are partial sums per value tile, summed by ``_pv_sum_kernel`` (``dq``, ``dk``, stored in
their inputs' dtypes) or torch (the per-token scalars).

Covers ``dot_diag`` / diagonal with scalar or no forgetting (Palimpsa, MetaMamba2). Inputs fp16 / bf16 /
fp32 are computed in fp32 (every product in IEEE fp32, no TF32), fp64 in fp64.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from metaplastic.scan import ScanResult
from metaplastic.scan import scan as reference_scan

from .coverage import per_value_reason
from .entry import ScanCall, by_sequence, triton_unavailable_reason

Tensor = torch.Tensor
SEGMENT = 64      # tokens between saved states (2 KB per token and head at K = V = 128, fp32)
BWD_ROWS = 32     # value rows per backward program
BWD_WARPS = 8     # warps per backward program


@triton.jit
def _pv_fwd_kernel(q, k, v, beta, b, g, ip, M0, J0, o, var, ck_M, ck_J, MT, JT, scale, T, NS, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr,
                   B_PER_V: tl.constexpr, HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, OUTPUT_VAR: tl.constexpr,
                   SAVE: tl.constexpr, STORE_FINAL: tl.constexpr, DTYPE: tl.constexpr):
    """Grid ``(cdiv(V, BV), B·H)``. Inputs in their own layout: ``q, k [B,T,H,K]``, ``v [B,T,H,V]``,
    ``beta, b [B,T,H(,V)]``, ``g [B,T,H]``, ``ip [H]``; ``o, var [B,T,H,V]``; states ``[B·H,V,K]``, checkpoints
    ``[B·H,NS,V,K]`` (the state before each segment)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    p_s = i_bh * V * K + o_v[:, None] * K + o_k[None, :]
    ipv = tl.load(ip + i_h).to(DTYPE)
    M = tl.zeros([BV, BK], dtype=DTYPE)
    J = tl.zeros([BV, BK], dtype=DTYPE)
    if HAS_INIT:
        M = tl.load(M0 + p_s, mask=m_vk, other=0.).to(DTYPE)
        J = tl.load(J0 + p_s, mask=m_vk, other=0.).to(DTYPE)
    for i_s in range(NS):
        if SAVE:
            p_c = (i_bh * NS + i_s) * V * K + o_v[:, None] * K + o_k[None, :]
            tl.store(ck_M + p_c, M, mask=m_vk)
            tl.store(ck_J + p_c, J, mask=m_vk)
        for t in range(i_s * C, tl.minimum(i_s * C + C, T)):
            qt = tl.load(q + ((i_b * T + t) * H + i_h) * K + o_k, mask=m_k, other=0.).to(DTYPE)
            kt = tl.load(k + ((i_b * T + t) * H + i_h) * K + o_k, mask=m_k, other=0.).to(DTYPE)
            bvt = tl.load(v + ((i_b * T + t) * H + i_h) * V + o_v, mask=m_v, other=0.).to(DTYPE)
            if HAS_BETA:
                if BETA_PER_V:
                    bvt *= tl.load(beta + ((i_b * T + t) * H + i_h) * V + o_v, mask=m_v, other=0.).to(DTYPE)
                else:
                    bvt *= tl.load(beta + (i_b * T + t) * H + i_h).to(DTYPE)
            if B_PER_V:
                bt = tl.load(b + ((i_b * T + t) * H + i_h) * V + o_v, mask=m_v, other=0.).to(DTYPE)
            else:
                bt = tl.zeros([BV], dtype=DTYPE) + tl.load(b + (i_b * T + t) * H + i_h).to(DTYPE)
            if HAS_G:
                a = tl.exp(tl.load(g + (i_b * T + t) * H + i_h).to(DTYPE))
                M = a * M
                J = a * J
            M += bvt[:, None] * kt[None, :]
            J += bt[:, None] * (kt * kt)[None, :]
            I = ipv + J
            p_o = ((i_b * T + t) * H + i_h) * V + o_v
            tl.store(o + p_o, scale * tl.sum(M / I * qt[None, :], 1), mask=m_v)
            if OUTPUT_VAR:
                tl.store(var + p_o, scale * scale * tl.sum((qt * qt)[None, :] / I, 1), mask=m_v)
    if STORE_FINAL:
        tl.store(MT + p_s, M, mask=m_vk)
        tl.store(JT + p_s, J, mask=m_vk)


@triton.jit
def _decay_scan_combine(a1, m1, j1, a2, m2, j2):
    """Two first-order recurrences ``y_t = a_t y_{t-1} + x_t`` sharing their decays, as an associative scan."""
    return a1 * a2, a2 * m1 + m2, a2 * j1 + j2


@triton.jit
def _pv_bwd_kernel(q, k, v, beta, b, g, ip, ck_M, ck_J, MT, JT, do, dvar, dMT, dJT, dq, dk, dv, dbeta, db, dg,
                   dM0, dJ0, scale, T, NS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
                   C: tl.constexpr, HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr, B_PER_V: tl.constexpr,
                   HAS_G: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_DFINAL: tl.constexpr, DTYPE: tl.constexpr):
    """Grid ``(cdiv(V, BV), B·H)``, layouts as the forward's (``MT, JT``: its final state); segments of ``C``
    tokens. Writes ``dv [B,T,H,V]`` (v's dtype), ``db`` (``[B,T,H,V]`` in b's dtype, or partials
    ``[NV,B,T,H]`` for a head-shared b), ``dβ`` (``[B,T,H,V]`` in β's dtype, or partials ``[NV,B,T,H]``),
    partials ``dq, dk [NV,B,T,H,K]`` and ``dg [NV,B,T,H]`` (compute dtype), and the initial state's
    cotangents ``dM0, dJ0 [B·H,V,K]``, which also carry the cotangent of each segment's start state from one
    segment to the one before."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    BH = tl.num_programs(1)
    o_v = i_v * BV + tl.arange(0, BV)
    o_r = tl.arange(0, C)
    m_v = o_v < V
    ipv = tl.load(ip + i_h).to(DTYPE)
    first = (o_r == 0)[:, None]
    last = (o_r == C - 1)[:, None]
    row0 = tl.zeros([1, BV], dtype=tl.int32)  # gathers the first row of a [C, BV] tensor
    bnd = tl.sum(tl.zeros([BV], dtype=DTYPE), 0)  # dg at the first token of the segment after this one
    for i_r in range(NS):
        i_s = NS - 1 - i_r
        # this segment's rows of the value tile (0 and decay 1 past T): β v, b, scale·do and the decays, held
        # for every key column; the first row's β v, b and the last row's scale·do apart
        t = i_s * C + o_r
        m_t = t < T
        tok = (i_b * T + t) * H + i_h
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = tok[:, None] * V + o_v[None, :]
        tok0 = (i_b * T + i_s * C) * H + i_h
        tL = tl.minimum(i_s * C + C - 1, T - 1)  # the last row's token (clamped: its cotangents are 0 past T)
        tokL = (i_b * T + tL) * H + i_h
        m_L = m_v & (i_s * C + C - 1 + 0 * o_v < T)
        bvu = tl.load(v + p_tv, mask=m_tv, other=0.).to(DTYPE)
        bv0 = tl.load(v + tok0 * V + o_v, mask=m_v, other=0.).to(DTYPE)
        if HAS_BETA:
            if BETA_PER_V:
                bvu *= tl.load(beta + p_tv, mask=m_tv, other=0.).to(DTYPE)
                bv0 *= tl.load(beta + tok0 * V + o_v, mask=m_v, other=0.).to(DTYPE)
            else:
                bvu *= tl.load(beta + tok, mask=m_t, other=0.).to(DTYPE)[:, None]
                bv0 *= tl.load(beta + tok0).to(DTYPE)
        if B_PER_V:
            bu = tl.load(b + p_tv, mask=m_tv, other=0.).to(DTYPE)
            b0 = tl.load(b + tok0 * V + o_v, mask=m_v, other=0.).to(DTYPE)
        else:
            bu = tl.zeros([C, BV], dtype=DTYPE) + tl.load(b + tok, mask=m_t, other=0.).to(DTYPE)[:, None]
            b0 = tl.zeros([BV], dtype=DTYPE) + tl.load(b + tok0).to(DTYPE)
        su = scale * tl.load(do + p_tv, mask=m_tv, other=0.).to(DTYPE)
        sL = scale * tl.load(do + tokL * V + o_v, mask=m_L, other=0.).to(DTYPE)
        if HAS_DVAR:
            svu = scale * scale * tl.load(dvar + p_tv, mask=m_tv, other=0.).to(DTYPE)
            svL = scale * scale * tl.load(dvar + tokL * V + o_v, mask=m_L, other=0.).to(DTYPE)
        gu = tl.zeros([C], dtype=DTYPE)
        gn = tl.zeros([C], dtype=DTYPE)  # g_{t+1} within the segment, 0 at its last row
        a0 = tl.sum(tl.zeros([BV], dtype=DTYPE), 0) + 1.
        if HAS_G:
            gu = tl.load(g + tok, mask=m_t, other=0.).to(DTYPE)
            gn = tl.load(g + tok + H, mask=(o_r < C - 1) & (t + 1 < T), other=0.).to(DTYPE)
            a0 = tl.exp(tl.load(g + tok0).to(DTYPE))
        eg = tl.exp(gu)
        egn = tl.exp(gn)
        dbv_u = tl.zeros([C, BV], dtype=DTYPE)  # d(β v) and -db: summed over the key columns
        ndb_u = tl.zeros([C, BV], dtype=DTYPE)
        dG = tl.zeros([C], dtype=DTYPE)
        bnd_here = bnd
        bnd_next = tl.sum(tl.zeros([BV], dtype=DTYPE), 0)
        p_s = i_bh * V * K + o_v * K
        p_c = (i_bh * NS + i_s) * V * K + o_v * K  # the segment's start state; + V·K its end state
        for j in range(K):
            qu = tl.load(q + tok * K + j, mask=m_t, other=0.).to(DTYPE)
            ku = tl.load(k + tok * K + j, mask=m_t, other=0.).to(DTYPE)
            k0 = tl.load(k + tok0 * K + j).to(DTYPE)
            qL = tl.load(q + tokL * K + j).to(DTYPE)
            k2 = ku * ku
            Ms = tl.load(ck_M + p_c + j, mask=m_v, other=0.).to(DTYPE)
            Js = tl.load(ck_J + p_c + j, mask=m_v, other=0.).to(DTYPE)
            # the segment's end state (the next one's start, or the final state) and its cotangent, carried
            # from the segment after it (or the final state's)
            if i_r == 0:
                Me = tl.load(MT + p_s + j, mask=m_v, other=0.).to(DTYPE)
                Je = tl.load(JT + p_s + j, mask=m_v, other=0.).to(DTYPE)
                dM = tl.zeros([BV], dtype=DTYPE)
                dJ = tl.zeros([BV], dtype=DTYPE)
                if HAS_DFINAL:
                    dM = tl.load(dMT + p_s + j, mask=m_v, other=0.).to(DTYPE)
                    dJ = tl.load(dJT + p_s + j, mask=m_v, other=0.).to(DTYPE)
                    bnd_here += tl.sum(dM * Me + dJ * Je, 0)  # the final state's part of every dg
            else:
                Me = tl.load(ck_M + p_c + V * K + j, mask=m_v, other=0.).to(DTYPE)
                Je = tl.load(ck_J + p_c + V * K + j, mask=m_v, other=0.).to(DTYPE)
                dM = tl.load(dM0 + p_s + j, mask=m_v, other=0.).to(DTYPE)
                dJ = tl.load(dJ0 + p_s + j, mask=m_v, other=0.).to(DTYPE)
            # column j's states M_t = a_t M_{t-1} + β v_t k_t (J: b_t k_t²) as one scan over the segment's
            # tokens; the first row's input a_0 M_start + β v_0 k_0 set by a select
            XM = tl.where(first, (a0 * Ms + bv0 * k0)[None, :], bvu * ku[:, None])
            XJ = tl.where(first, (a0 * Js + b0 * (k0 * k0))[None, :], bu * k2[:, None])
            _, Mall, Jall = tl.associative_scan((tl.broadcast_to(eg[:, None], [C, BV]), XM, XJ), 0,
                                                _decay_scan_combine)
            invI = 1. / (ipv + Jall)
            # the read-out's local gradients: L_M = s q / I, L_J = -P_J with P_J = L_M M / I (+ s_var q² / I²)
            u = su * (Mall * invI)
            dqr = tl.sum(u, 1)
            r = qu[:, None] * invI
            LM = su * r
            PJ = u * r
            dq_t = dqr
            # the last row's, from the end state, plus the carried cotangent: the adjoint's first input
            iE = 1. / (ipv + Je)
            rE = qL * iE
            LME = sL * rE
            PJE = LME * Me * iE
            if HAS_DVAR:
                sI = tl.sum(svu * invI, 1)
                dq_t += 2. * qu * sI
                PJ += svu * r * r
                PJE += svL * rE * rE
            # the decay's cotangent, part 1: Σ L ∘ state per token = Ip Σ P_J (- q² Σ s_var / I), as
            # Σ L_M ∘ M = q dqr and P_J ∘ J = P_J ∘ I - Ip P_J
            dG += ipv * tl.sum(PJ, 1)
            if HAS_DVAR:
                dG -= qu * qu * sI
            # adjoint states Ĥ_t = L_t + a_{t+1} Ĥ_{t+1} (for J its negative) as one reverse scan
            _, HM, nHJ = tl.associative_scan((tl.broadcast_to(egn[:, None], [C, BV]),
                                              tl.where(last, (LME + dM)[None, :], LM),
                                              tl.where(last, (PJE - dJ)[None, :], PJ)),
                                             0, _decay_scan_combine, reverse=True)
            # the cotangent of the start state, a_0 Ĥ_0, carried to the segment before
            dM = a0 * tl.reshape(tl.gather(HM, row0, 0), [BV])
            dJ = -a0 * tl.reshape(tl.gather(nHJ, row0, 0), [BV])
            tl.store(dM0 + p_s + j, dM, mask=m_v)
            tl.store(dJ0 + p_s + j, dJ, mask=m_v)
            bnd_next += tl.sum(dM * Ms + dJ * Js, 0)
            # the writes β v k_j and b k_j²
            dbv_u += HM * ku[:, None]
            ndb_u += nHJ * k2[:, None]
            dk_t = tl.sum(HM * bvu, 1) - 2. * ku * tl.sum(nHJ * bu, 1)
            p_part = i_v * BH * T * K + tok * K + j
            tl.store(dq + p_part, dq_t, mask=m_t)
            tl.store(dk + p_part, dk_t, mask=m_t)
        # the decay's cotangent, part 2: - Σ Ĥ ∘ write, then summed from the end (no division by a decay)
        dG -= tl.sum(dbv_u * bvu - ndb_u * bu, 1)
        dg_t = tl.cumsum(dG, 0, reverse=True) + bnd_here
        bnd = bnd_next
        p_nv = i_v * BH * T + tok
        tl.store(dg + p_nv, dg_t, mask=m_t)
        if HAS_BETA:
            vu = tl.load(v + p_tv, mask=m_tv, other=0.).to(DTYPE)
            if BETA_PER_V:
                tl.store(dv + p_tv, dbv_u * tl.load(beta + p_tv, mask=m_tv, other=0.).to(DTYPE), mask=m_tv)
                tl.store(dbeta + p_tv, dbv_u * vu, mask=m_tv)
            else:
                tl.store(dv + p_tv, dbv_u * tl.load(beta + tok, mask=m_t, other=0.).to(DTYPE)[:, None], mask=m_tv)
                tl.store(dbeta + p_nv, tl.sum(dbv_u * vu, 1), mask=m_t)
        else:
            tl.store(dv + p_tv, dbv_u, mask=m_tv)
        if B_PER_V:
            tl.store(db + p_tv, -ndb_u, mask=m_tv)
        else:
            tl.store(db + p_nv, -tl.sum(ndb_u, 1), mask=m_t)
        tl.debug_barrier()  # the carried cotangents stored above are loaded by other threads next


@triton.jit
def _pv_sum_kernel(x, y, N, P, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    """``y [N] = Σ_p x[p, :N]`` over ``P`` partial sums, accumulated in ``DTYPE``, stored in ``y``'s dtype."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    acc = tl.zeros([BLOCK], dtype=DTYPE)
    for p in range(P):
        acc += tl.load(x + p * N + o, mask=m, other=0.).to(DTYPE)
    tl.store(y + o, acc, mask=m)


def _blocks(K: int, V: int, block_v: Optional[int]):
    """Forward: value rows per program (all K columns); backward: value rows per program (one key column per
    step of its loop over the keys)."""
    BK_all = triton.next_power_of_2(K)
    BV_fwd = min(triton.next_power_of_2(V), max(1, 2048 // BK_all))
    BV = block_v or min(triton.next_power_of_2(V), BWD_ROWS)
    return BK_all, BV_fwd, BV


def _sum_partials(parts: Tensor, dtype: torch.dtype) -> Tensor:
    """``parts [P, ...]`` summed over its first axis by :func:`_pv_sum_kernel`, in ``dtype``."""
    out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    N = out.numel()
    BLOCK = 1024
    _pv_sum_kernel[(triton.cdiv(N, BLOCK),)](parts, out, N, parts.shape[0], BLOCK=BLOCK,
                                             DTYPE=tl.float64 if parts.dtype == torch.float64 else tl.float32)
    return out


class PerValuePalimpsa(torch.autograd.Function):
    """``q, k [B,T,H,K]``, ``v [B,T,H,V]``, ``beta`` (None, ``[B,T,H]`` or ``[B,T,H,V]``), ``b [B,T,H(,V)]``,
    ``g [B,T,H]`` or None, ``M0, J0 [B·H,V,K]``, ``ip [H]`` -> ``o [B,T,H,V]`` (q's dtype), ``var [B,T,H,V]``,
    ``M_T, J_T [B·H,V,K]`` (compute dtype ``M0.dtype``). Saves the inputs themselves, the states every ``C``
    tokens and the final state."""

    @staticmethod
    def forward(ctx, q, k, v, beta, b, g, M0, J0, ip, scale: float, with_var: bool, C: int, blocks: tuple):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dt = M0.dtype
        NS = triton.cdiv(T, C)
        BK_all, BV_fwd, _ = blocks
        dev = q.device
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=dev)
        var = torch.empty(B, T, H, V, dtype=dt, device=dev) if with_var else o
        ck_M = torch.empty(B * H, NS, V, K, dtype=dt, device=dev)
        ck_J = torch.empty_like(ck_M)
        M_T, J_T = torch.empty_like(M0), torch.empty_like(M0)
        _pv_fwd_kernel[(triton.cdiv(V, BV_fwd), B * H)](
            q, k, v, q if beta is None else beta, b, q if g is None else g, ip, M0, J0, o, var, ck_M, ck_J, M_T, J_T,
            float(scale), T, NS, H=H, K=K, V=V, BK=BK_all, BV=BV_fwd, C=C, HAS_BETA=beta is not None,
            BETA_PER_V=beta is not None and beta.dim() == 4, B_PER_V=b.dim() == 4, HAS_G=g is not None,
            HAS_INIT=True, OUTPUT_VAR=with_var, SAVE=True, STORE_FINAL=True,
            DTYPE=tl.float64 if dt == torch.float64 else tl.float32)
        ctx.save_for_backward(q, k, v, beta, b, g, ip, ck_M, ck_J, M_T, J_T)
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None: nothing to read
        ctx.meta = (float(scale), with_var, C, blocks)
        return o, (var if with_var else None), M_T, J_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, v, beta, b, g, ip, ck_M, ck_J, M_T, J_T = ctx.saved_tensors
        scale, with_var, C, blocks = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH = B * H
        dt = ck_M.dtype
        NS = ck_M.shape[1]
        _, _, BV = blocks
        NV = triton.cdiv(V, BV)
        dev = q.device
        per_v = b.dim() == 4
        beta_per_v = beta is not None and beta.dim() == 4
        do = torch.zeros(B, T, H, V, dtype=q.dtype, device=dev) if do is None else do.contiguous()
        has_dvar = with_var and dvar is not None
        has_dfinal = dM_T is not None or dJ_T is not None
        if has_dfinal:
            dM_T = torch.zeros(BH, V, K, dtype=dt, device=dev) if dM_T is None else dM_T.to(dt).contiguous()
            dJ_T = torch.zeros(BH, V, K, dtype=dt, device=dev) if dJ_T is None else dJ_T.to(dt).contiguous()
        dq = torch.empty(NV, B, T, H, K, dtype=dt, device=dev)  # partial sums over the value tiles
        dk = torch.empty(NV, B, T, H, K, dtype=dt, device=dev)
        dg = torch.empty(NV, B, T, H, dtype=dt, device=dev)
        dv = torch.empty(B, T, H, V, dtype=v.dtype, device=dev)
        db = torch.empty(B, T, H, V, dtype=b.dtype, device=dev) if per_v else \
            torch.empty(NV, B, T, H, dtype=dt, device=dev)
        dbeta = None
        if beta is not None:
            dbeta = torch.empty(B, T, H, V, dtype=beta.dtype, device=dev) if beta_per_v else \
                torch.empty(NV, B, T, H, dtype=dt, device=dev)
        dM0, dJ0 = torch.empty(BH, V, K, dtype=dt, device=dev), torch.empty(BH, V, K, dtype=dt, device=dev)
        _pv_bwd_kernel[(NV, BH)](
            q, k, v, q if beta is None else beta, b, q if g is None else g, ip, ck_M, ck_J, M_T, J_T, do,
            dvar.contiguous() if has_dvar else do, dM_T if has_dfinal else do, dJ_T if has_dfinal else do,
            dq, dk, dv, dv if dbeta is None else dbeta, db, dg, dM0, dJ0, scale, T, NS, H=H, K=K, V=V, BV=BV, C=C,
            HAS_BETA=beta is not None, BETA_PER_V=beta_per_v, B_PER_V=per_v, HAS_G=g is not None,
            HAS_DVAR=has_dvar, HAS_DFINAL=has_dfinal, DTYPE=tl.float64 if dt == torch.float64 else tl.float32,
            num_warps=BWD_WARPS)
        dq, dk = _sum_partials(dq, q.dtype), _sum_partials(dk, k.dtype)
        if not per_v:
            db = db.sum(0).to(b.dtype)
        if dbeta is not None and not beta_per_v:
            dbeta = dbeta.sum(0).to(beta.dtype)
        dgs = None if g is None else dg.sum(0).to(g.dtype)
        return dq, dk, dv, dbeta, db, dgs, dM0, dJ0, None, None, None, None, None


def per_value_run(call: ScanCall, segment: int = SEGMENT, block_v: Optional[int] = None) -> ScanResult:
    """Palimpsa (``dot_diag`` / diagonal, scalar or no forgetting) with any ``b`` by the per-value Triton
    kernels (a validated :class:`~metaplastic.kernels.entry.ScanCall`). ``segment``: tokens between the
    saved states and the rows of the backward's scans (a power of two)."""
    reason = per_value_reason(call.objective) or triton_unavailable_reason(call.q.device)
    if reason is not None:
        raise ValueError(reason)
    if segment < 2 or segment & (segment - 1):
        raise ValueError(f"segment ({segment}) must be a power of two, at least 2")
    if call.ip_requires_grad and call.needs_grad():
        return reference_scan(call.objective, call.q, call.k, call.v, **call.kwargs())
    call = call.with_b_per_value()
    return by_sequence(call, lambda c: _dense(c, segment, block_v))


def _dense(c: ScanCall, C: int, block_v) -> ScanResult:
    B, T, H, K, V = c.shape
    dt = c.dtype
    q, k, v = (x.contiguous() for x in (c.q, c.k, c.v))
    beta = None if c.beta is None else c.beta.contiguous()
    b = q.new_zeros(B, T, H) if c.b is None else c.b.contiguous()
    g = None if c.log_decay is None else c.log_decay.contiguous()
    Ip = c.prior_precision.view(1, H, 1, 1)
    if c.initial_state is None:
        M0 = torch.zeros(B * H, V, K, dtype=dt, device=q.device)
        J0 = torch.zeros(B * H, V, K, dtype=dt, device=q.device)
    else:
        I0 = c.initial_state["I"].to(dt)
        M0 = (I0 * c.initial_state["mu"].to(dt)).reshape(B * H, V, K).contiguous()
        J0 = (I0 - Ip).reshape(B * H, V, K).contiguous()
    ip = c.prior_precision.detach().contiguous()
    o, var, M_T, J_T = PerValuePalimpsa.apply(q, k, v, beta, b, g, M0, J0, ip, c.scale, c.output_variance, C,
                                              _blocks(K, V, block_v))
    final = None
    if c.output_final_state:
        I_T = J_T.view(B, H, V, K) + Ip
        final = {"mu": M_T.view(B, H, V, K) / I_T, "I": I_T}
    return ScanResult(o, final, var)
