"""What every mixer shares: its registry objective, the kwargs it was built with, its memory size.

A mixer is an ``nn.Module`` built as ``Mixer(hidden_size, **mixer_kwargs)`` with
``forward(hidden_states [B, T, D], cache=None, layer_idx=None) -> [B, T, D]``. Its memory update is
``metaplastic.registry[registry_name].objective`` run by the shared scan; the mixer only computes gates.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from metaplastic.objective import Objective
from metaplastic.registry import registry

from .importance import ImportancePath


RankSpec = Union[int, str, None]


def resolve_rank(rank: RankSpec, hidden_size: int) -> int:
    """The importance rank: ``rank`` itself, ``min(64, hidden_size)`` for None, ``ceil(hidden_size / 16)`` for
    ``"auto"`` (the paper's default)."""
    if rank is None:
        return min(64, hidden_size)
    if rank == "auto":
        return -(-hidden_size // 16)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"importance_rank must be a positive int, None or 'auto', got {rank!r}")
    return rank


def memory_floats(objective: Objective, H: int, K: int, V: int, groups: Optional[int] = None) -> int:
    """Floats in the recurrent memory of one sequence: ``S``; ``mu`` and ``I``; or ``G`` and ``H``. With
    ``groups`` importance groups (diagonal posterior, G < V) the precision is one K-vector per group
    (docs/theory.md#limit-8-grouped-importance): ``V·K + G·K`` per head."""
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

    def _add_importance(self, rank: RankSpec, gated: bool = True, bias: bool = True, init: str = "identity",
                        defaults: Optional[Dict[str, Any]] = None, groups: Optional[int] = None) -> None:
        """Add the importance path when the objective uses an importance rate.

        ``rank``: an int, None (``min(64, hidden_size)``) or ``"auto"`` (``ceil(hidden_size / 16)``, the paper's
        ``beta_step_rank="auto"``). ``gated``: a per-head gate γ; ``bias``: a bias on W_b2; ``init``: the law of
        :mod:`metaplastic.models.importance`. ``defaults``: the mixer's defaults of these three, so that only
        departures from them are recorded in ``mixer_kwargs``. ``groups``: importance groups per head (None: one
        rate per value channel; recorded in ``mixer_kwargs`` only when set, so default configs are unchanged).
        """
        if not self.objective.uses_importance_rate:
            return
        rank = resolve_rank(rank, self.hidden_size)
        self.mixer_kwargs["importance_rank"] = rank
        chosen = dict(importance_gate=gated, importance_bias=bias, importance_init=init)
        defaults = {**dict(importance_gate=True, importance_bias=True, importance_init="identity"), **(defaults or {})}
        self.mixer_kwargs.update({key: val for key, val in chosen.items() if val != defaults[key]})
        self.importance = ImportancePath(self.hidden_size, self.num_heads, self.head_v_dim, rank, gated=gated,
                                         bias=bias, init=init, groups=groups)
        if groups is not None:
            self.mixer_kwargs["importance_groups"] = groups

    def importance_kwargs(self, hidden_states: torch.Tensor, rate: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``b`` and ``prior_precision`` for the scan (empty for a point posterior)."""
        if self.importance is None:
            return {}
        return {"b": self.importance(hidden_states, rate), "prior_precision": self.importance.prior_precision()}
