"""One token of the fused recurrent kernel, row form: shared by the forward (``fused_recurrent.py``) and the
backward (``fused_recurrent_bwd.py``) Triton kernels, with the host-side plan of a call and the register
ceilings of their launches.

:func:`_load_token` reads token ``t`` of a head, :func:`_prior` applies the stabilised forgetting and
:func:`_update` the token's evidence (the row forms of :mod:`metaplastic.kernels.flags`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import flags

Tensor = torch.Tensor
# the flags of flags.py by name, as constants a Triton kernel may read
_POINT, _DIAGONAL = tl.constexpr(flags.POINT), tl.constexpr(flags.DIAGONAL)
_HEBBIAN, _GRADIENT, _EXACT = tl.constexpr(flags.HEBBIAN), tl.constexpr(flags.GRADIENT), tl.constexpr(flags.EXACT)
_FORGET_NONE, _FORGET_SCALAR = tl.constexpr(flags.FORGET_NONE), tl.constexpr(flags.FORGET_SCALAR)
_FORGET_VECTOR = tl.constexpr(flags.FORGET_VECTOR)


@triton.jit
def _load_token(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                FORGET: tl.constexpr, HAS_BETA: tl.constexpr, BETA_PER_V: tl.constexpr,
                HAS_B: tl.constexpr, B_PER_V: tl.constexpr, DTYPE: tl.constexpr):
    """Token ``t`` of head ``i_h``: q, k ``[BK]``; v, β, b ``[BV]``; decay α ``[1, BK]`` (1 if no forgetting)."""
    p_k = (t * H + i_h) * K + o_k
    p_v = (t * H + i_h) * V + o_v
    qt = tl.load(q + p_k, mask=m_k, other=0.).to(DTYPE)
    kt = tl.load(k + p_k, mask=m_k, other=0.).to(DTYPE)
    vt = tl.load(v + p_v, mask=m_v, other=0.).to(DTYPE)
    if HAS_BETA:
        if BETA_PER_V:
            bt = tl.load(beta + p_v, mask=m_v, other=0.).to(DTYPE)
        else:
            bt = tl.zeros([BV], dtype=DTYPE) + tl.load(beta + t * H + i_h).to(DTYPE)
    else:
        bt = tl.full([BV], 1., DTYPE)
    if HAS_B:
        if B_PER_V:
            bb = tl.load(b + p_v, mask=m_v, other=0.).to(DTYPE)
        else:
            bb = tl.zeros([BV], dtype=DTYPE) + tl.load(b + t * H + i_h).to(DTYPE)
    else:
        bb = tl.zeros([BV], dtype=DTYPE)
    if FORGET == _FORGET_SCALAR:
        a = tl.zeros([1, BK], dtype=DTYPE) + tl.exp(tl.load(g + t * H + i_h).to(DTYPE))
    elif FORGET == _FORGET_VECTOR:
        a = tl.exp(tl.load(g + p_k, mask=m_k, other=0.).to(DTYPE))[None, :]
    else:
        a = tl.full([1, BK], 1., DTYPE)
    return qt, kt, vt, bt, bb, a


@triton.jit
def _prior(s1, s2, a, ip, POSTERIOR: tl.constexpr, FORGET: tl.constexpr):
    """Stabilised forgetting -> prior mean rows ``m`` and prior precision ``P⁻`` (point: the scalar Ip).

    diagonal: ``P⁻ = α I + (1 − α) Ip``, ``m = α I μ / P⁻``; point: ``m = α S``.
    """
    if POSTERIOR == _POINT:
        Pm = ip
        if FORGET == _FORGET_NONE:
            m = s1
        else:
            m = a * s1
    else:
        if FORGET == _FORGET_NONE:
            Pm = s2
            m = s1
        else:
            Pm = a * s2 + (1. - a) * ip
            m = a * s2 * s1 / Pm
    return m, Pm


@triton.jit
def _update(m, Pm, kt, vt, bt, bb, POSTERIOR: tl.constexpr, UPDATE: tl.constexpr):
    """The token's evidence -> posterior mean rows ``mu`` and precision ``P = P⁻ + b k²`` (see flags.py)."""
    k_ = kt[None, :]
    if POSTERIOR == _DIAGONAL:
        P = Pm + bb[:, None] * (k_ * k_)
    else:
        P = Pm
    if UPDATE == _HEBBIAN:
        mu = (Pm * m + (bt * vt)[:, None] * k_) / P
    elif UPDATE == _GRADIENT:
        r = vt - tl.sum(m * k_, 1)
        mu = m + (bt * r)[:, None] * k_ / P
    else:
        d = k_ / Pm
        c = bt / (1. + bt * tl.sum(d * k_, 1))
        if UPDATE == _EXACT:
            r = vt - tl.sum(m * k_, 1)
            mu = m + (c * r)[:, None] * d
        else:
            mu = m + c[:, None] * d * (vt[:, None] - k_ * m)
    return mu, P


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that is not a differentiable tensor."""

    flags: Dict[str, int]
    B: int
    T: int
    H: int
    K: int
    V: int
    N: int
    BK: int
    BV: int
    BV_bwd: int  # value rows per backward program (more live tensors: a smaller block)
    C: int
    cg_steps: int
    cg_start: int  # 0 zero, 1 previous token's solution, 2 q / (diag P + ε)
    cg_eps: float
    dtype: torch.dtype
    ip: Tensor           # [H] prior precision, compute dtype
    scale: Tensor        # [1] read-out scale, compute dtype
    lam: Optional[Tensor]
    cu_seqlens: Tensor   # [N+1] int32 (dense batches become packed ones)
    seg_offsets: Tensor  # [N] int32, index of each sequence's first checkpoint
    n_segments: int
    output_variance: bool
    output_final_state: bool
    beta_per_v: bool
    b_per_v: bool

    @property
    def NV(self) -> int:
        return triton.cdiv(self.V, self.BV)

    @property
    def NV_bwd(self) -> int:
        return triton.cdiv(self.V, self.BV_bwd)



@triton.jit
def _advance(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v, s1, s2, ip,
             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             POSTERIOR: tl.constexpr, UPDATE: tl.constexpr, FORGET: tl.constexpr, HAS_BETA: tl.constexpr,
             BETA_PER_V: tl.constexpr, HAS_B: tl.constexpr, B_PER_V: tl.constexpr, DTYPE: tl.constexpr):
    """The state rows ``(s1, s2)`` ``[BV, BK]`` after token ``t`` (forgetting, then the token's evidence), and
    the token's query ``[BK]``."""
    qt, kt, vt, bt, bb, a = _load_token(q, k, v, g, beta, b, t, i_h, o_k, o_v, m_k, m_v, H, K, V, BK, BV,
                                        FORGET, HAS_BETA, BETA_PER_V, HAS_B, B_PER_V, DTYPE)
    m, Pm = _prior(s1, s2, a, ip, POSTERIOR, FORGET)
    s1, P = _update(m, Pm, kt, vt, bt, bb, POSTERIOR, UPDATE)
    if POSTERIOR == _DIAGONAL:
        s2 = P
    return qt, s1, s2

# Register ceilings (ptxas ``.maxnreg``) for the configurations where ptxas's own register choice, at the
# benchmark's K = V = 128, spills a value to local memory and a ceiling removes the spill at no cost in
# occupancy (``metaplastic bench compile``, Triton 3.9). An entry is the kernel, the compute capability it was
# measured on, the constexprs a launch must all match (fp32 compute: fp64 needs twice the registers), and
# the ceiling. Every other launch keeps ptxas's own choice: one ceiling on every configuration would lower
# the occupancy of those that do not spill. Two backward configurations keep their spill (in the SASS, part of
# an address, stored once before the loops and loaded once per program or per 64-token segment): the
# ceilings that remove it cost a block per SM, measured there:
# - point posterior, exact update with the diagonal transition, fp32 inputs, H100 / H200: ptxas picks 128
#   registers (4 blocks of 4 warps a SM) and spills 8 / 4 bytes; a ceiling of 128 spills 36 bytes, one of 168
#   removes the spill at 161 registers and 3 blocks;
# - diagonal posterior, Hebbian update, vector forgetting, b per head, bf16 inputs, A100: ptxas picks 168
#   (3 blocks) and spills 8 / 8 bytes; ceilings of 160 to 184 still spill with bf16 or fp32 inputs, 192
#   removes the spill at 2 blocks.
REGISTER_CEILINGS = (
    # forward without checkpoints, diagonal posterior, Hebbian update, vector forgetting, b per value row,
    # A100: ptxas picks 72 registers and spills 4 bytes (fp32 inputs); under a ceiling of 72 it fits 72
    # with no spill (bf16 inputs: 72 either way)
    ("fwd", (8, 0), dict(BK=128, BV=16, POSTERIOR=flags.DIAGONAL, UPDATE=flags.HEBBIAN,
                         FORGET=flags.FORGET_VECTOR, HAS_B=True,
                         B_PER_V=True, SAVE_CKPT=False, DTYPE=tl.float32), 72),
)


def register_ceiling(kernel: str, capability: Optional[Tuple[int, int]], constexprs: Dict) -> Dict[str, int]:
    """The launch option ``{"maxnreg": n}`` of the :data:`REGISTER_CEILINGS` entry matching ``kernel``
    (``"fwd"`` / ``"bwd"``), the device's compute ``capability`` and the launch's ``constexprs``; ``{}`` if
    none does (or off CUDA)."""
    for name, cap, match, ceiling in REGISTER_CEILINGS:
        if name == kernel and cap == capability and all(constexprs.get(k) == v for k, v in match.items()):
            return {"maxnreg": ceiling}
    return {}
