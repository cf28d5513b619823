"""The importance path that makes a point-posterior mixer metaplastic (THEORY.md §4, §5).

    b = γ · rate · σ(W_b2 W_b1 h) · softplus(b_scale)        [B, T, H, G]

one rate per value channel (``G = V``, the paper's layer, the default) or, with ``importance_groups = G``
(G dividing the head's value width V), one rate shared by each of G contiguous groups of ``V/G`` value rows
(THEORY.md limit 8; ``G = 1``: head-shared, limit 7). ``W_b2`` then produces ``H·G`` rates.

``rate`` is the mixer's own write-rate gate (Δ for Mamba2, β for Gated DeltaNet and LongHorn), ``γ`` a
per-head gate (γ = 0: b ≡ 0, and the mixer is output-identical to its point-posterior source, limit 2),
and ``Ip = exp(Ip_log)`` the prior precision of p_0, a frozen buffer (0, i.e. Ip = 1).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

INITS = ("identity", "paper")


def check_importance_groups(groups: Optional[int], head_v_dim: int) -> int:
    """The number of importance groups ``G`` that ``groups`` means for heads of value width ``head_v_dim``:
    None is one group per value row (``G = V``); an int must divide ``head_v_dim`` (``ValueError`` naming it)."""
    if groups is None:
        return head_v_dim
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or head_v_dim % groups:
        raise ValueError(f"importance_groups={groups!r} must be a positive integer dividing the head's value width "
                         f"head_v_dim={head_v_dim} (or None: one rate per value channel)")
    return groups


class ImportancePath(nn.Module):
    """``W_b1: hidden → rank``, ``W_b2: rank → H·G`` (with bias), ``b_scale [H]``, ``gamma [H]``, ``Ip_log [H]``.

    ``groups``: importance groups per head (None: ``G = head_v_dim``, one rate per value channel)."""

    def __init__(self, hidden_size: int, num_heads: int, head_v_dim: int, rank: int, gated: bool = True,
                 groups: Optional[int] = None) -> None:
        super().__init__()
        self.num_heads, self.head_v_dim = num_heads, head_v_dim
        self.groups = check_importance_groups(groups, head_v_dim)
        self.W_b1 = nn.Linear(hidden_size, rank, bias=False)
        self.W_b2 = nn.Linear(rank, num_heads * self.groups, bias=True)
        self.b_scale = nn.Parameter(torch.ones(num_heads))
        self.gamma = nn.Parameter(torch.zeros(num_heads)) if gated else None
        self.register_buffer("Ip_log", torch.zeros(num_heads))
        self.reset_parameters("identity")

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity", generator: Optional[torch.Generator] = None) -> None:
        """``identity``: γ = 0 (output-preserving). ``paper``: γ = 1, the plasticity path freshly initialised
        (W_b1, W_b2 ~ N(0, 0.02²), bias 0, b_scale = 1), as the paper's surgery does: not output-preserving."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.W_b1.weight.is_meta:  # built on the meta device: values come later (load or to_empty + reset)
            return
        for w in (self.W_b1.weight, self.W_b2.weight):
            w.copy_(torch.randn(w.shape, generator=generator) * 0.02)
        self.W_b2.bias.zero_()
        self.b_scale.fill_(1.0)
        self.Ip_log.zero_()
        if self.gamma is not None:
            self.gamma.fill_(0.0 if init == "identity" else 1.0)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep γ ≥ 0, so that b ≥ 0 and the precision never falls below its prior (call after each
        optimizer step). At γ = 0 the path still receives gradient; only a step to γ < 0 is cut back."""
        if self.gamma is not None:
            self.gamma.clamp_(min=0.0)

    def prior_precision(self) -> torch.Tensor:
        """``Ip = exp(Ip_log)`` ``[H]``."""
        return self.Ip_log.float().exp()

    def forward(self, hidden_states: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
        """``hidden_states [B, T, D]``, ``rate [B, T, H]`` (or ``[B, T, H, V]`` when ``G = V``) ->
        ``b [B, T, H, G]`` (float32; ``G = V`` by default)."""
        B, T, _ = hidden_states.shape
        H, G = self.num_heads, self.groups
        if rate.dim() == 4 and rate.shape[-1] != G:
            raise ValueError(f"a write rate per value channel {list(rate.shape)} cannot be shared by "
                             f"importance_groups={G}: grouped importance needs a per-head rate [B, T, H]")
        s = torch.sigmoid(self.W_b2(self.W_b1(hidden_states)).float()).view(B, T, H, G)
        per_head = nn.functional.softplus(self.b_scale.float())
        if self.gamma is not None:
            per_head = per_head * self.gamma.float()
        rate = rate.float()
        if rate.dim() == 3:
            rate = rate[..., None]
        return per_head[:, None] * rate * s


def project_importance_(model: nn.Module) -> None:
    """Apply :meth:`ImportancePath.project_` to every importance path in ``model`` (γ ≥ 0)."""
    for module in model.modules():
        if isinstance(module, ImportancePath):
            module.project_()
