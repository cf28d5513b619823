"""Grouped importance on the chunked torch path: Palimpsa as G simple-GLA reads (THEORY.md limits 7 and 8).

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

:class:`GroupedDiagonal` has a hand-written backward. It saves only its inputs (``q, k, v, β, b, g`` and
the initial states): at K = V = 128, G = 16, float32 that is 1.6 KB per token and head. The backward
recomputes the forward's intermediates chunk-parallel, then runs the adjoint chunk recurrences of ``M``
and ``J`` backwards.

Non-finite inputs stay causal (:func:`grouped_diagonal`): non-finite entries are replaced by 0 with
``torch.where`` before any product, and outputs from the first non-finite token on are set to NaN (a
non-finite ``q_t`` poisons ``o_t`` only). A log-decay of ``-inf`` (α = 0) resets the state as in the
reference: log-decays are clamped below at :data:`LOG_DECAY_FLOOR`, where ``exp`` is exactly 0, so every
exponent stays finite and ≤ 0.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .chunk import VECTOR_CHUNK, _causal, _decay_matrix, _pad_chunks, _unchunk

Tensor = torch.Tensor
# exp(x) is exactly 0 below these (float64 underflows at -745, float32 at -104)
LOG_DECAY_FLOOR = {torch.float64: -800.0, torch.float32: -120.0}


def _group(x: Tensor, G: int) -> Tensor:
    """``[..., C, V] -> [..., G, C, R]`` (value rows in G contiguous groups)."""
    return x.unflatten(-1, (G, x.shape[-1] // G)).movedim(-2, -3)


def _ungroup(x: Tensor) -> Tensor:
    """``[..., G, C, R] -> [..., C, V]``."""
    return x.movedim(-3, -2).flatten(-2)


def _intra(D: Tensor, x: Tensor) -> Tensor:
    """``Σ_s D[t, s] ∘ x_s`` inside each chunk: ``x [B,H,N,C,P,K]``; ``D [B,H,N,C,C]`` (scalar decay) or
    ``[B,H,N,C,C,K]`` (vector) -> ``[B,H,N,C,P,K]``."""
    B, H, N, C, P, K = x.shape
    if D.dim() == 5:
        return (D @ x.reshape(B, H, N, C, P * K)).reshape(x.shape)
    return (D.permute(0, 1, 2, 5, 3, 4) @ x.permute(0, 1, 2, 5, 3, 4)).permute(0, 1, 2, 4, 5, 3)


class _Forward:
    """The forward's intermediates, chunk-parallel (recomputed by the backward). Shapes ``[B,H,N,C,...]``."""

    def __init__(self, q, k, v, beta, b, g, M0, J0, Ip, scale: float, C: int, with_var: bool) -> None:
        B, H, T, K = q.shape
        V, G = v.shape[-1], b.shape[-1]
        self.T, self.G, self.C = T, G, C
        w = v if beta is None else v * beta  # β v
        self.qc, self.kc, self.wc, self.bc, gc = (_pad_chunks(x, C) for x in (q, k, w, b, g))
        N = self.qc.shape[2]
        Gc = gc.cumsum(-2)  # [B,H,N,C,Kg]
        self.Gc = Gc
        G_last = Gc[..., -1:, :]
        self.eG = Gc.exp()
        self.to_end = (G_last - Gc).exp()
        self.chunk_decay = G_last.exp()  # [B,H,N,1,Kg]
        self.D = _decay_matrix(Gc, _causal(C, q.device))
        # J, one K-vector per group: intra-chunk part, then the chunk recurrence of its boundary values
        self.k2 = self.kc * self.kc
        self.xJ = self.bc[..., :, None] * self.k2[..., None, :]  # [B,H,N,C,G,K]
        intraJ = _intra(self.D, self.xJ)
        Js = [J0]
        for n in range(N):
            Js.append(Js[-1] * self.chunk_decay[:, :, n] + intraJ[:, :, n, -1])
        self.J_starts = torch.stack(Js, 2)  # [B,H,N+1,G,K]
        self.J = intraJ + self.eG[..., None, :] * self.J_starts[:, :, :-1, None]  # [B,H,N,C,G,K]
        self.I = self.J + Ip
        self.r = self.qc[..., None, :] / self.I  # q ⊘ I^{(g)}, [B,H,N,C,G,K]
        # M at the chunk boundaries, shared by the groups
        U = self.wc.transpose(-1, -2) @ (self.kc * self.to_end)  # [B,H,N,V,K]
        Ms = [M0]
        for n in range(N):
            Ms.append(Ms[-1] * self.chunk_decay[:, :, n] + U[:, :, n])
        self.M_starts = torch.stack(Ms, 2)  # [B,H,N+1,V,K]
        # per group: the intra-chunk matrix (r kᵀ) ∘ D and the read of the chunk-start state
        rg = self.r.movedim(-2, -3)  # [B,H,N,G,C,K]
        self.rg = rg
        if self.D.dim() == 5:
            self.A = (rg @ self.kc[:, :, :, None].transpose(-1, -2)) * self.D[:, :, :, None]  # [B,H,N,G,C,C]
        else:
            self.A = torch.einsum("bhngtk,bhnsk,bhntsk->bhngts", rg, self.kc, self.D)
        Mg = self.M_starts[:, :, :-1].unflatten(-2, (G, V // G))  # [B,H,N,G,R,K]
        inter = (rg * self.eG[:, :, :, None]) @ Mg.transpose(-1, -2)  # [B,H,N,G,C,R]
        self.o = scale * _ungroup(inter + self.A @ _group(self.wc, G))  # [B,H,N,C,V]
        self.var = None
        if with_var:
            self.var = scale * scale * (self.qc[..., None, :] * self.r).sum(-1)  # [B,H,N,C,G]


class GroupedDiagonal(torch.autograd.Function):
    """Palimpsa with ``b`` shared in G groups of value rows, forward and hand-written backward.

    Inputs ``[B,H,T,...]``: ``q, k [K]``, ``v [V]``, ``beta [1|V]`` or None, ``b [G]``, ``g [Kg]`` (log-decay,
    Kg = 1 or K, already clamped below); ``M0 [B,H,V,K]`` (``I ∘ μ`` before the first token),
    ``J0 [B,H,G,K]`` (``I − Ip`` per group); ``Ip [1,H,1,1,1,1]``. Returns ``o [B,H,T,V]``, ``var [B,H,T,G]``
    (zeros unless ``with_var``), ``M_T [B,H,V,K]``, ``J_T [B,H,G,K]``.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, b, g, M0, J0, Ip, scale: float, C: int, with_var: bool):
        f = _Forward(q, k, v, beta, b, g, M0, J0, Ip, scale, C, with_var)
        ctx.save_for_backward(q, k, v, beta, b, g, M0, J0, Ip)
        ctx.scale, ctx.C, ctx.with_var = scale, C, with_var
        T = q.shape[2]
        var = _unchunk(f.var, T) if with_var else q.new_zeros(b.shape)
        return _unchunk(f.o, T), var, f.M_starts[:, :, -1].clone(), f.J_starts[:, :, -1].clone()

    @staticmethod
    def backward(ctx, do, dvar, dM_T, dJ_T):
        q, k, v, beta, b, g, M0, J0, Ip = ctx.saved_tensors
        scale, C, with_var = ctx.scale, ctx.C, ctx.with_var
        f = _Forward(q, k, v, beta, b, g, M0, J0, Ip, scale, C, False)
        T, G = f.T, f.G
        N = f.qc.shape[2]
        scalar = f.D.dim() == 5
        doc = _pad_chunks(do, C)  # [B,H,N,C,V]
        dog = _group(doc, G)  # [B,H,N,G,C,R]
        wg = _group(f.wc, G)
        rt = f.rg * f.eG[:, :, :, None]  # r ∘ e^{G}, [B,H,N,G,C,K]
        # --- M: gradient reaching each chunk's end state, reverse over chunks
        read = scale * (dog.transpose(-1, -2) @ rt).flatten(-3, -2)  # what chunk n reads of its start, [B,H,N,V,K]
        dS = dM_T
        ends = [None] * N
        for n in reversed(range(N)):
            ends[n] = dS
            dS = dS * f.chunk_decay[:, :, n] + read[:, :, n]
        dM0 = dS
        dS_end = torch.stack(ends, 2)  # [B,H,N,V,K]
        # --- M: inside the chunks
        dA = (scale * (dog @ wg.transpose(-1, -2))).tril()  # [B,H,N,G,C,C]
        Mg = f.M_starts[:, :, :-1].unflatten(-2, (G, dM0.shape[-2] // G))  # [B,H,N,G,R,K]
        if scalar:
            W = dA * f.D[:, :, :, None]
            dr = W @ f.kc[:, :, :, None]  # [B,H,N,G,C,K]
            dk = (W.transpose(-1, -2) @ f.rg).sum(3)  # [B,H,N,C,K]
        else:
            W = dA[..., None] * f.D[:, :, :, None]  # [B,H,N,G,C,C,K]
            dr = (W * f.kc[:, :, :, None, None]).sum(-2)
            dk = (W * f.rg[..., :, None, :]).sum((3, -3))
        dr = dr + scale * (dog @ Mg) * f.eG[:, :, :, None]
        dk = dk + (f.wc @ dS_end) * f.to_end
        dw = scale * _ungroup(f.A.transpose(-1, -2) @ dog) + (f.kc * f.to_end) @ dS_end.transpose(-1, -2)
        # log-decay through M: e^{G_t} scales r_t, e^{-G_s} scales k_s, e^{G_last} the chunk's end state
        dGc = (f.rg * dr).sum(3) - f.kc * dk
        dGc[..., -1, :] += (dS_end * f.M_starts[:, :, 1:]).sum(-2)
        # --- r = q ⊘ I (and the variance) -> q and I
        drI = dr.movedim(-3, -2) / f.I  # [B,H,N,C,G,K]
        dq = drI.sum(-2)
        dI = -drI * f.r
        if with_var:
            dvc = _pad_chunks(dvar, C)[..., None]  # [B,H,N,C,G,1]
            s2 = scale * scale
            dq = dq + 2 * s2 * (dvc * f.r).sum(-2)
            dI = dI - s2 * dvc * f.r * f.r
        dIp = dI.sum((0, 2, 3, 4, 5)).view(Ip.shape)
        # --- J: adjoint Ĵ_t = dJ_t + α_{t+1} Ĵ_{t+1}, chunk boundaries first, then inside the chunks
        dJ_in = (f.eG[..., None, :] * dI).sum(3)  # what each chunk's start state receives from its tokens
        dJ = dJ_T
        J_ends = [None] * N
        for n in reversed(range(N)):
            J_ends[n] = dJ
            dJ = dJ * f.chunk_decay[:, :, n] + dJ_in[:, :, n]
        dJ0 = dJ
        J_end = torch.stack(J_ends, 2)  # [B,H,N,G,K]
        Dt = f.D.transpose(3, 4)
        Jhat = _intra(Dt, dI) + f.to_end[..., None, :] * J_end[:, :, :, None]  # [B,H,N,C,G,K]
        db = (Jhat * f.k2[..., None, :]).sum(-1)  # [B,H,N,C,G]
        dk = dk + 2 * f.kc * (Jhat * f.bc[..., None]).sum(-2)
        dgJ = (Jhat * (f.J - f.xJ)).sum(-2)  # Σ_g Ĵ_t ∘ α_t J_{t-1}, [B,H,N,C,K]
        # --- assemble
        dg = dGc.flip(-2).cumsum(-2).flip(-2)
        if scalar:
            dg = dg.sum(-1, keepdim=True) + dgJ.sum(-1, keepdim=True)
        else:
            dg = dg + dgJ
        dw = _unchunk(dw, T)
        dv = dw if beta is None else dw * beta
        dbeta = None
        if beta is not None:
            dbeta = dw * v
            dbeta = dbeta.sum(-1, keepdim=True) if beta.shape[-1] == 1 else dbeta
        return (_unchunk(dq, T), _unchunk(dk, T), dv, dbeta, _unchunk(db, T), _unchunk(dg, T), dM0, dJ0, dIp,
                None, None, None)


def _poison(x: Tensor) -> Tensor:
    """``[B,H,T]``: True where any entry of ``x [B,H,T,...]`` is NaN or ±inf."""
    return (~torch.isfinite(x)).flatten(3).any(-1) if x.dim() > 3 else ~torch.isfinite(x)


def grouped_diagonal(q: Tensor, k: Tensor, v: Tensor, beta: Optional[Tensor], b: Tensor, g: Tensor,
                     M0: Tensor, J0: Tensor, Ip: Tensor, scale: float, C: int, with_var: bool
                     ) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Grouped Palimpsa (see the module docstring), heads-first: ``q, k [B,H,T,K]``, ``v [B,H,T,V]``,
    ``beta [B,H,T,1|V]`` or None, ``b [B,H,T,G]``, ``g [B,H,T,Kg]``, ``M0 [B,H,V,K]``, ``J0 [B,H,G,K]``,
    ``Ip [H]``. Returns ``o [B,H,T,V]``, ``var [B,H,T,V]`` or None, ``M_T [B,H,V,K]``, ``J_T [B,H,G,K]``.
    """
    B, H, T, K = q.shape
    V, G = v.shape[-1], b.shape[-1]
    if g.shape[-1] != 1:
        C = min(C, VECTOR_CHUNK)
    floor = LOG_DECAY_FLOOR.get(q.dtype, -120.0)
    bad_state = None
    bad_q = None
    inputs = [x for x in (q, k, v, beta, b) if x is not None]
    g_bad = torch.isnan(g) | (g == float("inf"))
    if not (all(bool(torch.isfinite(x).all()) for x in inputs) and not bool(g_bad.any())):
        # causal handling of non-finite inputs: zero them before any product, poison outputs from there on
        bad_q = _poison(q)
        bad_now = _poison(k) | _poison(v) | _poison(b) | g_bad.flatten(3).any(-1)
        if beta is not None:
            bad_now = bad_now | _poison(beta)
        bad_state = bad_now.cumsum(-1) > 0  # [B,H,T]
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        q, k, v, b = (torch.where(torch.isfinite(x), x, zero) for x in (q, k, v, b))
        if beta is not None:
            beta = torch.where(torch.isfinite(beta), beta, zero)
        g = torch.where(g_bad, zero, g)
    g = g.clamp(min=floor)
    Ip6 = Ip.view(1, H, 1, 1, 1, 1)
    o, var, M_T, J_T = GroupedDiagonal.apply(q, k, v, beta, b, g, M0, J0, Ip6, scale, C, with_var)
    if with_var:
        var = var[..., None].expand(B, H, T, G, V // G).reshape(B, H, T, V)
    else:
        var = None
    if bad_state is not None:
        nan = torch.full((), float("nan"), dtype=o.dtype, device=o.device)
        bad_o = (bad_state | bad_q)[..., None]
        o = torch.where(bad_o, nan, o)
        var = None if var is None else torch.where(bad_o, nan, var)
        end = bad_state[:, :, -1, None, None]
        M_T, J_T = torch.where(end, nan, M_T), torch.where(end, nan, J_T)
    return o, var, M_T, J_T
