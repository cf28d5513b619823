"""The importance path that makes a point-posterior mixer metaplastic (docs/theory.md#parameterisations, docs/theory.md#converting-a-checkpoint).

    b = γ · rate · σ(W_b2 W_b1 h) · softplus(b_scale)        [B, T, H, G]

one rate per value channel (``G = V``, the paper's layer, the default) or, with ``importance_groups = G``
(G dividing the head's value width V), one rate shared by each of G contiguous groups of ``V/G`` value rows
(docs/theory.md#limit-8-grouped-importance; ``G = 1``: head-shared, limit 7). ``W_b2`` then produces ``H·G`` rates.

``rate`` is the mixer's own write-rate gate (Δ for Mamba2, β for Gated DeltaNet and LongHorn), ``γ`` a
per-head gate (γ = 0: b ≡ 0, and the mixer is output-identical to its point-posterior source, limit 2),
and ``Ip = exp(Ip_log)`` the prior precision of p_0, a frozen buffer (0, i.e. Ip = 1). Without the gate
(``gated=False``, the paper's own layers) γ is absent and b is the product of the other factors.

Initialisation laws (:data:`INITS`):

- ``identity``: W_b1, W_b2 ~ N(0, 0.02²), W_b2's bias 0, b_scale = 1 (raw), γ = 0 (output-preserving);
- ``paper``: the paper's surgery (docs/authors.md#their-surgery-script): W_b1 ~ N(0, 0.02²), W_b2 ~ U(±rank^{-1/2})
  (PyTorch's default ``Linear`` law), bias 0, b_scale = 1 (raw, softplus 1.313), γ = 1;
- ``paper-finetuning``: as ``paper`` with b_scale (raw) ~ U(0.1, 1) (their ``finetuning=True``).

Ip_log is 0 under every law.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

INITS = ("identity", "paper", "paper-finetuning")


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
    """``W_b1: hidden → rank``, ``W_b2: rank → H·G`` (bias optional), ``b_scale [H]``, ``gamma [H]`` (optional),
    ``Ip_log [H]`` (a buffer). ``init`` is the law applied at construction and by transformers' weight init;
    ``groups``: importance groups per head (None: ``G = head_v_dim``, one rate per value channel)."""

    def __init__(self, hidden_size: int, num_heads: int, head_v_dim: int, rank: int, gated: bool = True,
                 bias: bool = True, init: str = "identity", groups: Optional[int] = None) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"importance init must be one of {INITS}, got {init!r}")
        self.num_heads, self.head_v_dim, self.init = num_heads, head_v_dim, init
        self.groups = check_importance_groups(groups, head_v_dim)
        self.W_b1 = nn.Linear(hidden_size, rank, bias=False)
        self.W_b2 = nn.Linear(rank, num_heads * self.groups, bias=bias)
        self.b_scale = nn.Parameter(torch.ones(num_heads))
        self.gamma = nn.Parameter(torch.zeros(num_heads)) if gated else None
        self.register_buffer("Ip_log", torch.zeros(num_heads))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity", generator: Optional[torch.Generator] = None) -> None:
        """Draw every parameter of the path from the law ``init`` (see the module docstring)."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.W_b1.weight.is_meta:  # built on the meta device: values come later (load or to_empty + reset)
            return
        for name, value in self.init_values(init, generator).items():
            getattr_path(self, name).copy_(value)

    def init_values(self, init: str, generator: Optional[torch.Generator] = None) -> dict:
        """``{parameter or buffer name: value}`` drawn from the law ``init`` (float32, on the CPU)."""
        rank = self.W_b1.out_features
        w1 = torch.randn(self.W_b1.weight.shape, generator=generator) * 0.02
        if init == "identity":
            w2 = torch.randn(self.W_b2.weight.shape, generator=generator) * 0.02
        else:
            bound = 1.0 / math.sqrt(rank)
            w2 = (torch.rand(self.W_b2.weight.shape, generator=generator) * 2 - 1) * bound
        if init == "paper-finetuning":
            b_scale = 0.1 + 0.9 * torch.rand(self.num_heads, generator=generator)
        else:
            b_scale = torch.ones(self.num_heads)
        values = {"W_b1.weight": w1, "W_b2.weight": w2, "b_scale": b_scale, "Ip_log": torch.zeros(self.num_heads)}
        if self.W_b2.bias is not None:
            values["W_b2.bias"] = torch.zeros(self.W_b2.out_features)
        if self.gamma is not None:
            values["gamma"] = torch.full((self.num_heads,), 0.0 if init == "identity" else 1.0)
        return values

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


def getattr_path(module: nn.Module, name: str) -> torch.Tensor:
    """``module.a.b`` for ``name = "a.b"``."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def project_importance_(model: nn.Module) -> None:
    """Apply :meth:`ImportancePath.project_` to every importance path in ``model`` (γ ≥ 0)."""
    for module in model.modules():
        if isinstance(module, ImportancePath):
            module.project_()
