"""What every mixer shares: its registry objective, the kwargs it was built with, its memory size.

A mixer is an ``nn.Module`` built as ``Mixer(hidden_size, **mixer_kwargs)`` with
``forward(hidden_states [B, T, D], cache=None, layer_idx=None) -> [B, T, D]``. Its memory update is
``metaplastic.registry[registry_name].objective`` run by the shared scan; the mixer only computes gates.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from metaplastic.objective import Objective
from metaplastic.registry import registry

from .importance import ImportancePath


def memory_floats(objective: Objective, H: int, K: int, V: int, groups: Optional[int] = None) -> int:
    """Floats in the recurrent memory of one sequence: ``S``; ``mu`` and ``I``; or ``G`` and ``H``. With
    ``groups`` importance groups (diagonal posterior, G < V) the precision is one K-vector per group
    (THEORY.md limit 8): ``V·K + G·K`` per head."""
    if objective.posterior == "point":
        return H * V * K
    if objective.posterior == "diagonal":
        return H * (V * K + (V if groups is None else min(groups, V)) * K)
    return H * (V * K + K * K)


class Mixer(nn.Module):
    """Base class: sets ``objective`` from the registry and records ``hidden_size`` and ``mixer_kwargs``."""

    registry_name: str = ""

    def __init__(self, hidden_size: int, mixer_kwargs: Dict[str, Any]) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.mixer_kwargs = dict(mixer_kwargs)
        self.objective: Objective = registry[self.registry_name].objective
        self.importance: Optional[ImportancePath] = None

    # the memory's shape, per sequence: subclasses set these
    num_heads: int
    head_k_dim: int
    head_v_dim: int

    def state_size(self) -> int:
        """Floats in the recurrent memory per sequence (for matched-state comparisons)."""
        groups = None if self.importance is None else self.importance.groups
        return memory_floats(self.objective, self.num_heads, self.head_k_dim, self.head_v_dim, groups)

    def _add_importance(self, rank: Optional[int], gated: bool = True, groups: Optional[int] = None) -> None:
        """The importance path, for a diagonal posterior. ``groups``: importance groups per head (None: one
        rate per value channel; recorded in ``mixer_kwargs`` only when set, so default configs are unchanged)."""
        if self.objective.uses_importance_rate:
            rank = rank if rank is not None else min(64, self.hidden_size)
            self.mixer_kwargs["importance_rank"] = rank
            self.importance = ImportancePath(self.hidden_size, self.num_heads, self.head_v_dim, rank, gated=gated,
                                             groups=groups)
            if groups is not None:
                self.mixer_kwargs["importance_groups"] = groups

    def importance_kwargs(self, hidden_states: torch.Tensor, rate: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``b`` and ``prior_precision`` for the scan (empty for a point posterior)."""
        if self.importance is None:
            return {}
        return {"b": self.importance(hidden_states, rate), "prior_precision": self.importance.prior_precision()}
