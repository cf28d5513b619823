"""Palimpsa, the paper's layer (Bonnet et al., ICML 2026): a diagonal posterior with a learned importance rate.

    q, k, v = SiLU(conv(proj h)),  q, k L2-normalised per head
    Δ = softplus(a_proj h + dt_bias),  log α = −Δ · exp(A_log),  β = σ(bs_proj h)
    b = σ(W_b2 W_b1 h) · softplus(b_scale) · β      (one rate per value channel, or per group of value rows
                                                     with importance_groups; Ip = exp(Ip_log) = 1, frozen)
    o = scan(palimpsa; scale K^-1/2) + D · v,   out = o_proj(RMSNorm(o) ∘ silu(g_proj h))

Sizes: ``num_heads`` q/k heads of ``head_dim · expand_k`` channels, ``num_v_heads`` (default ``num_heads``, else
a multiple of it) value heads of ``head_dim · expand_v``, one memory per value head; value head j reads q/k
head ``j // (num_v_heads / num_heads)`` and that head's Δ projection.

Options that reproduce the paper authors' layer exactly (docs/authors.md#the-palimpsa-layer; defaults are fla's
conventions): ``l2_norm="normalize"`` (``F.normalize``), ``bs_bias=False``, ``A_init_range=(0, 16)``, and the
importance path's ``importance_rank="auto"``, ``importance_bias=False``, ``importance_init="paper"``.
``use_gate=False`` drops the output gate (RMSNorm only), ``use_short_conv=False`` the convolutions (SiLU only),
``use_residual=False`` the ``D · v`` skip (D is kept as a parameter, unused, as in their layer).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.registry import registry

from metaplastic.kernels.dispatch import scan

from .base import Mixer, RankSpec
from .common import (L2_NORMS, NormThenGate, conv_layer, init_A_log, init_dt_bias, l2_normalize, layer_cache,
                     padding_mask, short_convs)

# option -> today's default; an option is recorded in mixer_kwargs only when it departs from it
_DEFAULTS = dict(expand_k=1.0, num_v_heads=None, use_gate=True, use_short_conv=True, use_residual=True,
                 l2_norm="rsqrt", bs_bias=True, A_init_range=(1.0, 16.0))


class Palimpsa(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, {q,k,v}_conv1d, a_proj, dt_bias, A_log, bs_proj, importance.*, D, g_proj,
    o_norm, o_proj``."""

    registry_name = "palimpsa"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: Optional[int] = None,
                 expand_v: float = 1.0, expand_k: float = 1.0, num_v_heads: Optional[int] = None,
                 conv_size: int = 4, conv_bias: bool = False, use_gate: bool = True, use_short_conv: bool = True,
                 use_residual: bool = True, norm_eps: float = 1e-5, l2_norm: str = "rsqrt", bs_bias: bool = True,
                 A_init_range: Sequence[float] = (1.0, 16.0), importance_rank: RankSpec = None,
                 importance_bias: bool = True, importance_gate: bool = False,
                 importance_init: str = "identity", importance_groups: Optional[int] = None) -> None:
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        head_k_dim, head_v_dim = int(head_dim * expand_k), int(head_dim * expand_v)
        if head_dim < 1 or head_v_dim != head_dim * expand_v or head_k_dim != head_dim * expand_k or head_k_dim < 1:
            raise ValueError(f"head_dim={head_dim}, expand_k={expand_k}, expand_v={expand_v}: head_dim·expand_k "
                             "and head_dim·expand_v must be positive integers")
        value_heads = num_heads if num_v_heads is None else num_v_heads
        if value_heads < num_heads or value_heads % num_heads:
            raise ValueError(f"num_v_heads={num_v_heads} must be a multiple of num_heads={num_heads}")
        if l2_norm not in L2_NORMS:
            raise ValueError(f"l2_norm must be one of {L2_NORMS}, got {l2_norm!r}")
        options = dict(expand_k=expand_k, num_v_heads=num_v_heads, use_gate=use_gate, use_short_conv=use_short_conv,
                       use_residual=use_residual, l2_norm=l2_norm, bs_bias=bs_bias,
                       A_init_range=tuple(float(a) for a in A_init_range))
        kwargs = dict(num_heads=num_heads, head_dim=head_dim, expand_v=expand_v, conv_size=conv_size,
                      conv_bias=conv_bias, norm_eps=norm_eps)
        kwargs.update({key: (list(val) if isinstance(val, tuple) else val) for key, val in options.items()
                       if val != _DEFAULTS[key]})
        super().__init__(hidden_size, kwargs)
        self.num_qk_heads, self.l2_norm = num_heads, l2_norm
        self.use_short_conv, self.use_residual = use_short_conv, use_residual
        # one memory per value head: num_heads below counts value heads
        self.num_heads, self.head_k_dim, self.head_v_dim = value_heads, head_k_dim, head_v_dim
        key_dim, value_dim = num_heads * head_k_dim, value_heads * head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = conv_layer(key_dim, conv_size, conv_bias)
            self.k_conv1d = conv_layer(key_dim, conv_size, conv_bias)
            self.v_conv1d = conv_layer(value_dim, conv_size, conv_bias)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.dt_bias = nn.Parameter(init_dt_bias(value_heads))
        self.A_log = nn.Parameter(init_A_log(value_heads, A_init_range))
        self.bs_proj = nn.Linear(hidden_size, value_heads, bias=bs_bias)
        self.D = nn.Parameter(torch.ones(value_heads))
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False) if use_gate else None
        self.o_norm = NormThenGate(head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.scale = registry[self.registry_name].scale_for(head_k_dim)
        self._add_importance(importance_rank, gated=importance_gate, bias=importance_bias, init=importance_init,
                             defaults=dict(importance_gate=False), groups=importance_groups)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``; ``attention_mask [B, T]`` (0 = padding): padded
        tokens leave the convolution and scan states unchanged (zero conv input, α = 1, β = b = 0)."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, Hq, K, V = self.num_heads, self.num_qk_heads, self.head_k_dim, self.head_v_dim
        if self.use_short_conv:
            (q, k, v), conv_states = short_convs(self, hidden_states, conv, mask=mask)
        else:
            q, k, v = (F.silu(proj(hidden_states)) for proj in (self.q_proj, self.k_proj, self.v_proj))
            conv_states = {}
        groups = H // Hq  # value heads per q/k head
        q = l2_normalize(q.view(B, T, Hq, K), form=self.l2_norm).repeat_interleave(groups, dim=2)
        k = l2_normalize(k.view(B, T, Hq, K), form=self.l2_norm).repeat_interleave(groups, dim=2)
        v = v.view(B, T, H, V)
        a = self.a_proj(hidden_states).float().repeat_interleave(groups, dim=-1)
        delta = F.softplus(a + self.dt_bias.float())
        beta = torch.sigmoid(self.bs_proj(hidden_states).float())
        if mask is not None:
            delta, beta = delta * mask.float(), beta * mask.float()
        log_decay = -delta * self.A_log.float().exp()
        result = scan(self.objective, q, k, v, backend="auto", log_decay=log_decay, beta=beta, scale=self.scale,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None, **self.importance_kwargs(hidden_states, beta))
        o = result.output.float()
        if self.use_residual:
            o = o + self.D.float()[:, None] * v.float()
        gate = None if self.g_proj is None else self.g_proj(hidden_states).view(B, T, H, V)
        o = self.o_norm(o, gate)
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * V).to(hidden_states.dtype))
