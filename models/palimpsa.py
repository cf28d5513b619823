"""Palimpsa, the paper's layer (Bonnet et al., ICML 2026): a diagonal posterior with a learned importance rate.

    q, k, v = SiLU(conv(proj h)),  q, k L2-normalised per head
    Δ = softplus(a_proj h + dt_bias),  log α = −Δ · exp(A_log),  β = σ(bs_proj h)
    b = σ(W_b2 W_b1 h) · softplus(b_scale) · β      (one rate per value channel, or per group of value rows
                                                     with importance_groups; Ip = exp(Ip_log) = 1, frozen)
    o = scan(palimpsa; scale K^-1/2) + D · v,   out = o_proj(RMSNorm(o) ∘ silu(g_proj h))
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.registry import registry

from metaplastic.kernels import scan

from .base import Mixer
from .common import NormThenGate, conv_layer, init_dt_bias, l2_normalize, layer_cache, short_convs


class Palimpsa(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, {q,k,v}_conv1d, a_proj, dt_bias, A_log, bs_proj, importance.*, D, g_proj,
    o_norm, o_proj``."""

    registry_name = "palimpsa"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: Optional[int] = None,
                 expand_v: float = 1.0, conv_size: int = 4, conv_bias: bool = False, norm_eps: float = 1e-5,
                 importance_rank: Optional[int] = None, importance_groups: Optional[int] = None) -> None:
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        head_v_dim = int(head_dim * expand_v)
        if head_dim < 1 or head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim={head_dim}, expand_v={expand_v}: head_dim·expand_v must be a positive integer")
        super().__init__(hidden_size, dict(num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
                                           conv_size=conv_size, conv_bias=conv_bias, norm_eps=norm_eps))
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, head_v_dim
        key_dim, value_dim = num_heads * head_dim, num_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.q_conv1d = conv_layer(key_dim, conv_size, conv_bias)
        self.k_conv1d = conv_layer(key_dim, conv_size, conv_bias)
        self.v_conv1d = conv_layer(value_dim, conv_size, conv_bias)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.dt_bias = nn.Parameter(init_dt_bias(num_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        self.bs_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.D = nn.Parameter(torch.ones(num_heads))
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_norm = NormThenGate(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.scale = registry[self.registry_name].scale_for(head_dim)
        self._add_importance(importance_rank, gated=False, groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``."""
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        (q, k, v), conv_states = short_convs(self, hidden_states, conv)
        q, k = l2_normalize(q.view(B, T, H, K)), l2_normalize(k.view(B, T, H, K))
        v = v.view(B, T, H, V)
        delta = F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())
        log_decay = -delta * self.A_log.float().exp()
        beta = torch.sigmoid(self.bs_proj(hidden_states).float())
        result = scan(self.objective, q, k, v, backend="auto", log_decay=log_decay, beta=beta, scale=self.scale,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, beta))
        o = result.output.float() + self.D.float()[:, None] * v.float()
        o = self.o_norm(o, self.g_proj(hidden_states).view(B, T, H, V))
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * V).to(hidden_states.dtype))
