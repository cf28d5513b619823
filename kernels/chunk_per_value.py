"""Per-value Palimpsa on torch: ``b`` per value row (``[B,T,H,V]``); :func:`per_value_scan` is the entry.

Three forms compute it exactly. ``"native"`` (the CPU default where it builds, any decay): the fused C kernel
of :mod:`metaplastic.kernels.cpu_per_value`, one pass per token over the ``[V, K]`` states, nothing of size
``T·V·K`` materialised. ``"scan"`` (the torch default, any decay): :class:`DiagonalScan`,
``M_t, J_t`` materialised token by token inside blocks of tokens. ``"matmul"`` (scalar decay):
:class:`PerValueScan`, below. These two torch forms are bound by passes over the ``T·V·K`` materialised
numbers; measured on a CPU at one thread (``metaplastic bench models`` shape), the matmul form is 15-20%
slower, so it is not the torch default. Both run on at most :data:`INTRA_OP_THREADS` torch threads.

The matmul form, ``b`` per value row and scalar (per-head) decay.

The recurrence (docs/theory.md#closed-forms, ``J = I − Ip``): ``M_t = α_t M_{t-1} + bv_t ⊗ k_t``, ``J_t = α_t J_{t-1} +
b_t ⊗ k_t²``, ``o_t = scale · Σ_j M_t[i,j] q_t[j] / (Ip + J_t[i,j])``. ``I_t = Ip + J_t`` does not factor over
``(i, j)`` (docs/theory.md#the-per-value-cost-floor), so it is materialised; ``M_t`` is not.

Chunks of ``C`` tokens, ``G`` the cumulative log-decay inside a chunk, ``D[t,s] = exp(G_t − G_s)`` (s ≤ t),
``e_t = exp(G_t)``; ``M0, J0`` the chunk's start state. Everything inside a chunk is a batched matrix product
over all heads and several chunks at once (layout ``[i, t, j]`` of a ``[V, C, K]`` block):

    I[i,t,:]  = Ip + e_t J0[i,:] + Σ_s (D[t,s] b_s[i]) k_s²        (one baddbmm, [V·C, C] @ [C, K])
    W[i,t,j]  = q_t[j] / I[i,t,j]                                   (in place)
    A[i,t,s]  = Σ_j W[i,t,j] k_s[j],   F[i,t] = Σ_j W[i,t,j] M0[i,j]  (two bmm reads of W)
    o_t[i]    = scale · (e_t F[i,t] + Σ_s D[t,s] bv_s[i] A[i,t,s])

The chunk-boundary states come from a short scan over chunks (``[M; J]``, ``2·V·K/C`` numbers per token and
head, saved for the backward). The backward recomputes ``I``, ``M``, ``W`` block by block, forms the local
gradients ``dI = −W ∘ (scale·do ∘ μ)`` and ``dM = scale·do ∘ W`` and contracts them with the same
matrices; the adjoint of the boundary states is a second short scan. ``dG`` collects every place ``G`` enters
(``D``, ``e``, the chunk-end factors) and is reverse-cumulated into the log-decay gradient.

Numerics: the log-decay is clamped at :data:`LOG_DECAY_FLOOR` (``exp`` of it is 0 in float64, so ``α = 0``
resets exactly and ``−inf − (−inf)`` never appears), cumulated in float64, and only differences
``G_t − G_s ≤ 0`` are exponentiated: no exponent overflows whatever the decay. Masks are ``torch.where``.

Work per op: blocks of chunks (and heads) hold about :data:`BLOCK_ELEMENTS` numbers, so a layer is a few
hundred operations on ~4 MB tensors, not thousands of small ones. Threads: every pass is memory-bound, and
an op split over threads waits for the slowest one; on a machine with fewer free cores than torch threads
that wait dominates (measured: 2 threads on a busy 2-core machine, 8-10x slower than 1). The path therefore
runs with at most :data:`INTRA_OP_THREADS` torch threads (restored afterwards), so more threads than free
cores cannot slow it down.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .chunking import LOG_DECAY_FLOOR, cumulated_log_decay
from .threads import torch_threads

Tensor = torch.Tensor
PER_VALUE_CHUNK = 8  # tokens per chunk: the intra-chunk products cost ~2·C flops per materialised number
BLOCK_ELEMENTS = 1 << 20  # numbers of one [V, C, K] block batch (chunks and heads grouped up to this size)
INTRA_OP_THREADS = 1  # torch threads inside the path (see the module docstring)
DIAGONAL_CHUNK = 16  # tokens per recomputed block of the "scan" form (working set [B,H,C,2V,K])


def _prepare(g: Tensor, C: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``g [BH, N, C]`` -> ``D [BH,N,C,C]``, ``e [BH,N,C]``, ``to_end [BH,N,C]``, ``e_C [BH,N]`` (in ``dtype``).

    ``G`` is cumulated in float64 from the clamped log-decay; only differences ``≤ 0`` are exponentiated."""
    G = cumulated_log_decay(g, -1)
    causal = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    diff = G[..., :, None] - G[..., None, :]
    D = torch.where(causal, diff, torch.full_like(diff, -math.inf)).exp()
    G_end = G[..., -1:]
    return D.to(dtype), G.exp().to(dtype), (G_end - G).exp().to(dtype), G_end[..., 0].exp().to(dtype)


def _chunked(x: Tensor, C: int) -> Tensor:
    """``[BH, T, ...] -> [BH, N, C, ...]``, zero-padded at the end of time."""
    T = x.shape[1]
    N = -(-T // C)
    if N * C != T:
        x = torch.cat([x, x.new_zeros((x.shape[0], N * C - T) + x.shape[2:])], 1)
    return x.reshape((x.shape[0], N, C) + x.shape[2:])


def _blocks(BH: int, N: int, V: int, C: int, K: int):
    """``(head slice, chunk slice)`` pairs processed together: about ``BLOCK_ELEMENTS`` numbers per
    ``[V, C, K]`` batch (whole chunks over several heads, or several chunks of all heads)."""
    per_head_chunk = V * C * K
    if BH * per_head_chunk <= BLOCK_ELEMENTS:
        step = max(1, min(N, BLOCK_ELEMENTS // (BH * per_head_chunk)))
        return [(slice(0, BH), slice(n, min(n + step, N))) for n in range(0, N, step)]
    hstep = max(1, BLOCK_ELEMENTS // per_head_chunk)
    return [(slice(h, min(h + hstep, BH)), slice(n, n + 1)) for n in range(N) for h in range(0, BH, hstep)]


class _Buffers:
    """Work tensors reused by every block of one call (fresh large allocations page-fault on a CPU)."""

    def __init__(self, like: Tensor, count: int, numel: int) -> None:
        self.flat = [like.new_empty(numel) for _ in range(count)]

    def get(self, i: int, shape) -> Tensor:
        return self.flat[i][:math.prod(shape)].view(shape)


def _materialise(out: Tensor, Z: Tensor, x: Tensor, e: Tensor, start: Tensor, add: Optional[Tensor] = None
                 ) -> Tensor:
    """``out[..., i, t, :] = add + e_t start[..., i, :] + Σ_s Z[..., i, t, s] x[..., s, :]``, written into ``out``.

    ``Z [BH,n,V,C,C]``, ``x [BH,n,C,K]``, ``e [BH,n,C]``, ``start [BH,n,V,K]``, ``add [BH,1,1,1,1]`` or None
    -> ``out [BH,n,V,C,K]``."""
    BH, n, V, C, _ = Z.shape
    K = x.shape[-1]
    if add is None:
        torch.mul(e[:, :, None, :, None], start[:, :, :, None, :], out=out)
    else:
        torch.addcmul(add, e[:, :, None, :, None], start[:, :, :, None, :], out=out)
    out.view(BH * n, V * C, K).baddbmm_(Z.reshape(BH * n, V * C, C), x.reshape(BH * n, C, K))
    return out


def _rowdot(out: Tensor, tmp: Tensor, X: Tensor, start: Tensor) -> Tensor:
    """``out[..., i, t] = Σ_j X[..., i, t, j] start[..., i, j]`` (``tmp`` is scratch shaped like ``X``)."""
    torch.mul(X, start[:, :, :, None, :], out=tmp)
    return torch.sum(tmp, -1, out=out)



def _chunked_inputs(q, k, bv, bb, g, C: int):
    """``(flat, (q, k, bv, bb, g))``: ``flat`` merges ``[B, H]``; the inputs cut into chunks of ``C`` tokens
    (``[BH, N, C, ·]``; the log-decay ``[BH, N, C]``)."""
    B, H, T, _ = q.shape
    V = bv.shape[-1]
    flat = (lambda x: x.reshape((B * H,) + x.shape[2:]))
    qc, kc, bvc = (_chunked(flat(x), C) for x in (q, k, bv))
    bbc = _chunked(flat(bb.expand(B, H, T, V)), C)
    gc = _chunked(flat(g)[..., 0], C)
    return flat, (qc, kc, bvc, bbc, gc)

class DiagonalScan(torch.autograd.Function):
    """Palimpsa with ``b`` per value row, as a two-level scan. Level 1 walks the chunks and keeps only the
    boundary states ``[M; J]`` (``J = I − Ip``; ``2·V·K/C`` numbers per token and head, saved for the
    backward). Level 2 materialises one chunk's ``M_t, J_t`` together (``[B,H,c,2V,K]``) by a short
    elementwise scan from the chunk-start state (``O(V·K)`` per token; on a CPU this is several times faster
    than the equivalent ``[c, c]`` decay-matrix product, which costs ``c×`` the flops), then reads the chunk
    out in one batch and drops it. The backward recomputes each chunk and runs the adjoint recurrence
    ``Ĥ_t = dH_t + α_{t+1} Ĥ_{t+1}`` the same way.

    Inputs ``[B,H,T,...]``: ``q, k [K]``, ``bv [V]`` (= β v), ``bb [P]`` (b, ``P`` = 1 or V), ``g [Kg]``;
    ``M0, J0 [B,H,V,K]``; ``Ip [1,H,1,1,1]``. Returns ``o [B,H,T,V]``, ``var [B,H,T,V]`` (zeros unless
    ``with_var``), ``M_T``, ``J_T``.
    """

    @staticmethod
    def _states(k, bv, bb, alpha, start):
        """``[M; J]`` of one chunk ``[B,H,c,2V,K]`` from ``start = [M; J]`` before it; ``alpha [B,H,c,1,Kg]``."""
        B, H, c, K = k.shape
        V = bv.shape[-1]
        X = k.new_empty(B, H, c, 2 * V, K)
        torch.mul(bv[..., :, None], k[..., None, :], out=X[:, :, :, :V])
        X[:, :, :, V:] = bb[..., :, None] * (k * k)[..., None, :]  # bb may be [.., 1]: broadcast over V
        h = start
        for t in range(c):  # h_t = α_t h_{t-1} + x_t, written over x_t
            h = torch.addcmul(X[:, :, t], alpha[:, :, t], h, out=X[:, :, t])
        return X

    @staticmethod
    def forward(ctx, q, k, bv, bb, g, M0, J0, Ip, scale: float, C: int, with_var: bool):
        q, k, bv, bb, g = (x.contiguous() for x in (q, k, bv, bb, g))
        T, V = q.shape[2], bv.shape[-1]
        alpha = g.exp()[..., None, :]  # [B,H,T,1,Kg]
        o, var = q.new_zeros(bv.shape), q.new_zeros(bv.shape)
        starts = [torch.cat([M0, J0], 2)]
        for t0 in range(0, T, C):
            sl = slice(t0, min(t0 + C, T))
            MJ = DiagonalScan._states(k[:, :, sl], bv[:, :, sl], bb[:, :, sl], alpha[:, :, sl], starts[-1])
            starts.append(MJ[:, :, -1].clone())
            I = MJ[:, :, :, V:].add_(Ip)  # J -> I in place
            qs = q[:, :, sl, :, None]
            o[:, :, sl] = scale * ((MJ[:, :, :, :V] / I) @ qs)[..., 0]
            if with_var:
                var[:, :, sl] = scale * scale * (I.reciprocal_() @ (qs * qs))[..., 0]
        starts = torch.stack(starts, 2)
        ctx.save_for_backward(q, k, bv, bb, g, Ip, starts)
        ctx.scale, ctx.C, ctx.with_var = scale, C, with_var
        return o, var, starts[:, :, -1, :V], starts[:, :, -1, V:]

    @staticmethod
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, bv, bb, g, Ip, starts = ctx.saved_tensors
        scale, C = ctx.scale, ctx.C
        B, H, T, V = bv.shape
        do, dvar = do.contiguous(), dvar.contiguous()
        alpha = g.exp()[..., None, :]
        dq, dk, dbv, dbb, dg = (torch.zeros_like(x) for x in (q, k, bv, bb, g))
        dIp = torch.zeros_like(Ip)
        d_end = torch.cat([dM_T, dJ_T], 2)  # gradient reaching the chunk's last state, [B,H,2V,K]
        t0s = list(range(0, T, C))
        for n in reversed(range(len(t0s))):
            sl = slice(t0s[n], min(t0s[n] + C, T))
            c = sl.stop - sl.start
            qc, kc, bvc, bbc, doc = q[:, :, sl], k[:, :, sl], bv[:, :, sl], bb[:, :, sl], do[:, :, sl]
            al = alpha[:, :, sl]
            MJ = DiagonalScan._states(kc, bvc, bbc, al, starts[:, :, n])
            invI = (MJ[:, :, :, V:] + Ip).reciprocal_()
            mu = MJ[:, :, :, :V] * invI
            # read-out o = scale · mu q (and var = scale² · (1/I) q²): local gradients of M and J
            dq_c = scale * (doc[..., None, :] @ mu)[..., 0, :]
            L = q.new_empty(B, H, c, 2 * V, q.shape[-1])
            dM = L[:, :, :, :V]
            torch.mul(scale * doc[..., :, None] * qc[..., None, :], invI, out=dM)
            torch.mul(dM, mu, out=L[:, :, :, V:]).neg_()
            if ctx.with_var:
                dvc = dvar[:, :, sl]
                dq_c = dq_c + 2 * scale * scale * qc * (dvc[..., None, :] @ invI)[..., 0, :]
                L[:, :, :, V:] -= scale * scale * dvc[..., :, None] * (qc * qc)[..., None, :] * invI * invI
            dIp += L[:, :, :, V:].sum((0, 2, 3, 4)).view(dIp.shape)
            # adjoint recurrence, backwards through the chunk (written over L)
            h = L[:, :, c - 1].add_(d_end)
            for t in range(c - 2, -1, -1):
                h = torch.addcmul(L[:, :, t], al[:, :, t + 1], h, out=L[:, :, t])
            MJh = L
            d_end = al[:, :, 0] * MJh[:, :, 0]  # through α of the chunk's first token
            Mh, Jh = MJh[:, :, :, :V], MJh[:, :, :, V:]
            # the writes x = [bv ⊗ k; b ⊗ k²] and the decays (Σ_i Ĥ_i x_i = k · (bᵀ Ĥ))
            k2 = kc * kc
            dbv[:, :, sl] = (Mh @ kc[..., :, None])[..., 0]
            dbb_c = (Jh @ k2[..., :, None])[..., 0]
            dbb[:, :, sl] = dbb_c.sum(-1, keepdim=True) if bb.shape[-1] == 1 else dbb_c
            dkM = (bvc[..., None, :] @ Mh)[..., 0, :]
            dkJ = (bbc.expand(B, H, c, V)[..., None, :] @ Jh)[..., 0, :]
            dk[:, :, sl] = dkM + 2 * kc * dkJ
            dq[:, :, sl] = dq_c
            dG = (MJh * MJ).sum(-2) - kc * dkM - k2 * dkJ  # Σ_i Ĥ_t ∘ (h_t − x_t) = Σ_i Ĥ_t ∘ α_t h_{t-1}
            dg[:, :, sl] = dG.sum(-1, keepdim=True) if g.shape[-1] == 1 else dG
        return dq, dk, dbv, dbb, dg, d_end[:, :, :V], d_end[:, :, V:], dIp, None, None, None


class PerValueScan(torch.autograd.Function):
    """Per-value Palimpsa with scalar decay (see the module docstring).

    Inputs ``[B,H,T,...]``: ``q, k [K]``, ``bv [V]`` (= β v), ``bb [P]`` (b; ``P`` = 1 broadcasts over V),
    ``g [1]`` (log-decay); ``M0, J0 [B,H,V,K]``; ``Ip [1,H,1,1,1]``. Returns ``o [B,H,T,V]``, ``var``
    (zeros unless ``with_var``), ``M_T``, ``J_T``. Saved: the inputs and the chunk-boundary states.
    """

    @staticmethod
    def forward(ctx, q, k, bv, bb, g, M0, J0, Ip, scale: float, C: int, with_var: bool):
        with torch_threads(min(INTRA_OP_THREADS, torch.get_num_threads())):
            return PerValueScan._forward(ctx, q, k, bv, bb, g, M0, J0, Ip, scale, C, with_var)

    @staticmethod
    def backward(ctx, do, dvar, dM_T, dJ_T):
        with torch_threads(min(INTRA_OP_THREADS, torch.get_num_threads())):
            return PerValueScan._backward(ctx, do, dvar, dM_T, dJ_T)

    @staticmethod
    def _forward(ctx, q, k, bv, bb, g, M0, J0, Ip, scale: float, C: int, with_var: bool):
        B, H, T, K = q.shape
        V = bv.shape[-1]
        BH = B * H
        flat, (qc, kc, bvc, bbc, gc) = _chunked_inputs(q, k, bv, bb, g, C)
        N = qc.shape[1]
        D, e, to_end, e_C = _prepare(gc, C, q.dtype)
        k2 = kc * kc
        # what each chunk writes, seen at its end: [BH,N,V,K]
        U_M = (bvc * to_end[..., None]).transpose(-1, -2) @ kc
        U_J = (bbc * to_end[..., None]).transpose(-1, -2) @ k2
        U = torch.stack([U_M, U_J], 2)  # [BH,N,2,V,K]
        U = U.transpose(0, 1).contiguous()  # chunk-major: each step of the scan below is contiguous
        e_Cn = e_C.t().contiguous()[..., None, None, None]  # [N,BH,1,1,1]
        states = [torch.stack([M0.reshape(BH, V, K), J0.reshape(BH, V, K)], 1)]
        for n in range(N):
            states.append(torch.addcmul(U[n], e_Cn[n], states[-1]))
        starts = torch.stack(states, 1)  # [BH,N+1,2,V,K]
        Ip_bh = Ip.reshape(1, H).expand(B, H).reshape(BH, 1, 1, 1, 1)
        o = q.new_empty(BH, N, V, C)
        var = q.new_zeros(BH, N, V, C) if with_var else None
        blocks = _blocks(BH, N, V, C, K)
        most = max((bs.stop - bs.start) * (sl.stop - sl.start) for bs, sl in blocks)
        buf = _Buffers(q, 2, most * V * C * K)
        for bs, sl in blocks:
            n, nb = sl.stop - sl.start, bs.stop - bs.start
            shape = (nb, n, V, C, K)
            Dn, en = D[bs, sl], e[bs, sl]
            Zb = Dn[:, :, None] * bbc[bs, sl].transpose(-1, -2)[:, :, :, None, :]  # [nb,n,V,C(t),C(s)]
            W = _materialise(buf.get(0, shape), Zb, k2[bs, sl], en, starts[bs, sl, 1], Ip_bh[bs])  # I
            torch.div(qc[bs, sl, None], W, out=W)  # W = q / I
            Wf = W.view(nb * n, V * C, K)
            rhs = kc[bs, sl] if not with_var else torch.cat([kc[bs, sl], qc[bs, sl]], 2)
            A = (Wf @ rhs.reshape(nb * n, -1, K).transpose(-1, -2)).view(nb, n, V, C, -1)
            F = _rowdot(q.new_empty(nb, n, V, C), buf.get(1, shape), W, starts[bs, sl, 0])
            Zm = Dn[:, :, None] * bvc[bs, sl].transpose(-1, -2)[:, :, :, None, :]
            o[bs, sl] = scale * (en[:, :, None] * F + (A[..., :C] * Zm).sum(-1))
            if with_var:
                var[bs, sl] = (scale * scale) * A[..., C:].diagonal(dim1=-2, dim2=-1)
        ctx.save_for_backward(q, k, bv, bb, g, Ip, starts, o, var)
        ctx.scale, ctx.C, ctx.with_var = scale, C, with_var
        out = o.permute(0, 1, 3, 2).reshape(B, H, N * C, V)[:, :, :T]
        var_out = (var.permute(0, 1, 3, 2).reshape(B, H, N * C, V)[:, :, :T] if with_var
                   else q.new_zeros(B, H, T, V))
        return out, var_out, starts[:, -1, 0].reshape(B, H, V, K), starts[:, -1, 1].reshape(B, H, V, K)

    @staticmethod
    def _backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, bv, bb, g, Ip, starts, o, var = ctx.saved_tensors
        scale, C, with_var = ctx.scale, ctx.C, ctx.with_var
        B, H, T, K = q.shape
        V = bv.shape[-1]
        BH = B * H
        flat, (qc, kc, bvc, bbc, gc) = _chunked_inputs(q, k, bv, bb, g, C)
        doc = _chunked(flat(do), C).transpose(-1, -2) * scale  # [BH,N,V,C]: scale · do
        dvr = _chunked(flat(dvar), C).transpose(-1, -2) if with_var else None  # [BH,N,V,C]
        dvc = dvr * (scale * scale) if with_var else None
        N = qc.shape[1]
        D, e, to_end, e_C = _prepare(gc, C, q.dtype)
        k2 = kc * kc
        Ip_bh = Ip.reshape(1, H).expand(B, H).reshape(BH, 1, 1, 1, 1)
        dq, dk = torch.zeros_like(qc), torch.zeros_like(kc)
        dbv, dbb = q.new_empty(BH, N, V, C), q.new_empty(BH, N, V, C)
        dG = q.new_empty(BH, N, C)
        d_start_local = q.new_empty(N, BH, 2, V, K)  # Σ_t e_t · (local gradient of the state at t)
        dIp = q.new_zeros(BH)
        ones_V = q.new_ones(1, 1, V)
        blocks = _blocks(BH, N, V, C, K)
        most = max((bs.stop - bs.start) * (sl.stop - sl.start) for bs, sl in blocks)
        buf = _Buffers(q, 3 if with_var else 2, most * V * C * K)
        for bs, sl in blocks:
            n, nb = sl.stop - sl.start, bs.stop - bs.start
            shape = (nb, n, V, C, K)
            Dn, en = D[bs, sl], e[bs, sl]
            M0n, J0n = starts[bs, sl, 0], starts[bs, sl, 1]
            bbT, bvT = bbc[bs, sl].transpose(-1, -2), bvc[bs, sl].transpose(-1, -2)  # [nb,n,V,C]
            Zb = Dn[:, :, None] * bbT[:, :, :, None, :]  # [nb,n,V,t,s]
            Zm = Dn[:, :, None] * bvT[:, :, :, None, :]
            R = _materialise(buf.get(0, shape), Zb, k2[bs, sl], en, J0n, Ip_bh[bs]).reciprocal_()  # 1 / I
            mu = _materialise(buf.get(1, shape), Zm, kc[bs, sl], en, M0n).mul_(R)  # μ = M / I
            W = R.mul_(qc[bs, sl, None])  # q / I
            Wf = W.view(nb * n, V * C, K)
            kT = kc[bs, sl].reshape(nb * n, C, K).transpose(-1, -2)
            A = (Wf @ kT).view(nb, n, V, C, C)
            dos = doc[bs, sl]  # [nb,n,V,C]
            Y = mu.mul_(-dos[..., None])  # −scale·do ∘ μ
            if with_var:
                dvs = dvc[bs, sl]
                Y.addcmul_(W, -dvs[..., None])
                Z = torch.addcmul(Y, W, dvs[..., None], value=-1, out=buf.get(2, shape))  # −(do μ + 2 dvar W)
            else:
                Z = Y
            # dq_t = −Σ_i Z[i,t,:], as a product with a row of ones (a sum over a middle axis is slow on a CPU)
            dq[bs, sl] = (ones_V @ Z.view(nb * n, V, C * K)).view(nb, n, C, K).neg_()
            dI = Y.mul_(W)  # −W ∘ (scale·do ∘ μ + scale²·dvar ∘ W)
            dIf = dI.view(nb * n, V * C, K)
            rhs = torch.cat([k2[bs, sl].reshape(nb * n, C, K), q.new_ones(nb * n, 1, K)], 1).transpose(-1, -2)
            P1 = (dIf @ rhs).view(nb, n, V, C, C + 1)
            P, dI_rows = P1[..., :C], P1[..., C]  # P[i,t,s] = Σ_j dI[i,t,j] k_s[j]², and Σ_j dI[i,t,j]
            dIp[bs] += dI_rows.sum((1, 2, 3))
            ZbT = Zb.permute(0, 1, 4, 2, 3).reshape(nb * n, C, V * C)  # [s, (i,t)]
            dMs = dos[..., None] * Zm  # d(loss)/d(D_ts bv_s[i] k_s) pieces: scale·do[i,t] D_ts bv_s[i]
            dk[bs, sl] = ((dMs.permute(0, 1, 4, 2, 3).reshape(nb * n, C, V * C) @ Wf)
                         + 2 * kc[bs, sl].reshape(nb * n, C, K) * (ZbT @ dIf)).view(nb, n, C, K)
            dbv[bs, sl] = (dos[..., None] * Dn[:, :, None] * A).sum(-2)  # Σ_t D_ts scale·do[i,t] A[i,t,s]
            dbb[bs, sl] = (Dn[:, :, None] * P).sum(-2)
            # start-state gradients through e_t, and ∂/∂e_t
            e_rows = en[:, :, None, None, :].expand(nb, n, V, 1, C).reshape(nb * n * V, 1, C)
            dM0 = ((e_rows * dos.reshape(nb * n * V, 1, C)) @ W.view(nb * n * V, C, K))
            dJ0 = e_rows @ dI.view(nb * n * V, C, K)
            d_start_local[sl, bs, 0] = dM0.view(nb, n, V, K).transpose(0, 1)
            d_start_local[sl, bs, 1] = dJ0.view(nb, n, V, K).transpose(0, 1)
            # G_t enters D_ts (+), D_t's (−) and e_t. With E[t,s] = D_ts ∂L/∂D_ts, the e_t term equals
            # −Σ_s E[t,s] − Σ_i (Ip dI_rows + dvar·var)[i,t] (from Σ_j dI ∘ I = −do·o − dvar·var and
            # scale·e_t·F = o − scale Σ_s A ∘ Zm), so dG_t = −Σ_t' E[t',t] − Σ_i (Ip dI_rows + dvar·var)[i,t].
            E = (ones_V @ (Zb * P + dMs * A).reshape(nb * n, V, C * C)).view(nb, n, C, C)
            rows = Ip_bh[bs][..., 0] * dI_rows
            if with_var:
                rows = rows + dvr[bs, sl] * var[bs, sl]
            dG[bs, sl] = -E.sum(-2) - rows.sum(2)
        # adjoint of the boundary states, backwards over chunks
        ends = [None] * N
        e_Cn = e_C.t().contiguous()[..., None, None, None]  # [N,BH,1,1,1]
        d = torch.stack([dM_T.reshape(BH, V, K), dJ_T.reshape(BH, V, K)], 1)
        for n in reversed(range(N)):
            ends[n] = d
            d = torch.addcmul(d_start_local[n], e_Cn[n], d)
        d_start0 = d
        d_end = torch.stack(ends, 1)  # [BH,N,2,V,K]
        # each chunk's end state: End = e_C Start + Σ_s to_end_s [bv_s ⊗ k_s; b_s ⊗ k_s²]
        dMe, dJe = d_end[:, :, 0], d_end[:, :, 1]  # [BH,N,V,K]
        te = to_end[..., None]
        dbv_end = (dMe @ kc.transpose(-1, -2)).transpose(-1, -2) * te  # [BH,N,C,V]
        dbb_end = (dJe @ k2.transpose(-1, -2)).transpose(-1, -2) * te
        dk = dk + ((bvc * te) @ dMe) + 2 * kc * ((bbc * te) @ dJe)
        dG = dG - (dbv_end * bvc).sum(-1) - (dbb_end * bbc).sum(-1)
        dG[..., -1] += (d_end * starts[:, 1:]).sum((2, 3, 4))
        dbv = dbv.transpose(-1, -2) + dbv_end
        dbb = dbb.transpose(-1, -2) + dbb_end
        # log-decay: reverse cumulative sum inside each chunk; no gradient where the floor clamped it
        dg = dG.flip(-1).cumsum(-1).flip(-1)
        unflat = (lambda x: x.reshape((B, H, N * C) + x.shape[3:])[:, :, :T])
        dg = unflat(dg)[..., None]
        dg = torch.where(g > LOG_DECAY_FLOOR, dg, torch.zeros_like(dg))
        dbb_out = unflat(dbb)
        if bb.shape[-1] == 1:
            dbb_out = dbb_out.sum(-1, keepdim=True)
        dIp = dIp.view(B, H).sum(0).view_as(Ip)
        return (unflat(dq), unflat(dk), unflat(dbv), dbb_out, dg, d_start0[:, 0].reshape(B, H, V, K),
                d_start0[:, 1].reshape(B, H, V, K), dIp, None, None, None)


FORMS = ("native", "scan", "matmul")
FORM: Optional[str] = None  # None: "native" where the compiled CPU kernel runs, else "scan" (module docstring)


def default_form(*xs: Tensor) -> str:
    """``"native"`` when :mod:`metaplastic.kernels.cpu_per_value` runs on ``xs`` (CPU, float32 / float64, the
    library built), else ``"scan"`` (measured faster than ``"matmul"`` on a CPU at one thread)."""
    from .cpu_per_value import native_reason
    return "native" if native_reason(*xs) is None else "scan"


def per_value_scan(q: Tensor, k: Tensor, bv: Tensor, bb: Tensor, g: Tensor, M0: Tensor, J0: Tensor, Ip: Tensor,
                   scale: float, chunk_size: int = PER_VALUE_CHUNK, with_var: bool = False,
                   form: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-value Palimpsa, heads-first (shapes as :class:`PerValueScan`; ``g [B,H,T,1]`` or ``[B,H,T,K]``):
    ``(o, var, M_T, J_T)``.

    ``form``: ``"native"`` (:mod:`metaplastic.kernels.cpu_per_value`, the fused C kernel; CPU, any decay;
    chunks capped at its ``NATIVE_CHUNK``), ``"scan"`` (:class:`DiagonalScan`,
    token by token inside blocks of ``DIAGONAL_CHUNK`` tokens; any decay) or ``"matmul"``
    (:class:`PerValueScan`, scalar decay; chunks capped at :data:`PER_VALUE_CHUNK`); the torch forms run on
    at most :data:`INTRA_OP_THREADS` torch threads. Default :data:`FORM`, or when None
    :func:`default_form`. ``"native"`` where the kernel cannot run raises ``ValueError`` naming why."""
    form = FORM if form is None else form
    if form is None:
        form = default_form(q, k, bv, bb, g, M0, J0, Ip)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "native":
        from .cpu_per_value import native_per_value_scan, native_reason
        reason = native_reason(q, k, bv, bb, g, M0, J0, Ip)
        if reason is not None:
            raise ValueError(f"form='native': {reason}")
        return native_per_value_scan(q, k, bv, bb, g, M0, J0, Ip, scale, chunk_size, with_var)
    if form == "matmul" and g.shape[-1] == 1:
        return PerValueScan.apply(q, k, bv, bb, g, M0, J0, Ip, scale, max(1, min(chunk_size, PER_VALUE_CHUNK)),
                                  with_var)
    return CappedDiagonalScan.apply(q, k, bv, bb, g, M0, J0, Ip, scale, max(1, min(chunk_size, DIAGONAL_CHUNK)),
                                with_var)


class CappedDiagonalScan(DiagonalScan):
    """:class:`DiagonalScan` with forward and backward on at most :data:`INTRA_OP_THREADS` torch threads."""

    @staticmethod
    def forward(ctx, *args):
        with torch_threads(min(INTRA_OP_THREADS, torch.get_num_threads())):
            return DiagonalScan.forward(ctx, *args)

    @staticmethod
    def backward(ctx, *grads):
        with torch_threads(min(INTRA_OP_THREADS, torch.get_num_threads())):
            return DiagonalScan.backward(ctx, *grads)
