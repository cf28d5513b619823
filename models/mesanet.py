"""MesaNet (von Oswald et al., 2025): the full-posterior exact step (recursive least squares); fla's names.

    q, k = L2(SiLU(conv(q_proj h))), L2(SiLU(conv(k_proj h))),  v = v_proj h
    β = σ(b_proj h),  log α = logsigmoid(a_proj h),  λ = softplus(lambda_params) + lambda_lower_bound
    o = scan(mesanet, lam = λ; scale 1)  =  G (H + diag λ)^{-1} q,   out = o_proj(RMSNorm(o) [∘ silu(g_proj h)])

The reference scan solves each read-out exactly (MesaNet's kernels approximate it by conjugate gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.kernels import scan

from .base import Mixer
from .common import NormThenGate, conv_layer, inverse_softplus, l2_normalize, layer_cache, short_convs


class MesaNet(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, a_proj, b_proj, lambda_params, q_conv1d, k_conv1d, [g_proj], o_norm, o_proj``."""

    registry_name = "mesanet"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: Optional[int] = None, conv_size: int = 4,
                 conv_bias: bool = False, use_output_gate: bool = False, norm_eps: float = 1e-5,
                 lambda_lower_bound: float = 0.25) -> None:
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        super().__init__(hidden_size, dict(num_heads=num_heads, head_dim=head_dim, conv_size=conv_size,
                                           conv_bias=conv_bias, use_output_gate=use_output_gate, norm_eps=norm_eps,
                                           lambda_lower_bound=lambda_lower_bound))
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, head_dim
        self.lambda_lower_bound = lambda_lower_bound
        dim = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, dim, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)
        self.lambda_params = nn.Parameter(inverse_softplus(torch.full((dim,), 1.0 - lambda_lower_bound)))
        self.q_conv1d = conv_layer(dim, conv_size, conv_bias)
        self.k_conv1d = conv_layer(dim, conv_size, conv_bias)
        self.g_proj = nn.Linear(hidden_size, dim, bias=False) if use_output_gate else None
        self.o_norm = NormThenGate(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(dim, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``."""
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, K = self.num_heads, self.head_k_dim
        (q, k), conv_states = short_convs(self, hidden_states, conv, ("q", "k"))
        q, k = l2_normalize(q.view(B, T, H, K)), l2_normalize(k.view(B, T, H, K))
        v = self.v_proj(hidden_states).view(B, T, H, K)
        beta = torch.sigmoid(self.b_proj(hidden_states).float())
        log_decay = F.logsigmoid(self.a_proj(hidden_states).float())
        lam = (F.softplus(self.lambda_params.float()) + self.lambda_lower_bound).view(H, K)
        result = scan(self.objective, q, k, v, backend="auto", log_decay=log_decay, beta=beta, lam=lam, scale=1.0,
                      initial_state=None if entry is None else entry.get("state"),
                      output_final_state=entry is not None)
        gate = None if self.g_proj is None else self.g_proj(hidden_states).view(B, T, H, K)
        o = self.o_norm(result.output, gate)
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * K).to(hidden_states.dtype))
