"""LongHorn (Liu et al., 2024): an exact proximal regression step with a diagonal transition, and its twin.

    x, z = in_proj(h);  x = SiLU(conv1d(x));  [dt_low | B | C] = x_proj(x)
    β = σ(dt_proj(dt_low))  (one rate per channel);  q = C, k = B, v = x  (one head, K = N, V = d_inner)
    y = scan(longhorn)  + D ∘ x;   out = out_proj(y ∘ silu(z))

``MetaLongHorn`` (registry ``meta_longhorn``) adds ``b = γ · β · σ(W_b2 W_b1 h) · softplus(b_scale)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.kernels.dispatch import scan

from .base import Mixer
from .common import causal_conv, conv_layer, layer_cache, padding_mask


class LongHorn(Mixer):
    """Keys: ``in_proj, conv1d, x_proj, dt_proj, D, out_proj``."""

    registry_name = "longhorn"

    def __init__(self, hidden_size: int, *, expand: int = 2, state_size: int = 16, dt_rank: Optional[int] = None,
                 conv_kernel: int = 4, use_conv_bias: bool = True, use_bias: bool = False,
                 importance_rank: Optional[int] = None, importance_groups: Optional[int] = None) -> None:
        dt_rank = dt_rank if dt_rank is not None else math.ceil(hidden_size / 16)
        super().__init__(hidden_size, dict(expand=expand, state_size=state_size, dt_rank=dt_rank,
                                           conv_kernel=conv_kernel, use_conv_bias=use_conv_bias, use_bias=use_bias))
        d_inner = expand * hidden_size
        self.d_inner, self.dt_rank = d_inner, dt_rank
        self.num_heads, self.head_k_dim, self.head_v_dim = 1, state_size, d_inner
        self.in_proj = nn.Linear(hidden_size, 2 * d_inner, bias=use_bias)
        self.conv1d = conv_layer(d_inner, conv_kernel, use_conv_bias)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * state_size, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, hidden_size, bias=use_bias)
        if importance_groups is not None and importance_groups != d_inner:
            raise ValueError(f"importance_groups={importance_groups}: LongHorn's write rate β is per value channel, "
                             "so its importance rate is too (leave importance_groups None)")
        self._add_importance(importance_rank, groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``; ``attention_mask [B, T]`` (0 = padding): padded
        tokens leave the convolution and scan states unchanged (zero conv input, β = 0)."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        B, T, _ = hidden_states.shape
        N = self.head_k_dim
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        if mask is not None:
            x = x * mask
        x, conv_state = causal_conv(x, self.conv1d.weight, self.conv1d.bias, None if entry is None else entry.get("conv"))
        dt_low, Bm, Cm = self.x_proj(x).split([self.dt_rank, N, N], dim=-1)
        beta = torch.sigmoid(self.dt_proj(dt_low).float())[:, :, None, :]  # [B, T, 1, d_inner]
        if mask is not None:
            beta = beta * mask.float()[:, :, :, None]
        result = scan(self.objective, Cm[:, :, None, :], Bm[:, :, None, :], x[:, :, None, :], backend="auto",
                      beta=beta, scale=1.0,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, beta))
        y = (result.output[:, :, 0].float() + self.D.float() * x.float()) * F.silu(z.float())
        if entry is not None:
            cache.update(layer_idx, conv=conv_state, state=result.final_state)
        return self.out_proj(y.to(hidden_states.dtype))


class MetaLongHorn(LongHorn):
    """LongHorn on a diagonal posterior (registry ``meta_longhorn``): γ = 0 is LongHorn."""

    registry_name = "meta_longhorn"
