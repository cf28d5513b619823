"""Palimpsa with an importance rate per value row (``b [B,T,H,V]``): Triton forward and backward.

The ``dot_diag`` recurrence is elementwise in (value row i, key column j) (docs/theory.md#closed-forms):

    M_t = α_t M_{t-1} + (β v_t) ⊗ k_t,   J_t = α_t J_{t-1} + b_t ⊗ k_t²,   I_t = Ip + J_t,
    o_t = scale · Σ_j (M_t / I_t)_ij q_t,j,   var_t = scale² · Σ_j q_t,j² / I_t,ij

Only the read-out (a sum over keys) and ``dq``, ``dk`` (sums over values) couple the synapses.

Forward (``_pv_fwd_kernel``): one program per (value tile of ``BV`` rows, sequence·head) holds ``M, J``
for its rows and all ``K`` columns in registers and walks the tokens; the read-out's sum over keys stays
inside the program. Every ``C`` tokens it stores ``(M, J)`` (``2·V·K·4/C`` bytes per token and head:
2 KB at ``K = V = 128, C = 64``): nothing else is saved.

Backward (``_pv_bwd_kernel``): one program per (key tile, value tile, sequence·head) walks the segments
of ``C`` tokens in reverse, and each segment's sub-chunks of ``CS`` tokens in reverse. For a sub-chunk it
rebuilds the start state from the segment's saved state (elementwise, over the earlier sub-chunks), then
all ``CS`` states at once as an associative scan over the sub-chunk's tokens of the pairs
``(α_t, β v_t ⊗ k_t)`` (and ``(α_t, b_t ⊗ k_t²)``), ``M_t = α_t M_{t-1} + β v_t ⊗ k_t``, plus
``exp(G_t) ⊗ M_start``; the adjoint states ``Ĥ_t = L_t + α_{t+1} Ĥ_{t+1}`` (``L`` the read-out's local
gradients, the cotangent carried from the later sub-chunks entering at the last token) as the same scan in
reverse. Each is one multiply-add per synapse and token in registers (no matrix product, no state in
global memory per token). The decay's cotangent is ``Σ L_t ∘ S_t − Σ Ĥ_t ∘ (write_t)`` summed from the
sub-chunk's end, plus ``Σ Ĥ_end ∘ S_end`` at its last token (exact: no division by a decay). Partial sums of
``dq``, ``dk`` (over value tiles), ``d(βv)``, ``db`` (over key tiles) and ``dg`` (over both) are written per
tile and summed on the host.

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
SEGMENT = 64     # tokens between saved states (2 KB per token and head at K = V = 128, fp32)
SUB_CHUNK = 16   # tokens rebuilt together in the backward
BWD_WARPS = 8    # warps per backward program


@triton.jit
def _load_bv(v, beta, i_b, i_h, t, o_v, m_t, m_v, T, H: tl.constexpr, V: tl.constexpr, CS: tl.constexpr,
             BV: tl.constexpr, HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr, DTYPE: tl.constexpr):
    """``β v`` of the tokens ``t [CS]``, rows ``o_v`` -> ``[CS, BV]`` (0 where masked)."""
    tok = (i_b * T + t) * H + i_h
    m = m_t[:, None] & m_v[None, :]
    x = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m, other=0.).to(DTYPE)
    if HAS_BETA:
        if BETA_PER_V:
            x *= tl.load(beta + tok[:, None] * V + o_v[None, :], mask=m, other=0.).to(DTYPE)
        else:
            x *= tl.load(beta + tok, mask=m_t, other=0.).to(DTYPE)[:, None]
    return x


@triton.jit
def _pv_fwd_kernel(q, k, v, beta, b, g, ip, M0, J0, o, var, ck_M, ck_J, MT, JT, scale, T, NS, H: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr,
                   B_PER_V: tl.constexpr, HAS_G: tl.constexpr, HAS_INIT: tl.constexpr, OUTPUT_VAR: tl.constexpr,
                   SAVE: tl.constexpr, STORE_FINAL: tl.constexpr, DTYPE: tl.constexpr):
    """Grid ``(cdiv(V, BV), B·H)``. Inputs in their own layout: ``q, k [B,T,H,K]``, ``v [B,T,H,V]``,
    ``beta, b [B,T,H(,V)]``, ``g [B,T,H]``, ``ip [H]``; ``o, var [B,T,H,V]``; states ``[B·H,V,K]``, checkpoints
    ``[B·H,NS,V,K]``."""
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
def _pv_bwd_kernel(q, k, v, beta, b, g, ip, ck_M, ck_J, do, dvar, dMT, dJT, dq, dk, dbv, db, dg, dM0, dJ0, scale, T,
                   NS, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   C: tl.constexpr, CS: tl.constexpr, HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr,
                   B_PER_V: tl.constexpr, HAS_G: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_DFINAL: tl.constexpr,
                   DTYPE: tl.constexpr):
    """Grid ``(NK, NV, B·H)``, layouts as the forward's. Writes partials ``dq, dk [NV,B,T,H,K]``,
    ``d(βv) [NK,B,T,H,V]``, ``db [NK,B,T,H,V]`` (or ``[NK·NV,B,T,H]`` for a head-shared b), ``dg [NK·NV,B,T,H]``
    and the initial state's cotangents ``dM0, dJ0 [B·H,V,K]``."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    NV = tl.num_programs(1)
    BH = tl.num_programs(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, CS)
    m_k = o_k < K
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    p_s = i_bh * V * K + o_v[:, None] * K + o_k[None, :]
    ipv = tl.load(ip + i_h).to(DTYPE)
    first = (o_c == 0)[:, None, None]
    last = (o_c == CS - 1)[:, None, None]
    dM = tl.zeros([BV, BK], dtype=DTYPE)  # cotangent of the state after the current sub-chunk
    dJ = tl.zeros([BV, BK], dtype=DTYPE)
    if HAS_DFINAL:
        dM = tl.load(dMT + p_s, mask=m_vk, other=0.).to(DTYPE)
        dJ = tl.load(dJT + p_s, mask=m_vk, other=0.).to(DTYPE)
    # Σ dM ∘ M + Σ dJ ∘ J over this tile at the end of the next sub-chunk to walk (the decay's boundary term);
    # for the last sub-chunk it is taken from its own final row below
    bnd = tl.sum(tl.zeros([CS], dtype=DTYPE), 0)
    at_end = 1
    for i_r in range(NS):
        i_s = NS - 1 - i_r
        p_c = (i_bh * NS + i_s) * V * K + o_v[:, None] * K + o_k[None, :]
        Ms = tl.load(ck_M + p_c, mask=m_vk, other=0.).to(DTYPE)
        Js = tl.load(ck_J + p_c, mask=m_vk, other=0.).to(DTYPE)
        for i_u in range(C // CS):
            u = C // CS - 1 - i_u
            t0 = i_s * C + u * CS
            if t0 < T:
                # the state before this sub-chunk, rebuilt from the segment's saved state
                Mu = Ms
                Ju = Js
                for w in range(u):
                    tw = i_s * C + w * CS + o_c
                    m_w = tw < T
                    gw = tl.zeros([CS], dtype=DTYPE)
                    if HAS_G:
                        gw = tl.load(g + (i_b * T + tw) * H + i_h, mask=m_w, other=0.).to(DTYPE)
                    Gw = tl.cumsum(gw, 0)
                    Gl = tl.sum(gw, 0)
                    kw = tl.load(k + ((i_b * T + tw[:, None]) * H + i_h) * K + o_k[None, :],
                                 mask=m_w[:, None] & m_k[None, :], other=0.).to(DTYPE)
                    bvw = _load_bv(v, beta, i_b, i_h, tw, o_v, m_w, m_v, T, H, V, CS, BV, HAS_BETA, BETA_PER_V, DTYPE)
                    if B_PER_V:
                        bw = tl.load(b + ((i_b * T + tw[:, None]) * H + i_h) * V + o_v[None, :],
                                     mask=m_w[:, None] & m_v[None, :], other=0.).to(DTYPE)
                    else:
                        bw = tl.zeros([CS, BV], dtype=DTYPE) + tl.load(b + (i_b * T + tw) * H + i_h, mask=m_w,
                                                                       other=0.).to(DTYPE)[:, None]
                    wt = tl.exp(Gl - Gw)[:, None]
                    Mu = tl.exp(Gl) * Mu + tl.sum((bvw * wt)[:, :, None] * kw[:, None, :], 0)
                    Ju = tl.exp(Gl) * Ju + tl.sum((bw * wt)[:, :, None] * (kw * kw)[:, None, :], 0)
                # this sub-chunk's states: M_t = a_t M_{t-1} + β v_t ⊗ k_t as one scan over its tokens
                t = t0 + o_c
                m_t = t < T
                m_tk = m_t[:, None] & m_k[None, :]
                m_tv = m_t[:, None] & m_v[None, :]
                gu = tl.zeros([CS], dtype=DTYPE)
                if HAS_G:
                    gu = tl.load(g + (i_b * T + t) * H + i_h, mask=m_t, other=0.).to(DTYPE)
                gn = tl.sum(tl.where(o_c[None, :] == o_c[:, None] + 1, gu[None, :], 0.), 1)  # g_{t+1}, 0 at the end
                eG = tl.exp(tl.cumsum(gu, 0))[:, None, None]
                qu = tl.load(q + ((i_b * T + t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.).to(DTYPE)
                ku = tl.load(k + ((i_b * T + t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.).to(DTYPE)
                bvu = _load_bv(v, beta, i_b, i_h, t, o_v, m_t, m_v, T, H, V, CS, BV, HAS_BETA, BETA_PER_V, DTYPE)
                if B_PER_V:
                    bu = tl.load(b + ((i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_tv,
                                 other=0.).to(DTYPE)
                else:
                    bu = tl.zeros([CS, BV], dtype=DTYPE) + tl.load(b + (i_b * T + t) * H + i_h, mask=m_t,
                                                                   other=0.).to(DTYPE)[:, None]
                su = scale * tl.load(do + ((i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], mask=m_tv,
                                     other=0.).to(DTYPE)
                k2 = ku * ku
                A = tl.broadcast_to(tl.exp(gu)[:, None, None], [CS, BV, BK])
                XM = bvu[:, :, None] * ku[:, None, :]
                XJ = bu[:, :, None] * k2[:, None, :]
                _, Mall, Jall = tl.associative_scan((A, XM, XJ), 0, _decay_scan_combine)
                Mall += eG * Mu[None, :, :]
                Jall += eG * Ju[None, :, :]
                if HAS_DFINAL:
                    if at_end == 1:  # the final state is the last row (tokens past T leave it unchanged)
                        fin = tl.where(last, Mall * dM[None, :, :] + Jall * dJ[None, :, :], 0.)
                        bnd = tl.sum(tl.sum(tl.sum(fin, 2), 1), 0)
                at_end = 0
                invI = 1. / (ipv + Jall)
                mu = Mall * invI
                # the read-out's local gradients L (its sum over keys couples nothing else)
                dqr = tl.sum(su[:, :, None] * mu, 1)
                LM = su[:, :, None] * qu[:, None, :] * invI
                LJ = -LM * mu
                dq_t = dqr
                if HAS_DVAR:
                    dvu = scale * scale * tl.load(dvar + ((i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :],
                                                  mask=m_tv, other=0.).to(DTYPE)
                    dq_t += 2. * qu * tl.sum(dvu[:, :, None] * invI, 1)
                    LJ -= dvu[:, :, None] * (qu * qu)[:, None, :] * invI * invI
                # the decay's cotangent, part 1: Σ L ∘ state per token (Σ LM ∘ M = Σ_j q_j dqr_j)
                dG = tl.sum(qu * dqr, 1) + tl.sum(tl.sum(LJ * Jall, 2), 1)
                # adjoint states Ĥ_t = L_t + a_{t+1} Ĥ_{t+1}, the carried cotangent entering at the last row
                Cn = tl.broadcast_to(tl.exp(gn)[:, None, None], [CS, BV, BK])
                _, HM, HJ = tl.associative_scan((Cn, LM + tl.where(last, dM[None, :, :], 0.),
                                                 LJ + tl.where(last, dJ[None, :, :], 0.)),
                                                0, _decay_scan_combine, reverse=True)
                a0 = tl.exp(tl.sum(tl.where(o_c == 0, gu, 0.), 0))
                dM = a0 * tl.sum(tl.where(first, HM, 0.), 0)
                dJ = a0 * tl.sum(tl.where(first, HJ, 0.), 0)
                # the writes β v ⊗ k, b ⊗ k² and the decays (part 2: − Σ Ĥ ∘ write; summed from the end)
                dbv_t = tl.sum(HM * ku[:, None, :], 2)
                db_t = tl.sum(HJ * k2[:, None, :], 2)
                dk_t = tl.sum(HM * bvu[:, :, None], 1) + 2. * ku * tl.sum(HJ * bu[:, :, None], 1)
                dG -= tl.sum(dbv_t * bvu + db_t * bu, 1)
                dg_t = tl.cumsum(dG, 0, reverse=True) + bnd
                bnd = tl.sum(tl.sum(dM * Mu + dJ * Ju, 1), 0)
                p_tk = (i_v * BH * T + (i_b * T + t[:, None]) * H + i_h) * K + o_k[None, :]
                tl.store(dq + p_tk, dq_t, mask=m_tk)
                tl.store(dk + p_tk, dk_t, mask=m_tk)
                tl.store(dbv + (i_k * BH * T + (i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], dbv_t, mask=m_tv)
                if B_PER_V:
                    tl.store(db + (i_k * BH * T + (i_b * T + t[:, None]) * H + i_h) * V + o_v[None, :], db_t, mask=m_tv)
                else:
                    tl.store(db + (i_k * NV + i_v) * BH * T + (i_b * T + t) * H + i_h, tl.sum(db_t, 1), mask=m_t)
                tl.store(dg + (i_k * NV + i_v) * BH * T + (i_b * T + t) * H + i_h, dg_t, mask=m_t)
    tl.store(dM0 + p_s, dM, mask=m_vk)
    tl.store(dJ0 + p_s, dJ, mask=m_vk)


def _blocks(K: int, V: int, block_k: Optional[int], block_v: Optional[int]):
    """Forward: value rows per program (all K columns); backward: key and value tile."""
    BK_all = triton.next_power_of_2(K)
    BV_fwd = min(triton.next_power_of_2(V), max(1, 2048 // BK_all))
    BK = block_k or min(BK_all, 16)  # [SUB_CHUNK, 16, 16] tiles at 8 warps: no spills at K = V = 128 (sm_90a)
    BV = block_v or min(triton.next_power_of_2(V), 16)
    return BK_all, BV_fwd, BK, BV


class PerValuePalimpsa(torch.autograd.Function):
    """``q, k [B,T,H,K]``, ``v [B,T,H,V]``, ``beta`` (None, ``[B,T,H]`` or ``[B,T,H,V]``), ``b [B,T,H(,V)]``,
    ``g [B,T,H]`` or None, ``M0, J0 [B·H,V,K]``, ``ip [H]`` -> ``o, var [B,T,H,V]``, ``M_T, J_T [B·H,V,K]``
    (compute dtype ``M0.dtype``). Saves the inputs themselves and the states every ``C`` tokens."""

    @staticmethod
    def forward(ctx, q, k, v, beta, b, g, M0, J0, ip, scale: float, with_var: bool, C: int, CS: int,
                blocks: tuple):
        B, T, H, K = q.shape
        V = v.shape[-1]
        dt = M0.dtype
        NS = triton.cdiv(T, C)
        BK_all, BV_fwd, _, _ = blocks
        dev = q.device
        o = torch.empty(B, T, H, V, dtype=dt, device=dev)
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
        ctx.save_for_backward(q, k, v, beta, b, g, ip, ck_M, ck_J)
        ctx.set_materialize_grads(False)  # an unused output's cotangent stays None: nothing to read
        ctx.meta = (float(scale), with_var, C, CS, blocks)
        return o, (var if with_var else None), M_T, J_T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, v, beta, b, g, ip, ck_M, ck_J = ctx.saved_tensors
        scale, with_var, C, CS, blocks = ctx.meta
        B, T, H, K = q.shape
        V = v.shape[-1]
        BH = B * H
        dt = ck_M.dtype
        NS = ck_M.shape[1]
        _, _, BK, BV = blocks
        NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
        dev = q.device
        per_v = b.dim() == 4
        do = torch.zeros(B, T, H, V, dtype=dt, device=dev) if do is None else do.contiguous()
        has_dvar = with_var and dvar is not None
        has_dfinal = dM_T is not None or dJ_T is not None
        if has_dfinal:
            dM_T = torch.zeros(BH, V, K, dtype=dt, device=dev) if dM_T is None else dM_T.to(dt).contiguous()
            dJ_T = torch.zeros(BH, V, K, dtype=dt, device=dev) if dJ_T is None else dJ_T.to(dt).contiguous()
        dq = torch.empty(NV, B, T, H, K, dtype=dt, device=dev)
        dk = torch.empty(NV, B, T, H, K, dtype=dt, device=dev)
        dbv = torch.empty(NK, B, T, H, V, dtype=dt, device=dev)
        db = torch.empty(*((NK, B, T, H, V) if per_v else (NK * NV, B, T, H)), dtype=dt, device=dev)
        dg = torch.empty(NK * NV, B, T, H, dtype=dt, device=dev)
        dM0, dJ0 = torch.empty(BH, V, K, dtype=dt, device=dev), torch.empty(BH, V, K, dtype=dt, device=dev)
        _pv_bwd_kernel[(NK, NV, BH)](
            q, k, v, q if beta is None else beta, b, q if g is None else g, ip, ck_M, ck_J, do,
            dvar.contiguous() if has_dvar else do, dM_T if has_dfinal else do, dJ_T if has_dfinal else do,
            dq, dk, dbv, db, dg, dM0, dJ0, scale, T, NS, H=H, K=K, V=V, BK=BK, BV=BV, C=C, CS=CS,
            HAS_BETA=beta is not None, BETA_PER_V=beta is not None and beta.dim() == 4, B_PER_V=per_v,
            HAS_G=g is not None, HAS_DVAR=has_dvar, HAS_DFINAL=has_dfinal,
            DTYPE=tl.float64 if dt == torch.float64 else tl.float32, num_warps=BWD_WARPS)
        dbv = dbv.sum(0)  # d(β v)
        dv = dbv if beta is None else dbv * (beta if beta.dim() == 4 else beta[..., None])
        dbeta = None
        if beta is not None:
            dbeta = dbv * v if beta.dim() == 4 else (dbv * v).sum(-1)
            dbeta = dbeta.to(beta.dtype)
        dgs = None if g is None else dg.sum(0).to(g.dtype)
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.to(v.dtype), dbeta, db.sum(0).to(b.dtype), dgs,
                dM0, dJ0, None, None, None, None, None, None)


def per_value_run(call: ScanCall, segment: int = SEGMENT, sub_chunk: int = SUB_CHUNK,
                  block_k: Optional[int] = None, block_v: Optional[int] = None) -> ScanResult:
    """Palimpsa (``dot_diag`` / diagonal, scalar or no forgetting) with any ``b`` by the per-value Triton
    kernels (a validated :class:`~metaplastic.kernels.entry.ScanCall`). ``segment``: tokens between the
    saved states (a multiple of ``sub_chunk``, a power of two)."""
    reason = per_value_reason(call.objective) or triton_unavailable_reason(call.q.device)
    if reason is not None:
        raise ValueError(reason)
    if segment % sub_chunk:
        raise ValueError(f"segment ({segment}) must be a multiple of sub_chunk ({sub_chunk})")
    if call.ip_requires_grad and call.needs_grad():
        return reference_scan(call.objective, call.q, call.k, call.v, **call.kwargs())
    call = call.with_b_per_value()
    return by_sequence(call, lambda c: _dense(c, segment, sub_chunk, block_k, block_v))


def _dense(c: ScanCall, C: int, CS: int, block_k, block_v) -> ScanResult:
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
    o, var, M_T, J_T = PerValuePalimpsa.apply(q, k, v, beta, b, g, M0, J0, ip, c.scale, c.output_variance, C, CS,
                                              _blocks(K, V, block_k, block_v))
    final = None
    if c.output_final_state:
        I_T = J_T.view(B, H, V, K) + Ip
        final = {"mu": M_T.view(B, H, V, K) / I_T, "I": I_T}
    return ScanResult(o, final, var)
