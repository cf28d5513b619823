"""Gated Linear Attention (Yang et al., ICML 2024) and its metaplastic twin; fla's parameter names.

    q, k, v = q_proj h, k_proj h, v_proj h          (SiLU(conv(·)) each with ``use_short_conv``)
    log α = gk = logsigmoid(W2 W1 h) / gate_logit_normalizer   (one decay per key channel; ``clamp_min``)
    q, k = φ(q), φ(k)                                (the optional ``feature_map`` φ)
    o = scan(gla; scale K^-1/2),  out = o_proj(RMSNorm(o) ∘ silu(g_proj h))   (norm, then gate)

Sizes as fla's ``GatedLinearAttention``: ``num_heads`` heads of ``hidden·expand_k / num_heads`` key and
``hidden·expand_v / num_heads`` value channels; ``num_kv_heads`` (a divisor of ``num_heads``) key / value /
decay heads, head j reading key head ``j // (num_heads / num_kv_heads)``. One memory per head.

``MetaGLA`` (registry ``meta_gla``) runs the same gates on a diagonal posterior with
``b = γ · σ(W_b2 W_b1 h) · softplus(b_scale)`` (GLA's write rate is β ≡ 1); at γ = 0 it is GLA (limit 2).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.kernels.dispatch import scan
from metaplastic.registry import registry

from .base import Mixer, RankSpec
from .common import NormThenGate, conv_layer, layer_cache, padding_mask, short_convs

FEATURE_MAPS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "sigmoid": torch.sigmoid, "silu": F.silu, "swish": F.silu,
    "sqrelu": lambda x: F.relu(x).square(),
}


class GLA(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, [g_proj], [{q,k,v}_conv1d], gk_proj.0, gk_proj.1, o_proj`` and
    ``g_norm_swish_gate`` (output gate with the fused norm) or ``g_norm``."""

    registry_name = "gla"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, num_kv_heads: Optional[int] = None,
                 expand_k: float = 0.5, expand_v: float = 1.0, feature_map: Optional[str] = None,
                 use_short_conv: bool = False, conv_size: int = 4, conv_bias: bool = False,
                 use_output_gate: bool = True, fuse_norm: bool = True, norm_eps: float = 1e-5,
                 gate_logit_normalizer: float = 16, gate_low_rank_dim: int = 16, clamp_min: Optional[float] = None,
                 importance_rank: RankSpec = None, importance_bias: bool = True, importance_gate: bool = True,
                 importance_init: str = "identity", importance_groups: Optional[int] = None) -> None:
        """Arguments as fla's ``GatedLinearAttention`` (``fuse_norm`` only names the norm's parameter:
        ``g_norm_swish_gate`` when True with an output gate, else ``g_norm``; the math is the same).
        ``importance_*``: the importance path of the twin (:meth:`Mixer._add_importance`)."""
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a positive multiple of num_kv_heads={num_kv_heads}")
        key_dim, value_dim = hidden_size * expand_k, hidden_size * expand_v
        if (key_dim != round(key_dim) or value_dim != round(value_dim) or round(key_dim) % num_heads
                or round(value_dim) % num_heads or key_dim < num_heads or value_dim < num_heads):
            raise ValueError(f"hidden_size·expand_k = {key_dim} and hidden_size·expand_v = {value_dim} must be "
                             f"positive integers divisible by num_heads={num_heads}")
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map={feature_map!r} is not one of {sorted(FEATURE_MAPS)} (or None)")
        if not (isinstance(gate_logit_normalizer, (int, float)) and gate_logit_normalizer > 0):
            raise ValueError(f"gate_logit_normalizer={gate_logit_normalizer!r} must be a positive number")
        if clamp_min is not None and not clamp_min <= 0:
            raise ValueError(f"clamp_min={clamp_min!r} must be ≤ 0 (a log-decay)")
        kwargs = dict(num_heads=num_heads, expand_k=expand_k, expand_v=expand_v, use_short_conv=use_short_conv,
                      conv_size=conv_size, conv_bias=conv_bias, use_output_gate=use_output_gate, norm_eps=norm_eps,
                      gate_logit_normalizer=gate_logit_normalizer, gate_low_rank_dim=gate_low_rank_dim)
        optional = dict(num_kv_heads=num_kv_heads, feature_map=feature_map, clamp_min=clamp_min)
        kwargs.update({key: val for key, val in optional.items() if val is not None})
        if not fuse_norm:
            kwargs["fuse_norm"] = False
        super().__init__(hidden_size, kwargs)
        key_dim, value_dim = round(key_dim), round(value_dim)
        self.num_heads, self.num_kv_heads = num_heads, kv_heads
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.use_short_conv, self.feature_map = use_short_conv, feature_map
        self.gate_logit_normalizer, self.clamp_min = float(gate_logit_normalizer), clamp_min
        kv_key_dim, kv_value_dim = kv_heads * self.head_k_dim, kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_output_gate else None
        if use_short_conv:
            self.q_conv1d = conv_layer(key_dim, conv_size, conv_bias)
            self.k_conv1d = conv_layer(kv_key_dim, conv_size, conv_bias)
            self.v_conv1d = conv_layer(kv_value_dim, conv_size, conv_bias)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, kv_key_dim, bias=True))
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        norm = NormThenGate(self.head_v_dim, eps=norm_eps)
        self.norm_name = "g_norm_swish_gate" if fuse_norm and use_output_gate else "g_norm"
        setattr(self, self.norm_name, norm)
        self.scale = registry[self.registry_name].scale_for(self.head_k_dim)
        self._add_importance(importance_rank, gated=importance_gate, bias=importance_bias, init=importance_init,
                             groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``; ``attention_mask [B, T]`` (0 = padding): padded
        tokens leave the convolution and scan states unchanged (zero conv input and value, α = 1, b = 0)."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, Hkv, K, V = self.num_heads, self.num_kv_heads, self.head_k_dim, self.head_v_dim
        if self.use_short_conv:
            (q, k, v), conv_states = short_convs(self, hidden_states, conv, mask=mask)
        else:
            q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
            conv_states = {}
        groups = H // Hkv  # heads per key / value head
        q = q.view(B, T, H, K)
        k = k.view(B, T, Hkv, K).repeat_interleave(groups, dim=2)
        v = v.view(B, T, Hkv, V).repeat_interleave(groups, dim=2)
        gk = F.logsigmoid(self.gk_proj(hidden_states).float()) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            gk = gk.clamp(min=self.clamp_min)
        gk = gk.view(B, T, Hkv, K).repeat_interleave(groups, dim=2)
        if self.feature_map is not None:
            q, k = FEATURE_MAPS[self.feature_map](q), FEATURE_MAPS[self.feature_map](k)
        rate = hidden_states.new_ones(B, T, H, dtype=torch.float32)  # GLA writes with β ≡ 1
        if mask is not None:
            v, gk, rate = v * mask[..., None], gk * mask.float()[..., None], rate * mask.float()
        result = scan(self.objective, q, k, v, backend="auto", log_decay=gk, scale=self.scale,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, rate))
        gate = None if self.g_proj is None else self.g_proj(hidden_states).view(B, T, H, V)
        o = getattr(self, self.norm_name)(result.output, gate)
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * V).to(hidden_states.dtype))


class MetaGLA(GLA):
    """GLA on a diagonal posterior (registry ``meta_gla``): γ = 0 is GLA."""

    registry_name = "meta_gla"
