"""MesaNet (von Oswald et al., 2025): the full-posterior exact step (recursive least squares); fla's names.

    q, k = L2(SiLU(conv(q_proj h))), L2(SiLU(conv(k_proj h))),  v = v_proj h
    β = σ(b_proj h),  log α = logsigmoid(a_proj h),  λ = softplus(lambda_params) + lambda_lower_bound
    o = scan(mesanet, lam = λ; scale 1)  =  G (H + diag λ)^{-1} q,   out = o_proj(RMSNorm(o) [∘ silu(g_proj h)])

The read-out solve is an option (:class:`metaplastic.ReadoutSolver`): ``readout="exact"`` (default) solves
``(H + diag λ) x = q`` exactly; ``readout="cg"`` runs ``cg_steps`` conjugate-gradient steps from ``cg_start``
with ``cg_eps`` added to both denominators. fla's layer runs ``max_cg_step_training`` steps from zero with
ε = 1e-5 (``chunk_mesa_net``) and, for one cached token, ``max_cg_step_decoding`` steps from
``q / (diag H + λ + ε)`` (``mesa_net_decoding_one_step``); :func:`fla_readout` gives the kwargs that reproduce it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from metaplastic.kernels.dispatch import scan
from metaplastic.readout_solver import readout_solver

from .base import Mixer
from .common import NormThenGate, conv_layer, inverse_softplus, l2_normalize, layer_cache, padding_mask, short_convs


FLA_CG_EPS = 1e-5  # fla's MesaNet kernels add it to both CG denominators


def fla_readout(max_cg_step_training: int = 30, max_cg_step_decoding: int = 30) -> dict:
    """The :class:`MesaNet` kwargs that compute the read-out as fla's MesaNet layer does (its defaults: 30, 30)."""
    return dict(readout="cg", cg_steps=max_cg_step_training, cg_start="zero", cg_eps=FLA_CG_EPS,
                cg_steps_decoding=max_cg_step_decoding, cg_start_decoding="diagonal")


class MesaNet(Mixer):
    """Keys: ``q_proj, k_proj, v_proj, a_proj, b_proj, lambda_params, q_conv1d, k_conv1d, [g_proj], o_norm, o_proj``.

    Read-out: ``readout`` (``"exact"`` or ``"cg"``), ``cg_steps``, ``cg_start`` (``"zero"``, ``"previous"``,
    ``"diagonal"``), ``cg_eps``; a call with a cached state and one token uses ``cg_steps_decoding`` and
    ``cg_start_decoding`` instead (None: the same as for other calls)."""

    registry_name = "mesanet"

    def __init__(self, hidden_size: int, *, num_heads: int = 4, head_dim: Optional[int] = None, conv_size: int = 4,
                 conv_bias: bool = False, use_output_gate: bool = False, norm_eps: float = 1e-5,
                 lambda_lower_bound: float = 0.25, readout: str = "exact", cg_steps: Optional[int] = None,
                 cg_start: str = "zero", cg_eps: float = 0.0, cg_steps_decoding: Optional[int] = None,
                 cg_start_decoding: Optional[str] = None) -> None:
        head_dim = head_dim if head_dim is not None else hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        super().__init__(hidden_size, dict(num_heads=num_heads, head_dim=head_dim, conv_size=conv_size,
                                           conv_bias=conv_bias, use_output_gate=use_output_gate, norm_eps=norm_eps,
                                           lambda_lower_bound=lambda_lower_bound))
        self.readout = readout_solver(readout, cg_steps, cg_start, cg_eps)
        decoding = (cg_steps if cg_steps_decoding is None else cg_steps_decoding,
                    cg_start if cg_start_decoding is None else cg_start_decoding)
        self.readout_decoding = readout_solver(readout, *decoding, cg_eps)
        if not self.readout.is_exact or cg_steps_decoding is not None or cg_start_decoding is not None:
            self.mixer_kwargs.update(readout=readout, cg_steps=cg_steps, cg_start=cg_start, cg_eps=cg_eps,
                                     cg_steps_decoding=cg_steps_decoding, cg_start_decoding=cg_start_decoding)
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

    def forward(self, hidden_states: torch.Tensor, cache=None, layer_idx: Optional[int] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``; ``attention_mask [B, T]`` (0 = padding): padded
        tokens leave the convolution and scan states unchanged (zero conv input, α = 1, β = 0)."""
        mask = padding_mask(attention_mask, hidden_states)
        entry = layer_cache(cache, layer_idx)
        conv = {} if entry is None else entry.get("conv", {})
        B, T, _ = hidden_states.shape
        H, K = self.num_heads, self.head_k_dim
        (q, k), conv_states = short_convs(self, hidden_states, conv, ("q", "k"), mask=mask)
        q, k = l2_normalize(q.view(B, T, H, K)), l2_normalize(k.view(B, T, H, K))
        v = self.v_proj(hidden_states).view(B, T, H, K)
        beta = torch.sigmoid(self.b_proj(hidden_states).float())
        log_decay = F.logsigmoid(self.a_proj(hidden_states).float())
        if mask is not None:
            beta, log_decay = beta * mask.float(), log_decay * mask.float()
        lam = (F.softplus(self.lambda_params.float()) + self.lambda_lower_bound).view(H, K)
        state = None if entry is None else entry.get("state")
        decoding = state is not None and T == 1
        result = scan(self.objective, q, k, v, backend="auto", log_decay=log_decay, beta=beta, lam=lam, scale=1.0,
                      initial_state=state, output_final_state=entry is not None,
                      readout=self.readout_decoding if decoding else self.readout)
        gate = None if self.g_proj is None else self.g_proj(hidden_states).view(B, T, H, K)
        o = self.o_norm(result.output, gate)
        if entry is not None:
            cache.update(layer_idx, conv=conv_states, state=result.final_state)
        return self.o_proj(o.reshape(B, T, H * K).to(hidden_states.dtype))
