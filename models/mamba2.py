"""Mamba2 and its metaplastic twin, weight-compatible with transformers' ``Mamba2Mixer``.

    in_proj(h) = [z (d_inner) | xBC (d_inner + 2·G·N) | dt (H)]
    x, B, C    = split(SiLU(conv1d(xBC)))
    Δ = clamp(softplus(dt + dt_bias), time_step_limit),  A = −exp(A_log)
    y = scan(q = C, k = B, v = x, log_decay = Δ·A, beta = Δ)  + D·x       (B, C: groups → heads, contiguous)
    out = out_proj(norm_G(y ∘ silu(z)))                                      (gate, then grouped RMSNorm)

Options that reproduce the paper authors' MetaMamba2 exactly (docs/authors.md#the-metamamba2-layer; defaults are transformers'):
``norm_per_group=False`` (one gated RMSNorm over the whole d_inner), ``A_init_range=(0, 16)`` (A ~ U(0, 16)
instead of transformers' A = 1..H), and the importance path's ``importance_rank="auto"``,
``importance_bias=False``, ``importance_gate=False``, ``importance_init="paper"``.

``MetaMamba2`` runs the same gates through the ``meta_mamba2`` objective (diagonal posterior) with
``b = γ · Δ · σ(W_b2 W_b1 h) · softplus(b_scale)``; at γ = 0 it is Mamba2 (docs/theory.md#limit-1-palimpsa-without-importance).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.kernels.dispatch import scan

from .base import Mixer
from .base import RankSpec
from .common import GroupedGatedRMSNorm, causal_conv, conv_layer, init_A_log, init_dt_bias, layer_cache, padding_mask


class Mamba2(Mixer):
    """Mamba2 mixer. Parameters: ``in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj`` (transformers' names)."""

    registry_name = "mamba2"

    def __init__(self, hidden_size: int, *, num_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 state_size: int = 128, expand: int = 2, n_groups: int = 1, conv_kernel: int = 4,
                 use_bias: bool = False, use_conv_bias: bool = True,
                 time_step_limit: Sequence[float] = (0.0, math.inf), layer_norm_epsilon: float = 1e-5,
                 norm_per_group: bool = True, A_init_range: Optional[Sequence[float]] = None,
                 importance_rank: RankSpec = None, importance_bias: bool = True, importance_gate: bool = True,
                 importance_init: str = "identity", importance_groups: Optional[int] = None) -> None:
        """Sizes as transformers' ``Mamba2Config``. ``norm_per_group``: the gated RMSNorm within each of the
        ``n_groups`` groups (transformers, mamba_ssm) or over the whole d_inner (False: the paper authors').
        ``A_init_range``: None gives A = 1..H (transformers), ``(lo, hi)`` draws A ~ U(lo, hi).
        ``importance_*``: the importance path of the metaplastic twin (:meth:`Mixer._add_importance`);
        ``importance_groups``: one rate per group of value rows (docs/theory.md#limit-8-grouped-importance; None: per value channel)."""
        d_inner = expand * hidden_size
        if head_dim is None:
            head_dim = d_inner // num_heads if num_heads else min(64, d_inner)
        if num_heads is None:
            num_heads = d_inner // head_dim
        if num_heads * head_dim != d_inner:
            raise ValueError(f"num_heads·head_dim = {num_heads}·{head_dim} must equal expand·hidden_size = {d_inner}")
        if num_heads % n_groups:
            raise ValueError(f"num_heads={num_heads} must be divisible by n_groups={n_groups}")
        super().__init__(hidden_size, dict(num_heads=num_heads, head_dim=head_dim, state_size=state_size,
                                           expand=expand, n_groups=n_groups, conv_kernel=conv_kernel,
                                           use_bias=use_bias, use_conv_bias=use_conv_bias,
                                           time_step_limit=[float(t) for t in time_step_limit],
                                           layer_norm_epsilon=layer_norm_epsilon))
        if not norm_per_group:
            self.mixer_kwargs["norm_per_group"] = False
        if A_init_range is not None:
            self.mixer_kwargs["A_init_range"] = [float(a) for a in A_init_range]
        self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size = num_heads, head_dim, n_groups, state_size
        self.head_k_dim, self.head_v_dim = state_size, head_dim
        self.d_inner = d_inner
        self.conv_dim = d_inner + 2 * n_groups * state_size
        self.time_step_limit = tuple(float(t) for t in time_step_limit)
        self.in_proj = nn.Linear(hidden_size, d_inner + self.conv_dim + num_heads, bias=use_bias)
        self.conv1d = conv_layer(self.conv_dim, conv_kernel, use_conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32))
                                  if A_init_range is None else init_A_log(num_heads, A_init_range))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GroupedGatedRMSNorm(d_inner, n_groups if norm_per_group else 1, eps=layer_norm_epsilon)
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=use_bias)
        self._add_importance(importance_rank, gated=importance_gate, bias=importance_bias, init=importance_init,
                             groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden_states [B, T, hidden_size]`` -> ``[B, T, hidden_size]``; reads and updates ``cache``.
        ``attention_mask [B, T]`` (0 = padding): padded tokens leave the convolution and scan states unchanged."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        Bsz, T, _ = hidden_states.shape
        H, P, G, N = self.num_heads, self.head_dim, self.n_groups, self.ssm_state_size
        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, H], dim=-1)
        if mask is not None:  # a zero conv input and Δ = 0 (α = 1, β = b = 0) at padded tokens
            xBC = xBC * mask
        xBC, conv_state = causal_conv(xBC, self.conv1d.weight, self.conv1d.bias,
                                      None if entry is None else entry.get("conv"))
        x, Bm, Cm = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # Δ [B, T, H]
        if mask is not None:
            dt = dt * mask.float()
        A = -torch.exp(self.A_log.float())
        q = Cm.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2)
        k = Bm.reshape(Bsz, T, G, N).repeat_interleave(H // G, dim=2)
        v = x.reshape(Bsz, T, H, P)
        result = scan(self.objective, q, k, v, backend="auto", log_decay=dt * A, beta=dt, scale=1.0,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, dt))
        y = result.output.float() + self.D.float()[:, None] * v.float()
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)
        if entry is not None:
            cache.update(layer_idx, conv=conv_state, state=result.final_state)
        return self.out_proj(y.to(hidden_states.dtype))


class MetaMamba2(Mamba2):
    """Mamba2 with the importance path and the per-head gate γ (registry ``meta_mamba2``)."""

    registry_name = "meta_mamba2"
