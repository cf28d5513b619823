"""Backward of the fused recurrent kernel (point and diagonal posteriors).

A program owns ``BV`` value rows of one (sequence, head), as in the forward (with its own, smaller
``BV``: the backward keeps more tensors live). It walks the checkpoint
segments in reverse: it reloads the segment's first state, recomputes the segment's states (written to a
per-program scratch buffer of ``C`` steps), then goes back through the segment token by token, applying
the vector–Jacobian products of the read-out, of the update and of the prior. The cotangents of the state
(``ds1`` for S / mu, ``ds2`` for I) are carried in registers across the whole sequence.

VJPs (row form of ``flags.py``; ``u`` is the cotangent of ``mu``, ``w`` the one of ``P``):

- read-out ``o = s Σ_j mu q``, ``var = s² Σ_j q² / P``:
  ``u += s do ⊗ q``; ``dq = s Σ_i do mu + 2 s² q Σ_i dvar / P``; ``w −= s² dvar ⊗ q² / P²``.
- HEBBIAN ``mu = (P⁻ m + β v⊗k) / P``: with ``n = u / P``: ``dm = n P⁻``, ``dP⁻ = n m``,
  ``w −= u mu / P``, ``dβ = v Σ_j n k``, ``dv = β Σ_j n k``, ``dk = Σ_i n β v``.
- GRADIENT ``mu = m + β r k / P``, ``r = v − m k``: with ``e = u / P``: ``dr = β Σ_j e k``,
  ``dβ = r Σ_j e k``, ``dk = Σ_i e β r``, ``w −= e β r k / P``; then the residual's VJP.
- EXACT ``mu = m + c r d`` / EXACT_DIAG ``mu = m + c d ∘ ρ`` (``ρ = v − k ∘ m``), ``d = k / P⁻``,
  ``c = β / (1 + β d·k)``: ``dc = Σ_j u d r``, ``dd = u c r`` (and the residual's VJP), then
  ``dβ = dc / (1 + β d·k)²``, ``ds = −dc c²``, ``dd += ds k``, ``dk += Σ_i ds d + Σ_i dd / P⁻``,
  ``dP⁻ = −dd d / P⁻``.
- ``P = P⁻ + b k²``: ``dP⁻ += w``, ``db = Σ_j w k²``, ``dk += 2 k Σ_i w b``.
- prior, diagonal ``P⁻ = α I + (1 − α) Ip``, ``m = α I mu / P⁻``: with ``w' = dP⁻ − dm m / P⁻``:
  ``dmu_prev = dm α I / P⁻``, ``dI_prev = w' α + dm α mu / P⁻``, ``dα = w' (I − Ip) + dm I mu / P⁻``;
  point ``m = α S``: ``dS_prev = α dm``, ``dα = dm S``. Then ``dg = dα α``.

Partial sums over value rows (dq, dk, dg, and β or b when shared by the head) are written per value block
``[NV, ...]`` and summed on the host.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import chunk_triton
from .flags import DIAGONAL
from .recurrent_step import _advance, _load_token, _Plan, _prior, _update, register_ceiling

Tensor = torch.Tensor


@triton.jit
def _update_bwd(u, w, m, Pm, P, mu, kt, vt, bt, bb, POSTERIOR: tl.constexpr, UPDATE: tl.constexpr):
    """VJP of ``_update``: cotangents (u of mu, w of P) -> (dm, dP⁻, dk [BK], dv, dβ, db [BV]).

    For the point posterior dP⁻ and db are placeholders (the precision is the constant Ip)."""
    k_ = kt[None, :]
    dm = u
    if UPDATE == 0:
        n = u / P
        nk = tl.sum(n * k_, 1)
        dm = n * Pm
        dPm = n * m
        w = w - u * mu / P
        dbeta = vt * nk
        dv = bt * nk
        dk = tl.sum(n * (bt * vt)[:, None], 0)
    elif UPDATE == 1:
        e = u / P
        ek = tl.sum(e * k_, 1)
        r = vt - tl.sum(m * k_, 1)
        dr = bt * ek
        dbeta = r * ek
        dk = tl.sum(e * (bt * r)[:, None], 0) - tl.sum(dr[:, None] * m, 0)
        w = w - e * (bt * r)[:, None] * k_ / P
        dPm = w * 0.
        dv = dr
        dm = dm - dr[:, None] * k_
    else:
        d = k_ / Pm
        den = 1. + bt * tl.sum(d * k_, 1)
        c = bt / den
        if UPDATE == 2:
            r = vt - tl.sum(m * k_, 1)
            ud = tl.sum(u * d, 1)
            dc = ud * r
            dr = ud * c
            dd = u * (c * r)[:, None]
            dv = dr
            dm = dm - dr[:, None] * k_
            dk = -tl.sum(dr[:, None] * m, 0)
        else:
            rho = vt[:, None] - k_ * m
            dc = tl.sum(u * d * rho, 1)
            drho = u * c[:, None] * d
            dd = u * c[:, None] * rho
            dv = tl.sum(drho, 1)
            dm = dm - drho * k_
            dk = -tl.sum(drho * m, 0)
        dbeta = dc / (den * den)
        ds = -dc * c * c
        dd = dd + ds[:, None] * k_
        dk = dk + tl.sum(ds[:, None] * d, 0) + tl.sum(dd / Pm, 0)
        dPm = -dd * d / Pm
    if POSTERIOR == 1:
        dPm = dPm + w
        db = tl.sum(w * k_ * k_, 1)
        dk = dk + 2. * kt * tl.sum(w * bb[:, None], 0)
    else:
        db = dbeta * 0.
    return dm, dPm, dk, dv, dbeta, db


@triton.jit
def _prior_bwd(dm, dPm, s1, s2, m, Pm, a, ip, POSTERIOR: tl.constexpr, FORGET: tl.constexpr):
    """VJP of ``_prior``: -> cotangents of the previous state (ds1, ds2) and of α, elementwise [BV, BK]."""
    if FORGET == 0:
        ds1 = dm
        ds2 = dPm
        da = dm * 0.
    elif POSTERIOR == 0:
        ds1 = a * dm
        ds2 = dPm
        da = dm * s1
    else:
        wp = dPm - dm * m / Pm
        ds1 = dm * a * s2 / Pm
        ds2 = wp * a + dm * a * s1 / Pm
        da = wp * (s2 - ip) + dm * s2 * s1 / Pm
    return ds1, ds2, da


@triton.jit
def fused_recurrent_bwd_kernel(
        q, k, v, g, beta, b, ip_ptr, scale_ptr, ck_1, ck_2, do, dvar, dht_1, dht_2,
        dq, dk, dv, dg, dbeta, db, dh0_1, dh0_2, scr_1, scr_2, cu_seqlens, seg_offsets, TT,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        C: tl.constexpr, POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, FORGET: tl.constexpr,
        HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr, HAS_B: tl.constexpr, B_PER_V: tl.constexpr,
        HAS_DVAR: tl.constexpr, HAS_DFINAL: tl.constexpr, DTYPE: tl.constexpr):
    """Grid ``(NV, N·H)``. Writes dv ``[TT,H,V]``, partials dq, dk ``[NV,TT,H,K]``, dg ``[NV,TT,H(,K)]``,
    dβ / db (``[TT,H,V]`` per value row, ``[NV,TT,H]`` per head), and the initial state's cotangent."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    NV = tl.num_programs(0)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    scale = tl.load(scale_ptr).to(DTYPE)
    ip = tl.load(ip_ptr + i_h).to(DTYPE)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    # 32-bit offsets within a tile; the 64-bit parts are scalars added to the base pointers
    p_row = o_v[:, None] * K + o_k[None, :]  # within one [V, K] state
    p_s = i_nh * V * K + p_row
    # this program's scratch: C states of [BV, BK]
    o_scr = (i_nh * NV + i_v).to(tl.int64) * C * BV * BK
    p_tile = tl.arange(0, BV)[:, None] * BK + o_k[None, :]

    ds1 = tl.zeros([BV, BK], dtype=DTYPE)
    ds2 = tl.zeros([BV, BK], dtype=DTYPE)
    if HAS_DFINAL:
        ds1 = tl.load(dht_1 + p_s, mask=m_vk, other=0.).to(DTYPE)
        if POSTERIOR == 1:
            ds2 = tl.load(dht_2 + p_s, mask=m_vk, other=0.).to(DTYPE)
    seg0 = tl.load(seg_offsets + i_n).to(tl.int64)
    n_seg = tl.cdiv(eos - bos, C)
    for i_r in range(0, n_seg):
        i_s = n_seg - 1 - i_r
        o_c = ((seg0 + i_s) * H + i_h) * V * K
        s1 = tl.load(ck_1 + o_c + p_row, mask=m_vk, other=0.).to(DTYPE)
        s2 = tl.zeros([BV, BK], dtype=DTYPE) + ip
        if POSTERIOR == 1:
            s2 = tl.where(m_vk, tl.load(ck_2 + o_c + p_row, mask=m_vk, other=1.).to(DTYPE), ip)
        t0 = bos + i_s * C
        t1 = tl.minimum(t0 + C, eos)
        # 1) recompute the segment, storing the state *before* each token
        for t in range(t0, t1):
            tl.store(scr_1 + (o_scr + (t - t0) * BV * BK) + p_tile, s1)
            if POSTERIOR == 1:
                tl.store(scr_2 + (o_scr + (t - t0) * BV * BK) + p_tile, s2)
            _, s1, s2 = _advance(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v, s1, s2, ip, H, K, V, BK, BV,
                                 POSTERIOR, UPDATE, FORGET, HAS_BETA, BETA_PER_V, HAS_B, B_PER_V, DTYPE)
        tl.debug_barrier()
        # 2) back through the segment
        for i_t in range(0, t1 - t0):
            t = t1 - 1 - i_t
            s1 = tl.load(scr_1 + (o_scr + (t - t0) * BV * BK) + p_tile)
            if POSTERIOR == 1:
                s2 = tl.load(scr_2 + (o_scr + (t - t0) * BV * BK) + p_tile)
            qt, kt, vt, bt, bb, a = _load_token(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v, H, K, V, BK, BV,
                                                FORGET, HAS_BETA, BETA_PER_V, HAS_B, B_PER_V, DTYPE)
            m, Pm = _prior(s1, s2, a, ip, POSTERIOR, FORGET)
            mu, P = _update(m, Pm, kt, vt, bt, bb, POSTERIOR, UPDATE)
            # read-out
            p_v = (t * H + i_h) * V + o_v
            do_t = tl.load(do + p_v, mask=m_v, other=0.).to(DTYPE)
            u = ds1 + scale * do_t[:, None] * qt[None, :]
            dq_t = scale * tl.sum(do_t[:, None] * mu, 0)
            w = ds2
            if HAS_DVAR:
                dvar_t = tl.load(dvar + p_v, mask=m_v, other=0.).to(DTYPE)
                w = w - (scale * scale) * dvar_t[:, None] * (qt * qt)[None, :] / (P * P)
                dq_t = dq_t + 2. * scale * scale * qt * tl.sum(dvar_t[:, None] / P, 0)
            # update, then prior
            dm, dPm, dk_t, dv_t, dbeta_t, db_t = _update_bwd(u, w, m, Pm, P, mu, kt, vt, bt, bb, POSTERIOR, UPDATE)
            ds1, ds2_new, da = _prior_bwd(dm, dPm, s1, s2, m, Pm, a, ip, POSTERIOR, FORGET)
            if POSTERIOR == 1:
                ds2 = ds2_new
            # write this token's cotangents
            p_kp = ((i_v * TT + t) * H + i_h) * K + o_k
            p_hp = (i_v * TT + t) * H + i_h
            tl.store(dq + p_kp, dq_t, mask=m_k)
            tl.store(dk + p_kp, dk_t, mask=m_k)
            tl.store(dv + p_v, dv_t, mask=m_v)
            if FORGET == 1:
                tl.store(dg + p_hp, tl.sum(tl.where(m_vk, da * a, 0.)))
            elif FORGET == 2:
                tl.store(dg + p_kp, tl.sum(tl.where(m_vk, da * a, 0.), 0), mask=m_k)
            if HAS_BETA:
                if BETA_PER_V:
                    tl.store(dbeta + p_v, dbeta_t, mask=m_v)
                else:
                    tl.store(dbeta + p_hp, tl.sum(tl.where(m_v, dbeta_t, 0.)))
            if HAS_B:
                if B_PER_V:
                    tl.store(db + p_v, db_t, mask=m_v)
                else:
                    tl.store(db + p_hp, tl.sum(tl.where(m_v, db_t, 0.)))
        tl.debug_barrier()
    tl.store(dh0_1 + p_s, ds1, mask=m_vk)
    if POSTERIOR == 1:
        tl.store(dh0_2 + p_s, ds2, mask=m_vk)


def launch_bwd(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
               b: Optional[Tensor], h0_1: Optional[Tensor], h0_2: Optional[Tensor], ck_1: Tensor,
               ck_2: Optional[Tensor], do: Optional[Tensor], dvar: Optional[Tensor], dht_1: Optional[Tensor],
               dht_2: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Cotangents of (q, k, v, g, beta, b, h0_1, h0_2) on packed ``[B·T, H, D]`` inputs, each in its
    input's dtype (None for absent inputs)."""
    TT, H, K, V, N, NV, dt = q.shape[0], plan.H, plan.K, plan.V, plan.N, plan.NV_bwd, plan.dtype
    dev = q.device
    diag = plan.flags["POSTERIOR"] == DIAGONAL
    forget = plan.flags["FORGET"]
    if do is None:
        do = torch.zeros(TT, H, V, dtype=dt, device=dev)
    dq = torch.empty(NV, TT, H, K, dtype=dt, device=dev)
    dk = torch.empty(NV, TT, H, K, dtype=dt, device=dev)
    dv = torch.empty(TT, H, V, dtype=dt, device=dev)
    dg = None
    if forget == 1:
        dg = torch.empty(NV, TT, H, dtype=dt, device=dev)
    elif forget == 2:
        dg = torch.empty(NV, TT, H, K, dtype=dt, device=dev)
    dbeta = None if beta is None else torch.empty(*((TT, H, V) if plan.beta_per_v else (NV, TT, H)), dtype=dt,
                                                  device=dev)
    db = None if b is None else torch.empty(*((TT, H, V) if plan.b_per_v else (NV, TT, H)), dtype=dt, device=dev)
    dh0_1 = torch.empty(N, H, V, K, dtype=dt, device=dev)
    dh0_2 = torch.empty(N, H, V, K, dtype=dt, device=dev) if diag else None
    scr_1 = torch.empty(N * H * NV, plan.C, plan.BV_bwd, plan.BK, dtype=dt, device=dev)
    scr_2 = torch.empty_like(scr_1) if diag else None
    has_dfinal = dht_1 is not None or dht_2 is not None
    if has_dfinal:
        dht_1 = torch.zeros(N, H, V, K, dtype=dt, device=dev) if dht_1 is None else dht_1.contiguous()
        if diag and dht_2 is None:
            dht_2 = torch.zeros(N, H, V, K, dtype=dt, device=dev)
        dht_2 = None if dht_2 is None else dht_2.contiguous()
    dummy = q
    constexprs = dict(
        H=H, K=K, V=V, BK=plan.BK, BV=plan.BV_bwd, C=plan.C, **plan.flags,
        HAS_BETA=beta is not None, BETA_PER_V=plan.beta_per_v, HAS_B=b is not None, B_PER_V=plan.b_per_v,
        HAS_DVAR=dvar is not None and plan.output_variance, HAS_DFINAL=has_dfinal,
        DTYPE=tl.float64 if dt == torch.float64 else tl.float32)
    fused_recurrent_bwd_kernel[(NV, N * H)](
        q, k, v, dummy if g is None else g, dummy if beta is None else beta, dummy if b is None else b,
        plan.ip, plan.scale, ck_1, dummy if ck_2 is None else ck_2, do.contiguous(),
        dummy if dvar is None else dvar.contiguous(), dummy if dht_1 is None else dht_1,
        dummy if dht_2 is None else dht_2, dq, dk, dv, dummy if dg is None else dg,
        dummy if dbeta is None else dbeta, dummy if db is None else db, dh0_1, dummy if dh0_2 is None else dh0_2,
        scr_1, dummy if scr_2 is None else scr_2, plan.cu_seqlens, plan.seg_offsets, TT, **constexprs,
        **register_ceiling("bwd", chunk_triton.device_capability(q), constexprs))

    def cast(x: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
        return None if like is None else x.to(like.dtype)

    dq, dk = dq.sum(0), dk.sum(0)
    if dg is not None:
        dg = dg.sum(0)
    if dbeta is not None and not plan.beta_per_v:
        dbeta = dbeta.sum(0)
    if db is not None and not plan.b_per_v:
        db = db.sum(0)
    return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dg, g), cast(dbeta, beta), cast(db, b),
            cast(dh0_1, h0_1), cast(dh0_2, h0_2))
