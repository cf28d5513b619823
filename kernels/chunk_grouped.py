"""Grouped importance on the chunked torch path: Palimpsa as G simple-GLA reads (docs/theory.md#limit-8-grouped-importance; G = 1: limit 7).

The V value rows of a head are split into G contiguous groups of ``R = V/G`` rows sharing one importance
rate ``b_t[g]``. With an initial precision constant within each group, the precision of every row of group
``g`` is the K-vector ``I^{(g)}_t = Ip + J^{(g)}_t``,

    J^{(g)}_t = α_t ∘ J^{(g)}_{t-1} + b_t[g] k_t²,        M_t = α_t ∘ M_{t-1} + (β_t v_t) ⊗ k_t,

and the rows of group ``g`` read ``o_t[i] = scale · Σ_j M_t[i, j] q_t[j] / I^{(g)}_t[j]``: simple GLA's read of
those rows of ``M`` with the query ``r^{(g)}_t = q_t ⊘ I^{(g)}_t``. Per chunk of ``C`` tokens (``D[t, s] =
exp(G_t − G_s)``, ``s ≤ t``, ``G`` the cumulative log-decay inside the chunk):

    o[rows g] = scale · [ (r^{(g)} ∘ e^{G}) M_startᵀ[rows g] + ((r^{(g)} kᵀ) ∘ D) (β v)[rows g] ]

Keys, values, decays, ``D`` and the chunk-boundary states ``M`` are computed once and shared by the groups;
only the ``[C, C]`` matrix ``(r^{(g)} kᵀ) ∘ D`` and the ``J`` scans (``D (b[g] k²)``) are per group, so the
cost grows with G only there. G = 1 is limit 7 (head-shared ``b``).

:class:`GroupedDiagonal` works one chunk at a time and has a hand-written backward. It saves only its
inputs (``q, k, v, β, b, g`` and the initial states): at K = V = 128, G = 16, float32 about 1.6 KB per token
and head. The backward recomputes the chunk-boundary states of ``M`` and ``J`` (cheap), then walks the
chunks backwards, recomputing each chunk's intermediates and running the adjoint recurrences of ``M`` and
``J``.

Inputs are finite here: the chunked router (:func:`metaplastic.kernels.chunk.chunk_run`) sanitises
non-finite inputs before and poisons the outputs they reach after, and floors the log-decay
(:func:`metaplastic.kernels.chunking.floor_log_decay`; a ``-inf``, α = 0, resets the state as in the
reference). Log-decays are cumulated in float64, so every exponent stays finite and ≤ 0 and ``G_t − G_s`` is
exact next to a reset.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .chunking import VECTOR_CHUNK, causal_mask, cumulated_log_decay, decay_matrix, exp_to, pad_chunks, unchunk

Tensor = torch.Tensor


def _group(x: Tensor, G: int) -> Tensor:
    """``[..., C, V] -> [..., G, C, R]`` (value rows in G contiguous groups)."""
    return x.unflatten(-1, (G, x.shape[-1] // G)).movedim(-2, -3)


def _ungroup(x: Tensor) -> Tensor:
    """``[..., G, C, R] -> [..., C, V]``."""
    return x.movedim(-3, -2).flatten(-2)


def _intra(D: Tensor, x: Tensor) -> Tensor:
    """``Σ_s D[t, s] ∘ x_s`` inside a chunk: ``x [B,H,C,P,K]``; ``D [B,H,C,C]`` (scalar decay) or
    ``[B,H,C,C,K]`` (vector) -> ``[B,H,C,P,K]``."""
    B, H, C, P, K = x.shape
    if D.dim() == 4:
        return (D @ x.reshape(B, H, C, P * K)).reshape(x.shape)
    return (D.permute(0, 1, 4, 2, 3) @ x.permute(0, 1, 4, 2, 3)).permute(0, 1, 3, 4, 2)


class _Chunk:
    """One chunk's intermediates ``[B,H,C,...]`` from the chunk-start states ``M_start [B,H,V,K]`` and
    ``J_start [B,H,G,K]`` (computed by the forward, recomputed by the backward). ``output``: also the chunk's
    output ``o`` and end state ``M_end`` (the forward's; the backward has the boundary states already)."""

    def __init__(self, q, k, w, b, g, M_start, J_start, Ip, mask, scale: float, output: bool) -> None:
        V, G = w.shape[-1], b.shape[-1]
        self.q, self.k, self.w, self.b = q, k, w, b
        dt = q.dtype
        Gc = cumulated_log_decay(g)  # [B,H,C,Kg], float64
        G_last = Gc[:, :, -1:]
        self.eG = exp_to(Gc, dt)
        self.to_end = exp_to(G_last - Gc, dt)
        self.decay = exp_to(G_last, dt)  # [B,H,1,Kg], the whole chunk's decay
        self.D = decay_matrix(Gc, mask, dt)  # [B,H,C,C] or [B,H,C,C,K]
        self.k2 = k * k
        self.xJ = b[..., :, None] * self.k2[..., None, :]  # b[g] k², [B,H,C,G,K]
        self.J = _intra(self.D, self.xJ) + self.eG[..., None, :] * J_start[:, :, None]  # J^{(g)}_t
        self.I = self.J + Ip
        self.r = q[..., None, :] / self.I  # q ⊘ I^{(g)}, [B,H,C,G,K]
        self.rg = self.r.transpose(2, 3)  # [B,H,G,C,K]
        self.Mg = M_start.unflatten(-2, (G, V // G))  # [B,H,G,R,K]
        if self.D.dim() == 4:
            self.A = (self.rg @ k[:, :, None].transpose(-1, -2)) * self.D[:, :, None]  # [B,H,G,C,C]
        else:  # A[g, t, s] = Σ_k r[t, g, k] (D[t, s, k] k[s, k]): one [G, K] @ [K, C] product per t
            self.Dk = self.D * k[:, :, None]  # [B,H,C,C,K]
            self.A = (self.r @ self.Dk.transpose(-1, -2)).transpose(2, 3)
        if not output:
            return
        self.M_end = M_start * self.decay + w.transpose(-1, -2) @ (k * self.to_end)
        inter = (self.rg * self.eG[:, :, None]) @ self.Mg.transpose(-1, -2)  # [B,H,G,C,R]
        self.o = scale * _ungroup(inter + self.A @ _group(w, G))  # [B,H,C,V]


def _boundaries(k, w, b, g, M0, J0, C: int):
    """``M`` and ``J`` at every chunk start (and the end): ``[B,H,N+1,V,K]``, ``[B,H,N+1,G,K]``. Inputs are
    chunked ``[B,H,N,C,...]``."""
    Gc = cumulated_log_decay(g)
    to_end = exp_to(Gc[..., -1:, :] - Gc, k.dtype)
    decay = exp_to(Gc[..., -1:, :], k.dtype)
    U = w.transpose(-1, -2) @ (k * to_end)  # [B,H,N,V,K]: what a chunk writes, seen at its end
    UJ = b.transpose(-1, -2) @ (to_end * k * k)  # [B,H,N,G,K]: Σ_s e^{G_C − G_s} b_s[g] k_s²
    Ms, Js = [M0], [J0]
    for n in range(k.shape[2]):
        Ms.append(Ms[-1] * decay[:, :, n] + U[:, :, n])
        Js.append(Js[-1] * decay[:, :, n] + UJ[:, :, n])
    return torch.stack(Ms, 2), torch.stack(Js, 2)


class GroupedDiagonal(torch.autograd.Function):
    """Palimpsa with ``b`` shared in G groups of value rows, forward and hand-written backward, one chunk
    at a time (the working set stays ``O(C·G·K + C²·G + V·K)`` per head).

    Inputs ``[B,H,T,...]``: ``q, k [K]``, ``v [V]``, ``beta [1|V]`` or None, ``b [G]``, ``g [Kg]`` (log-decay,
    Kg = 1 or K, already clamped below); ``M0 [B,H,V,K]`` (``I ∘ μ`` before the first token),
    ``J0 [B,H,G,K]`` (``I − Ip`` per group); ``Ip [1,H,1,1,1]``. Returns ``o [B,H,T,V]``, ``var [B,H,T,G]``
    (zeros unless ``with_var``), ``M_T [B,H,V,K]``, ``J_T [B,H,G,K]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, b, g, M0, J0, Ip, scale: float, C: int, with_var: bool):
        T = q.shape[2]
        w = v if beta is None else v * beta  # β v
        qc, kc, wc, bc, gc = (pad_chunks(x, C) for x in (q, k, w, b, g))
        mask = causal_mask(C, q.device)
        o = q.new_empty(wc.shape)
        var = q.new_zeros(bc.shape)
        M, J = M0, J0
        for n in range(qc.shape[2]):
            ch = _Chunk(qc[:, :, n], kc[:, :, n], wc[:, :, n], bc[:, :, n], gc[:, :, n], M, J, Ip, mask, scale, True)
            o[:, :, n] = ch.o
            if with_var:
                var[:, :, n] = scale * scale * (qc[:, :, n, :, None, :] * ch.r).sum(-1)
            M, J = ch.M_end, ch.J[:, :, -1]
        ctx.save_for_backward(q, k, v, beta, b, g, M0, J0, Ip)
        ctx.scale, ctx.C, ctx.with_var = scale, C, with_var
        return unchunk(o, T), unchunk(var, T), M, J.clone()

    @staticmethod
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, v, beta, b, g, M0, J0, Ip = ctx.saved_tensors
        scale, C, with_var = ctx.scale, ctx.C, ctx.with_var
        T, G = q.shape[2], b.shape[-1]
        w = v if beta is None else v * beta
        qc, kc, wc, bc, gc, doc = (pad_chunks(x, C) for x in (q, k, w, b, g, do))
        dvc = pad_chunks(dvar, C) if with_var else None
        N = qc.shape[2]
        mask = causal_mask(C, q.device)
        M_starts, J_starts = _boundaries(kc, wc, bc, gc, M0, J0, C)
        dq, dk, dw, db, dg = (torch.zeros_like(x) for x in (qc, kc, wc, bc, gc))
        dIp = torch.zeros_like(Ip)
        dM, dJ = dM_T, dJ_T  # gradients reaching the end of the chunk being processed
        for n in reversed(range(N)):
            ch = _Chunk(qc[:, :, n], kc[:, :, n], wc[:, :, n], bc[:, :, n], gc[:, :, n], M_starts[:, :, n],
                        J_starts[:, :, n], Ip, mask, scale, False)
            kn, rg, eG, to_end = ch.k, ch.rg, ch.eG, ch.to_end
            dog = _group(doc[:, :, n], G)  # [B,H,G,C,R]
            # --- M: the read of the chunk-start state and the intra-chunk matrix A = (r kᵀ) ∘ D, per group
            dA = (scale * (dog @ _group(ch.w, G).transpose(-1, -2))).tril()  # [B,H,G,C,C]
            if ch.D.dim() == 4:
                W = dA * ch.D[:, :, None]
                dr = W @ kn[:, :, None]  # [B,H,G,C,K]
                dk_n = (W.permute(0, 1, 4, 2, 3).flatten(-2) @ rg.flatten(2, 3))  # Σ_g Wᵀ r, [B,H,C,K]
            else:  # per t: dr[t] = dA[t] (D[t] ∘ k), and Σ_g dA[g, t, s] r[t, g, k] weighted by D[t, s, k]
                dAt = dA.transpose(2, 3)  # [B,H,C_t,G,C_s]
                dr = (dAt @ ch.Dk).transpose(2, 3)  # [B,H,G,C,K]
                dk_n = ((dAt.transpose(-1, -2) @ ch.r) * ch.D).sum(2)  # [B,H,C_s,K]
            dr = dr + scale * (dog @ ch.Mg) * eG[:, :, None]
            dk_n = dk_n + (ch.w @ dM) * to_end
            dw[:, :, n] = scale * _ungroup(ch.A.transpose(-1, -2) @ dog) + (kn * to_end) @ dM.transpose(-1, -2)
            # log-decay through M: e^{G_t} scales r_t, e^{-G_s} scales k_s, e^{G_last} the chunk's end state
            dGc = (rg * dr).sum(2) - kn * dk_n
            dGc[:, :, -1] += (dM * M_starts[:, :, n + 1]).sum(-2)
            dM = dM * ch.decay + scale * (dog.transpose(-1, -2) @ (rg * eG[:, :, None])).flatten(2, 3)
            # --- r = q ⊘ I (and the variance) -> q and I
            drI = dr.transpose(2, 3) / ch.I  # [B,H,C,G,K]
            dq_n = drI.sum(-2)
            dI = -drI * ch.r
            if with_var:
                dv_n = dvc[:, :, n, :, :, None]  # [B,H,C,G,1]
                s2 = scale * scale
                dq_n = dq_n + 2 * s2 * (dv_n * ch.r).sum(-2)
                dI = dI - s2 * dv_n * ch.r * ch.r
            dIp += dI.sum((0, 2, 3, 4)).view(Ip.shape)
            # --- J: adjoint Ĵ_t = dI_t + α_{t+1} Ĵ_{t+1} inside the chunk, from the gradient at its end
            Jhat = _intra(ch.D.transpose(2, 3), dI) + to_end[..., None, :] * dJ[:, :, None]  # [B,H,C,G,K]
            dJ = dJ * ch.decay + (eG[..., None, :] * dI).sum(2)
            db[:, :, n] = (Jhat * ch.k2[..., None, :]).sum(-1)
            dk[:, :, n] = dk_n + 2 * kn * (Jhat * ch.b[..., None]).sum(-2)
            dgJ = (Jhat * (ch.J - ch.xJ)).sum(-2)  # Σ_g Ĵ_t ∘ α_t J_{t-1}, [B,H,C,K]
            dg_n = dGc.flip(-2).cumsum(-2).flip(-2)
            dg[:, :, n] = (dg_n + dgJ).sum(-1, keepdim=True) if gc.shape[-1] == 1 else dg_n + dgJ
            dq[:, :, n] = dq_n
        dw = unchunk(dw, T)
        dv = dw if beta is None else dw * beta
        dbeta = None
        if beta is not None:
            dbeta = dw * v
            dbeta = dbeta.sum(-1, keepdim=True) if beta.shape[-1] == 1 else dbeta
        return (unchunk(dq, T), unchunk(dk, T), dv, dbeta, unchunk(db, T), unchunk(dg, T), dM, dJ, dIp,
                None, None, None)


def grouped_diagonal(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], b: Tensor, g: Tensor,
                     M0: Tensor, J0: Tensor, Ip: Tensor, scale: float, C: int, with_var: bool
                     ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Grouped Palimpsa (see the module docstring), heads-first, finite inputs: ``q, k [B,H,T,K]``,
    ``v [B,H,T,V]``, ``beta [B,H,T,1|V]`` or None, ``b [B,H,T,G]``, ``g [B,H,T,Kg]`` (floored), ``M0 [B,H,V,K]``, ``J0 [B,H,G,K]``,
    ``Ip [H]``. Returns ``o [B,H,T,V]``, ``var [B,H,T,V]`` or None, ``M_T [B,H,V,K]``, ``J_T [B,H,G,K]``.
    """
    B, H, T = q.shape[:3]
    V, G = v.shape[-1], b.shape[-1]
    if g.shape[-1] != 1:
        C = min(C, VECTOR_CHUNK)
    Ip5 = Ip.view(1, H, 1, 1, 1)
    o, var, M_T, J_T = GroupedDiagonal.apply(q, k, v, beta, b, g, M0, J0, Ip5, scale, C, with_var)
    var = var[..., None].expand(B, H, T, G, V // G).reshape(B, H, T, V) if with_var else None
    return o, var, M_T, J_T
