"""The fused recurrent Triton kernel: every registry entry, token by token, forward and backward.

``fused_recurrent_scan`` has exactly :func:`metaplastic.scan`'s signature and result (plus ``cg_steps``,
``checkpoint_every`` and ``block_v``). One ``@triton.jit`` forward kernel runs every objective; it is
specialised by the ``tl.constexpr`` switches of :func:`metaplastic.kernels.flags.kernel_flags`
(posterior, row form of the update, forgetting) and by the inputs (β and b per head or per value row,
variance, initial / final state, checkpoints).

Layout. Inputs are ``[B, T, H, D]``; internally every batch is a packed varlen batch ``[1, B·T, H, D]``
with ``cu_seqlens = [0, T, 2T, …]``, so the varlen and dense cases share one code path. States are
value-first ``[N, H, V, K]`` (full posterior: ``H`` is ``[N, H, K, K]``).

Point and diagonal posteriors: every value row of the state evolves on its own (residual, Sherman–Morrison
factor ``c`` and read-out are all per row), so a program owns ``BV`` value rows and all ``K`` columns of
one (sequence, head): grid ``(cdiv(V, BV), N·H)``; the state block stays in registers for the whole
sequence (BV = 16 at K = 128). The forward stores the state every ``checkpoint_every`` tokens (the only
thing saved for the backward, besides the inputs); the backward (``fused_recurrent_bwd.py``) walks the
segments in reverse, recomputes a segment's states from its checkpoint and back-propagates through each
step by hand-derived vector–Jacobian products.

Full posterior (MesaNet): one program per (sequence, head) holds ``G [V, K]`` and ``H [K, K]`` and solves
``(H + diag λ) x = q`` by ``cg_steps`` conjugate-gradient steps warm-started from the previous token's
``x`` (``None``: ``K`` steps, exact in exact arithmetic), or as a :class:`~metaplastic.ReadoutSolver` with
``method='cg'`` asks (steps, a zero / previous / diagonal start, fla's ``+ε`` denominators). Its gradients fall back to autograd through
:func:`metaplastic.scan` (an exact solve).

Precision: fp16 / bf16 / fp32 inputs are computed in fp32, fp64 inputs in fp64 (as the reference scan);
the state, the variance and the gradients of the gates are kept in the compute dtype, the output has q's
dtype and each gradient its input's dtype.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import triton
import triton.language as tl

from metaplastic.objective import Objective
from metaplastic.readout_solver import CG_STARTS, ReadoutSolver
from metaplastic.scan import ScanResult
from metaplastic.scan import scan as reference_scan

from . import chunk_triton
from .entry import ScanCall, prepare, triton_unavailable_reason
from .flags import DIAGONAL, FULL, POINT, kernel_flags
from .recurrent_step import _advance, _Plan, register_ceiling

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------------
# Full posterior: recursive least squares, read out by conjugate gradients
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _cg(Hm, lam_k, rhs, x, STEPS: tl.constexpr, EPS: tl.constexpr):
    """``STEPS`` conjugate-gradient steps on ``(Hm + diag lam_k) x = rhs`` (Hm ``[BK, BK]``, the system SPD) from
    the guess ``x``; ``EPS`` added to both denominators (0: plain CG, where a zero denominator means convergence
    and gives a zero step). The diagonal is applied as a vector, so no second ``[BK, BK]`` tile is live."""
    r = rhs - (tl.sum(Hm * x[None, :], 1) + lam_k * x)
    p = r
    rr = tl.sum(r * r)
    for _ in range(0, STEPS):
        Ap = tl.sum(Hm * p[None, :], 1) + lam_k * p
        pAp = tl.sum(p * Ap)
        if EPS > 0:
            alpha = rr / (pAp + EPS)
        else:
            alpha = rr / tl.maximum(pAp, 1e-30)  # pAp = 0 only when r = p = 0 (converged): alpha = 0
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = tl.sum(r * r)
        if EPS > 0:
            p = r + (rr_new / (rr + EPS)) * p
        else:
            p = r + (rr_new / tl.maximum(rr, 1e-30)) * p
        rr = rr_new
    return x


@triton.jit
def _full_fwd(q, k, v, g, beta, lam, h0_1, h0_2, o, var, ht_1, ht_2, bos, eos, i_nh, i_h, scale,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              CG_STEPS: tl.constexpr, CG_START: tl.constexpr, CG_EPS: tl.constexpr, FORGET: tl.constexpr,
              HAS_BETA: tl.constexpr, OUTPUT_VAR: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
              DTYPE: tl.constexpr):
    """MesaNet: ``G = αG + β v⊗k``, ``H = αH + β k⊗k``, ``o = scale · G (H + diag λ)^{-1} q``, the solve by
    ``CG_STEPS`` CG steps from ``CG_START`` (0: zero, 1: the previous token's solution, 2: ``q / (diag P + ε)``)."""
    o_k = tl.arange(0, BK)
    o_v = tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_vk = m_v[:, None] & m_k[None, :]
    m_kk = m_k[:, None] & m_k[None, :]
    p_g = i_nh * V * K + o_v[:, None] * K + o_k[None, :]
    p_h = i_nh * K * K + o_k[:, None] * K + o_k[None, :]
    G = tl.zeros([BV, BK], dtype=DTYPE)
    Hm = tl.zeros([BK, BK], dtype=DTYPE)
    if HAS_INIT:
        G = tl.load(h0_1 + p_g, mask=m_vk, other=0.).to(DTYPE)
        Hm = tl.load(h0_2 + p_h, mask=m_kk, other=0.).to(DTYPE)
    # λ; padded keys get 1 so the padded system stays SPD (their q is 0, so their x is 0)
    lam_k = tl.load(lam + i_h * K + o_k, mask=m_k, other=1.).to(DTYPE)
    x = tl.zeros([BK], dtype=DTYPE)
    for t in range(bos, eos):
        p_k = (t * H + i_h) * K + o_k
        p_v = (t * H + i_h) * V + o_v
        qt = tl.load(q + p_k, mask=m_k, other=0.).to(DTYPE)
        kt = tl.load(k + p_k, mask=m_k, other=0.).to(DTYPE)
        vt = tl.load(v + p_v, mask=m_v, other=0.).to(DTYPE)
        if HAS_BETA:
            bt = tl.load(beta + t * H + i_h).to(DTYPE)
        else:
            bt = 1.
        if FORGET == 1:
            at = tl.exp(tl.load(g + t * H + i_h).to(DTYPE))
            G = at * G
            Hm = at * Hm
        G = G + bt * vt[:, None] * kt[None, :]
        Hm = Hm + bt * kt[:, None] * kt[None, :]
        if CG_START == 0:
            x = tl.zeros([BK], dtype=DTYPE)
        elif CG_START == 2:
            x = qt / (tl.sum(tl.where(o_k[:, None] == o_k[None, :], Hm, 0.), 1) + lam_k + CG_EPS)
        x = _cg(Hm, lam_k, qt, x, CG_STEPS, CG_EPS)
        tl.store(o + p_v, (scale * tl.sum(G * x[None, :], 1)).to(o.dtype.element_ty), mask=m_v)
        if OUTPUT_VAR:
            tl.store(var + p_v, tl.zeros([BV], dtype=DTYPE) + scale * scale * tl.sum(qt * x), mask=m_v)
    if STORE_FINAL:
        tl.store(ht_1 + p_g, G, mask=m_vk)
        tl.store(ht_2 + p_h, Hm, mask=m_kk)


# ----------------------------------------------------------------------------------------------------
# The forward kernel
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_token(q, k, v, g, beta, b, o, var, s1, s2, t, i_h, o_k, o_v, m_k, m_v, ip, scale,
               H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, FORGET: tl.constexpr, HAS_BETA: tl.constexpr,
               BETA_PER_V: tl.constexpr, HAS_B: tl.constexpr, B_PER_V: tl.constexpr, OUTPUT_VAR: tl.constexpr,
               DTYPE: tl.constexpr):
    """Token ``t`` (point and diagonal posteriors): the state rows ``(s1, s2)`` ``[BV, BK]`` after it; writes
    its read-out (and variance)."""
    qt, s1, s2 = _advance(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v, s1, s2, ip, H, K, V, BK, BV,
                          POSTERIOR, UPDATE, FORGET, HAS_BETA, BETA_PER_V, HAS_B, B_PER_V, DTYPE)
    p_o = (t * H + i_h) * V + o_v
    tl.store(o + p_o, (scale * tl.sum(s1 * qt[None, :], 1)).to(o.dtype.element_ty), mask=m_v)
    if OUTPUT_VAR:
        tl.store(var + p_o, scale * scale * tl.sum((qt * qt)[None, :] / s2, 1), mask=m_v)
    return s1, s2


@triton.jit
def fused_recurrent_fwd_kernel(
        q, k, v, g, beta, b, ip_ptr, lam, scale_ptr, h0_1, h0_2, o, var, ht_1, ht_2, ck_1, ck_2,
        cu_seqlens, seg_offsets,
        H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        C: tl.constexpr, CG_STEPS: tl.constexpr, CG_START: tl.constexpr, CG_EPS: tl.constexpr,
        POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, FORGET: tl.constexpr,
        HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr, HAS_B: tl.constexpr, B_PER_V: tl.constexpr,
        OUTPUT_VAR: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
        SAVE_CKPT: tl.constexpr, DTYPE: tl.constexpr):
    """Grid ``(cdiv(V, BV), N·H)``. Writes ``o`` (and ``var``, the final state, and the state at the start
    of every ``C``-token segment into ``ck_*[seg_offsets[n] + s]`` when asked)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    scale = tl.load(scale_ptr).to(DTYPE)
    if POSTERIOR == 2:
        _full_fwd(q, k, v, g, beta, lam, h0_1, h0_2, o, var, ht_1, ht_2, bos, eos, i_nh, i_h, scale,
                  H, K, V, BK, BV, CG_STEPS, CG_START, CG_EPS, FORGET, HAS_BETA, OUTPUT_VAR, HAS_INIT,
                  STORE_FINAL, DTYPE)
    else:
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k = o_k < K
        m_v = o_v < V
        m_vk = m_v[:, None] & m_k[None, :]
        p_s = i_nh * V * K + o_v[:, None] * K + o_k[None, :]
        ip = tl.load(ip_ptr + i_h).to(DTYPE)
        s1 = tl.zeros([BV, BK], dtype=DTYPE)  # S (point) or mu (diagonal)
        s2 = tl.zeros([BV, BK], dtype=DTYPE) + ip  # I (diagonal); padded entries keep Ip > 0
        if HAS_INIT:
            s1 = tl.load(h0_1 + p_s, mask=m_vk, other=0.).to(DTYPE)
            if POSTERIOR == 1:
                s2 = tl.where(m_vk, tl.load(h0_2 + p_s, mask=m_vk, other=1.).to(DTYPE), ip)
        if SAVE_CKPT:
            seg0 = tl.load(seg_offsets + i_n).to(tl.int64)
            for i_s in range(0, tl.cdiv(eos - bos, C)):
                p_c = ((seg0 + i_s) * H + i_h) * V * K + o_v[:, None] * K + o_k[None, :]
                tl.store(ck_1 + p_c, s1, mask=m_vk)
                if POSTERIOR == 1:
                    tl.store(ck_2 + p_c, s2, mask=m_vk)
                t0 = bos + i_s * C
                for t in range(t0, tl.minimum(t0 + C, eos)):
                    s1, s2 = _fwd_token(q, k, v, g, beta, b, o, var, s1, s2, t, i_h, o_k, o_v, m_k, m_v, ip, scale,
                                        H, K, V, BK, BV, POSTERIOR, UPDATE, FORGET, HAS_BETA, BETA_PER_V, HAS_B,
                                        B_PER_V, OUTPUT_VAR, DTYPE)
        else:  # one loop over the tokens: no segment bookkeeping live across it
            for t in range(bos, eos):
                s1, s2 = _fwd_token(q, k, v, g, beta, b, o, var, s1, s2, t, i_h, o_k, o_v, m_k, m_v, ip, scale,
                                    H, K, V, BK, BV, POSTERIOR, UPDATE, FORGET, HAS_BETA, BETA_PER_V, HAS_B,
                                    B_PER_V, OUTPUT_VAR, DTYPE)
        if STORE_FINAL:
            tl.store(ht_1 + p_s, s1, mask=m_vk)
            if POSTERIOR == 1:
                tl.store(ht_2 + p_s, s2, mask=m_vk)


# ----------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------

def _block_v(posterior: int, BK: int, V: int, block_v: Optional[int], backward: bool = False) -> int:
    """Value rows per program: at K = 128 (fp32, 4 warps) 16 for the forward and 8 for the backward, which
    ptxas fits in registers (the few values it spills: ``recurrent_step.REGISTER_CEILINGS``)."""
    if posterior == FULL:
        return triton.next_power_of_2(V)
    if block_v is None:
        block_v = max(4, (1024 if backward else 2048) // BK)
    return min(triton.next_power_of_2(V), block_v)


def _num_warps_fwd(posterior: int, BK: int, BV: int) -> int:
    """Warps of a forward program. The full posterior keeps ``G [BV, BK]`` and ``H [BK, BK]`` of one head in
    registers: at K = V = 128 that is 32 warps (32 fp32 state values a thread, 64 registers, no spills on
    sm_90a or sm_80; 16 warps spill). The point and diagonal posteriors' ``BV`` rows fit 4 warps."""
    if posterior != FULL:
        return 4
    size = BK * max(BK, BV)
    return 32 if size >= 128 * 128 else 16 if size >= 128 * 64 else 4


def _launch_fwd(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], beta: Optional[Tensor],
                b: Optional[Tensor], h0_1: Optional[Tensor], h0_2: Optional[Tensor], save_ckpt: bool):
    """Run the forward kernel on packed ``[B·T, H, D]`` inputs; returns o, var, ht_1, ht_2, ck_1, ck_2."""
    TT, H, K, V, N, dt = q.shape[0], plan.H, plan.K, plan.V, plan.N, plan.dtype
    post = plan.flags["POSTERIOR"]
    dev = q.device
    o = torch.empty(TT, H, V, dtype=q.dtype, device=dev)
    var = torch.empty(TT, H, V, dtype=dt, device=dev) if plan.output_variance else None
    ht_1 = ht_2 = ck_1 = ck_2 = None
    if plan.output_final_state:
        ht_1 = torch.empty(N, H, V, K, dtype=dt, device=dev)
        if post == DIAGONAL:
            ht_2 = torch.empty(N, H, V, K, dtype=dt, device=dev)
        elif post == FULL:
            ht_2 = torch.empty(N, H, K, K, dtype=dt, device=dev)
    if save_ckpt:
        ck_1 = torch.empty(plan.n_segments, H, V, K, dtype=dt, device=dev)
        if post == DIAGONAL:
            ck_2 = torch.empty(plan.n_segments, H, V, K, dtype=dt, device=dev)
    dummy = q
    grid = (plan.NV, N * H)
    num_warps = _num_warps_fwd(post, plan.BK, plan.BV)
    constexprs = dict(
        H=H, K=K, V=V, BK=plan.BK, BV=plan.BV, C=plan.C, CG_STEPS=plan.cg_steps,
        CG_START=plan.cg_start, CG_EPS=plan.cg_eps, **plan.flags,
        HAS_BETA=beta is not None, BETA_PER_V=plan.beta_per_v, HAS_B=b is not None, B_PER_V=plan.b_per_v,
        OUTPUT_VAR=plan.output_variance, HAS_INIT=h0_1 is not None, STORE_FINAL=plan.output_final_state,
        SAVE_CKPT=save_ckpt, DTYPE=tl.float64 if dt == torch.float64 else tl.float32)
    fused_recurrent_fwd_kernel[grid](
        q, k, v, dummy if g is None else g, dummy if beta is None else beta, dummy if b is None else b,
        plan.ip, dummy if plan.lam is None else plan.lam, plan.scale,
        dummy if h0_1 is None else h0_1, dummy if h0_2 is None else h0_2, o, dummy if var is None else var,
        dummy if ht_1 is None else ht_1, dummy if ht_2 is None else ht_2,
        dummy if ck_1 is None else ck_1, dummy if ck_2 is None else ck_2, plan.cu_seqlens, plan.seg_offsets,
        **constexprs, num_warps=num_warps,
        **register_ceiling("fwd", chunk_triton.device_capability(q), constexprs))
    return o, var, ht_1, ht_2, ck_1, ck_2


class FusedRecurrentFunction(torch.autograd.Function):
    """Point and diagonal posteriors: forward by the kernel, saving only the inputs and the checkpoints;
    backward by ``fused_recurrent_bwd``. Inputs are packed ``[B·T, H, D]`` tensors (None where absent)."""

    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, g, beta, b, h0_1, h0_2):
        o, var, ht_1, ht_2, ck_1, ck_2 = _launch_fwd(plan, q, k, v, g, beta, b, h0_1, h0_2, save_ckpt=True)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, g, beta, b, h0_1, h0_2, ck_1, ck_2)
        ctx.set_materialize_grads(False)
        return o, var, ht_1, ht_2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dvar, dht_1, dht_2):
        from .fused_recurrent_bwd import launch_bwd

        q, k, v, g, beta, b, h0_1, h0_2, ck_1, ck_2 = ctx.saved_tensors
        grads = launch_bwd(ctx.plan, q, k, v, g, beta, b, h0_1, h0_2, ck_1, ck_2, do, dvar, dht_1, dht_2)
        return (None,) + grads


def _pack(x: Optional[Tensor]) -> Optional[Tensor]:
    """``[B, T, ...] -> [B·T, ...]`` contiguous."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def fused_recurrent_scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *,
                         log_decay: Optional[Tensor] = None, beta: Optional[Tensor] = None,
                         b: Optional[Tensor] = None, prior_precision: Union[float, Tensor] = 1.0,
                         lam: Optional[Tensor] = None, scale: float = 1.0,
                         initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
                         output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
                         cg_steps: Optional[int] = None, checkpoint_every: int = 64,
                         block_v: Optional[int] = None, readout: Optional[ReadoutSolver] = None) -> ScanResult:
    """:func:`metaplastic.scan` by the fused recurrent Triton kernel (same arguments, same result).

    Extra arguments:
        cg_steps: conjugate-gradient steps per token for the full posterior's read-out (None: K, exact in
            exact arithmetic; CG is warm-started from the previous token's solution).
        checkpoint_every: tokens between the states saved for the backward (64 keeps the diagonal
            posterior at 2 KB per token and head for K = V = 128 in fp32).
        block_v: value rows per program, forward and backward (a power of two; None picks 16 for the
            forward and 8 for the backward at K = 128).

    Gradients flow to q, k, v, log_decay, beta, b and the initial state through the hand-written backward.
    Two cases fall back to autograd through :func:`metaplastic.scan` when a gradient is needed: the full
    posterior, and a ``prior_precision`` tensor that requires grad. Runs on CUDA tensors, or on CPU tensors
    under ``TRITON_INTERPRET=1`` (set before triton is imported).
    """
    call = prepare(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                   lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                   output_variance=output_variance, cu_seqlens=cu_seqlens, readout=readout)
    return fused_recurrent_run(call, cg_steps, checkpoint_every, block_v)


def fused_recurrent_run(call: ScanCall, cg_steps: Optional[int] = None, checkpoint_every: int = 64,
                        block_v: Optional[int] = None) -> ScanResult:
    """:func:`fused_recurrent_scan` on a validated :class:`~metaplastic.kernels.entry.ScanCall`."""
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if cg_steps is not None and not (isinstance(cg_steps, int) and cg_steps >= 1):
        raise ValueError(f"cg_steps must be None or a positive int, got {cg_steps!r}")
    if block_v is not None and not (isinstance(block_v, int) and block_v >= 1 and block_v & (block_v - 1) == 0):
        raise ValueError(f"block_v must be a power of two, got {block_v!r}")
    reason = triton_unavailable_reason(call.q.device)
    if reason is not None:
        raise ValueError(reason)
    call = call.with_b_per_value()  # grouped b: one rate per value row
    objective, q, k, v = call.objective, call.q, call.k, call.v
    log_decay, beta, b, lam = call.log_decay, call.beta, call.b, call.lam
    initial_state, output_final_state = call.initial_state, call.output_final_state
    output_variance = call.output_variance
    needs_grad = call.needs_grad()
    if needs_grad and (objective.posterior == "full" or call.ip_requires_grad):
        return reference_scan(objective, q, k, v, **call.kwargs())

    flags = kernel_flags(objective)
    B, T, H, K = q.shape
    if call.readout is None:  # exact: K warm-started plain CG steps (exact in exact arithmetic)
        steps, start, eps = K if cg_steps is None else cg_steps, 1, 0.0
    else:
        if cg_steps is not None:
            raise ValueError(f"cg_steps={cg_steps} conflicts with readout {call.readout.describe()}: give one")
        steps, start, eps = (call.readout.cg_steps, CG_STARTS.index(call.readout.cg_start),
                             float(call.readout.cg_eps))
    V = v.shape[-1]
    dt = call.dtype
    dev = q.device
    C = checkpoint_every
    if call.bounds is None:
        N = B
        cu = torch.arange(0, B + 1, dtype=torch.int32, device=dev) * T
        seg_offsets = torch.arange(0, B, dtype=torch.int32, device=dev) * triton.cdiv(T, C)
        n_segments = B * triton.cdiv(T, C)
    else:
        bounds = call.bounds
        N = len(bounds) - 1
        nseg = [triton.cdiv(e - s, C) for s, e in zip(bounds[:-1], bounds[1:])]
        offsets = [sum(nseg[:i]) for i in range(N)]
        cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
        seg_offsets = torch.tensor(offsets, dtype=torch.int32, device=dev)
        n_segments = sum(nseg)
    BK = triton.next_power_of_2(K)
    plan = _Plan(
        flags=flags, B=B, T=T, H=H, K=K, V=V, N=N, BK=BK, BV=_block_v(flags["POSTERIOR"], BK, V, block_v),
        BV_bwd=_block_v(flags["POSTERIOR"], BK, V, block_v, backward=True), C=C,
        cg_steps=steps, cg_start=start, cg_eps=eps, dtype=dt,
        ip=call.prior_precision.detach().contiguous(),
        scale=torch.tensor([call.scale], dtype=dt, device=dev),
        lam=None if lam is None else lam.detach().to(dt).contiguous(),
        cu_seqlens=cu, seg_offsets=seg_offsets, n_segments=max(n_segments, 1),
        output_variance=output_variance, output_final_state=output_final_state,
        beta_per_v=beta is not None and beta.dim() == 4, b_per_v=b is not None and b.dim() == 4)

    keys = {POINT: ("S",), DIAGONAL: ("mu", "I"), FULL: ("G", "H")}[flags["POSTERIOR"]]
    h0 = [None, None] if initial_state is None else [initial_state[key].contiguous() for key in keys] + [None]
    args = (_pack(q), _pack(k), _pack(v), _pack(log_decay), _pack(beta), _pack(b), h0[0], h0[1])
    if needs_grad:
        # the Function needs its final-state outputs to exist for their cotangents
        o, var, ht_1, ht_2 = FusedRecurrentFunction.apply(plan, *args)
    else:
        o, var, ht_1, ht_2, _, _ = _launch_fwd(plan, *args, save_ckpt=False)
    output = o.view(B, T, H, V)
    variance = None if var is None else var.view(B, T, H, V)
    final = None
    if output_final_state:
        final = {key: x for key, x in zip(keys, (ht_1, ht_2))}
    return ScanResult(output, final, variance)
