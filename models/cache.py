"""The recurrent-state cache used by ``MetaplasticForCausalLM.generate``.

Each layer keeps a dict: its convolution state(s) (the last ``W-1`` inputs, ``[B, C, W-1]``) and its scan
state (the value-first dictionary of ``metaplastic.scan``: ``{"S"}``, ``{"mu", "I"}`` or ``{"G", "H"}``).
The memory is constant in the sequence length, so decoding one token costs the same at any position.
"""
from __future__ import annotations

from typing import Any, Dict

import torch


def _map(x: Any, fn) -> Any:
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {key: _map(val, fn) for key, val in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_map(val, fn) for val in x)
    return x


class MetaplasticCache:
    """Per-layer recurrent state plus the number of tokens seen."""

    is_compileable = False

    def __init__(self) -> None:
        self.layers: Dict[int, Dict[str, Any]] = {}
        self.seen_tokens = 0

    def layer(self, layer_idx: int) -> Dict[str, Any]:
        """The state dict of one layer (empty before its first token)."""
        return self.layers.setdefault(layer_idx, {})

    def update(self, layer_idx: int, **entries: Any) -> None:
        """Replace entries of one layer's state (e.g. ``conv=..., state=...``)."""
        self.layers.setdefault(layer_idx, {}).update(entries)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> "MetaplasticCache":
        """Select the batch rows ``beam_idx`` of every state (beam search)."""
        self.layers = {i: _map(entry, lambda t: t.index_select(0, beam_idx.to(t.device)))
                       for i, entry in self.layers.items()}
        return self

    def __repr__(self) -> str:
        return f"MetaplasticCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"
