"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025) and its metaplastic twin; fla's parameter names.

    q, k, v = SiLU(conv(q_proj h)), SiLU(conv(k_proj h)), SiLU(conv(v_proj h));  q, k L2-normalised per head
    grouped value heads (fla's ``num_v_heads = r · num_heads``): value head j reads q/k head ``j // r``
    β = σ(b_proj h),   log α = −exp(A_log) · softplus(a_proj h + dt_bias)
    o = scan(gated_deltanet; scale K^-1/2),  out = o_proj(RMSNorm(o) ∘ silu(g_proj h))   (norm, then gate)

``MetaGatedDeltaNet`` (registry ``meta_gated_deltanet``) adds ``b = γ · β · σ(W_b2 W_b1 h) · softplus(b_scale)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.registry import registry

from metaplastic.kernels.dispatch import scan

from .base import Mixer
from .common import NormThenGate, conv_layer, init_dt_bias, l2_normalize, layer_cache, padding_mask, short_convs


class GatedDeltaNet(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, a_proj, b_proj, A_log, dt_bias, {q,k,v}_conv1d, g_proj, o_norm, o_proj``."""

    registry_name = "gated_deltanet"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: Optional[int] = None,
                 expand_v: float = 2.0, conv_size: int = 4, conv_bias: bool = False, use_gate: bool = True,
                 norm_eps: float = 1e-5, num_v_heads: Optional[int] = None,
                 importance_rank: Optional[int] = None, importance_groups: Optional[int] = None) -> None:
        """``num_heads`` q/k heads of ``head_dim``; ``num_v_heads`` (default ``num_heads``, else a multiple of
        it) value heads of ``head_dim · expand_v``, one memory per value head."""
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        head_v_dim = int(head_dim * expand_v)
        if head_dim < 1 or head_v_dim != head_dim * expand_v:
            raise ValueError(f"head_dim={head_dim}, expand_v={expand_v}: head_dim·expand_v must be a positive integer")
        value_heads = num_heads if num_v_heads is None else num_v_heads
        if value_heads < num_heads or value_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        kwargs = dict(num_heads=num_heads, head_dim=head_dim, expand_v=expand_v, conv_size=conv_size,
                      conv_bias=conv_bias, use_gate=use_gate, norm_eps=norm_eps)
        if num_v_heads is not None:
            kwargs["num_v_heads"] = num_v_heads
        super().__init__(hidden_size, kwargs)
        # the memory has one head per value head: num_heads below is the number of memories
        self.num_qk_heads = num_heads
        self.num_heads, self.head_k_dim, self.head_v_dim = value_heads, head_dim, head_v_dim
        key_dim, value_dim = num_heads * head_dim, value_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, value_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, value_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(value_heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(init_dt_bias(value_heads))
        self.q_conv1d = conv_layer(key_dim, conv_size, conv_bias)
        self.k_conv1d = conv_layer(key_dim, conv_size, conv_bias)
        self.v_conv1d = conv_layer(value_dim, conv_size, conv_bias)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_gate else None
        self.o_norm = NormThenGate(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.scale = registry[self.registry_name].scale_for(head_dim)
        self._add_importance(importance_rank, groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``; ``attention_mask [B, T]`` (0 = padding): padded
        tokens leave the convolution and scan states unchanged (zero conv input, α = 1, β = 0)."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        (q, k, v), conv_states = short_convs(self, hidden_states, conv, mask=mask)
        groups = H // self.num_qk_heads  # value heads per q/k head (1 without grouped values)
        q = l2_normalize(q.view(B, T, self.num_qk_heads, K)).repeat_interleave(groups, dim=2)
        k = l2_normalize(k.view(B, T, self.num_qk_heads, K)).repeat_interleave(groups, dim=2)
        v = v.view(B, T, H, V)
        beta = torch.sigmoid(self.b_proj(hidden_states).float())
        log_decay = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())
        if mask is not None:
            beta, log_decay = beta * mask.float(), log_decay * mask.float()
        result = scan(self.objective, q, k, v, backend="auto", log_decay=log_decay, beta=beta, scale=self.scale,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, beta))
        gate = None if self.g_proj is None else self.g_proj(hidden_states).view(B, T, H, V)
        o = self.o_norm(result.output, gate)
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * V).to(hidden_states.dtype))


class MetaGatedDeltaNet(GatedDeltaNet):
    """Gated DeltaNet on a diagonal posterior (registry ``meta_gated_deltanet``): γ = 0 is Gated DeltaNet."""

    registry_name = "meta_gated_deltanet"
