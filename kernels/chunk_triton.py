"""The chunked path with a Triton forward, for the GPU (``dot``; ``dot_diag`` with a head-shared ``b``).

Two kernels compute the gated linear-attention read of :class:`metaplastic.kernels.chunk.ChunkDot`
(``S_t = exp(g_t) S_{t-1} + v_t ⊗ k_t``, ``o_t = scale · S_t q_t``, one decay per head and token):

1. ``_chunk_states_kernel``, one program per (key tile, value tile, sequence·head): walks the chunks in
   order and writes the state at every chunk boundary, ``S ← exp(G_C) S + vᵀ (k ∘ exp(G_C − G))``;
2. ``_chunk_output_kernel``, one program per (chunk, sequence·head, value tile), all in parallel:
   ``o = scale · [(q ∘ exp(G)) S_startᵀ + ((q kᵀ) ∘ D) v]`` with ``D[t, s] = exp(G_t − G_s)`` for ``s ≤ t``
   (the key dimension in tiles, accumulated).

Palimpsa with a head-shared ``b`` is this read with the query ``q ⊘ I_t`` (THEORY.md limit 7); ``I_t``
(``[B,H,T,K]``) comes from the torch :class:`~metaplastic.kernels.chunk.DecayedScan`. Everything around
the read (``β v``, ``q ⊘ I``, the variance) is the torch glue of :mod:`metaplastic.kernels.chunk`.

Backward: the hand-written torch backward of ``ChunkDot`` (chunked matmuls, runs on the GPU), fed with the
boundary states the forward kernel saved. Not covered (use the fused recurrent kernel): vector forgetting
(GLA), ``b`` per value channel, likelihoods other than ``dot`` / ``dot_diag``. The kernels compute in
float32 (``tl.dot`` uses TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set); fp16/bf16/fp64
inputs are converted.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch
import triton
import triton.language as tl

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult

from .chunk import ChunkDot, chunk_scan
from .dispatch import triton_chunk_reason

Tensor = torch.Tensor


@triton.jit
def _chunk_states_kernel(k, v, G, h0, states, T, Tp, N, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                         BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``states[bh, n] = S`` at the start of chunk ``n`` (``n = N``: the final state), one ``[BV, BK]`` tile of
    it per program. Layouts: ``k [BH,T,K]``, ``v [BH,T,V]``, ``G [BH,Tp]`` (log-decay cumulated inside each
    chunk), ``h0 [BH,V,K]``, ``states [BH,N+1,V,K]``."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    m_kv = (o_v[:, None] < V) & (o_k[None, :] < K)
    p_vk = o_v[:, None] * K + o_k[None, :]
    S = tl.load(h0 + i_bh * V * K + p_vk, mask=m_kv, other=0.0).to(tl.float32)
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
        S = S * tl.exp(g_last) + tl.dot(tl.trans(vc), kd, input_precision=PRECISION)
    tl.store(states + (i_bh * (N + 1) + N) * V * K + p_vk, S, mask=m_kv)


@triton.jit
def _chunk_output_kernel(q, k, v, G, states, o, scale, T, Tp, N, K: tl.constexpr, V: tl.constexpr,
                         C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``o [BH,T,V]`` of chunk ``program_id(0)`` from its start state and its own tokens (K in blocks of BK)."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_v = i_v * BV + tl.arange(0, BV)
    o_c = tl.arange(0, C)
    t = i_n * C + o_c
    m_t = t < T
    m_v = o_v < V
    g = tl.load(G + i_bh * Tp + i_n * C + o_c)
    A = tl.zeros([C, C], dtype=tl.float32)
    out = tl.zeros([C, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        qc = tl.load(q + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        kc = tl.load(k + i_bh * T * K + t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        S = tl.load(states + (i_bh * (N + 1) + i_n) * V * K + o_v[:, None] * K + o_k[None, :],
                    mask=m_v[:, None] & m_k[None, :], other=0.0)
        A += tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
        out += tl.dot(qc * tl.exp(g)[:, None], tl.trans(S), input_precision=PRECISION)
    causal = o_c[:, None] >= o_c[None, :]
    A = A * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
    vc = tl.load(v + i_bh * T * V + t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    out += tl.dot(A, vc, input_precision=PRECISION)
    tl.store(o + i_bh * T * V + t[:, None] * V + o_v[None, :], out * scale, mask=m_t[:, None] & m_v[None, :])


def _kernel_chunk(C: int) -> int:
    """The kernels' chunk: a power of two, at least 16 (``tl.dot``'s smallest tile)."""
    return max(16, triton.next_power_of_2(C))


def chunk_dot_triton_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int,
                             block_k: Optional[int] = None, block_v: Optional[int] = None):
    """``q, k [B,H,T,K]``, ``v [B,H,T,V]``, ``g [B,H,T,1]``, ``S0 [B,H,V,K]`` -> ``o [B,H,T,V]`` (fp32) and the
    boundary states ``[B,H,N+1,V,K]`` (fp32). ``C`` must be a power of two ≥ 16; ``block_k``, ``block_v``:
    tile sizes (powers of two ≥ 16; default up to 64)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = triton.cdiv(T, C)
    Tp = N * C
    f32 = torch.float32
    qf, kf, vf = (x.to(f32).contiguous() for x in (q, k, v))
    gp = torch.zeros(B, H, Tp, dtype=f32, device=q.device)
    gp[:, :, :T] = g[..., 0]
    G = gp.view(B, H, N, C).cumsum(-1).view(B, H, Tp).contiguous()
    states = torch.empty(B, H, N + 1, V, K, dtype=f32, device=q.device)
    out = torch.empty(B, H, T, V, dtype=f32, device=q.device)
    BK = block_k or max(16, min(64, triton.next_power_of_2(K)))
    BV = block_v or max(16, min(64, triton.next_power_of_2(V)))
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    precision = "tf32" if (q.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    _chunk_states_kernel[(NK, NV, B * H)](kf, vf, G, S0.to(f32).contiguous(), states, T, Tp, N, K=K, V=V, C=C,
                                          BK=BK, BV=BV, PRECISION=precision)
    _chunk_output_kernel[(N, B * H, NV)](qf, kf, vf, G, states, out, float(scale), T, Tp, N, K=K, V=V, C=C,
                                         BK=BK, BV=BV, PRECISION=precision)
    return out, states


class TritonChunkDot(torch.autograd.Function):
    """:class:`~metaplastic.kernels.chunk.ChunkDot` with the Triton forward; the backward is ChunkDot's."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, g: Tensor, S0: Tensor, scale: float, C: int):
        if g.shape[-1] != 1:
            raise ValueError("the chunked Triton kernel supports scalar (per-head) forgetting only, not vector")
        C = _kernel_chunk(C)
        o, states = chunk_dot_triton_forward(q, k, v, g, S0, scale, C)
        states = states.to(q.dtype)
        ctx.save_for_backward(q, k, v, g, states)
        ctx.scale, ctx.C = scale, C
        return o.to(q.dtype), states[:, :, -1]

    @staticmethod
    def backward(ctx, do: Tensor, dS_final: Tensor):
        return ChunkDot.backward(ctx, do, dS_final)


def chunk_triton_scan(objective: Objective, q: Tensor, k: Tensor, v: Tensor, *,
                      log_decay: Optional[Tensor] = None, beta: Optional[Tensor] = None, b: Optional[Tensor] = None,
                      prior_precision: Union[float, Tensor] = 1.0, lam: Optional[Tensor] = None, scale: float = 1.0,
                      initial_state: Optional[Dict[str, Tensor]] = None, output_final_state: bool = False,
                      output_variance: bool = False, cu_seqlens: Optional[Tensor] = None,
                      chunk_size: int = 64) -> ScanResult:
    """:func:`metaplastic.scan` by the chunked Triton forward (same arguments and result, plus ``chunk_size``,
    rounded up to a power of two ≥ 16). Raises ``ValueError`` naming the setting it does not cover."""
    reason = triton_chunk_reason(objective, b, initial_state)
    if reason is not None:
        raise ValueError(reason)
    if not q.is_cuda and not _interpreted():
        raise ValueError("the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    return chunk_scan(objective, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=prior_precision,
                      lam=lam, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                      output_variance=output_variance, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
                      _dot=TritonChunkDot.apply)


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"
