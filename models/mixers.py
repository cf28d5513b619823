"""The mixer catalogue: ``MIXERS[name]`` and ``build_mixer(name, hidden_size, **kwargs)``.

Names are registry names: each mixer runs ``metaplastic.registry[name].objective`` through the shared scan.
"""
from __future__ import annotations

from typing import Any, Dict, Type

from torch import nn

from .gated_deltanet import GatedDeltaNet, MetaGatedDeltaNet
from .gla import GLA, MetaGLA
from .longhorn import LongHorn, MetaLongHorn
from .mamba2 import Mamba2, MetaMamba2
from .mesanet import MesaNet
from .palimpsa import Palimpsa

MIXERS: Dict[str, Type[nn.Module]] = {cls.registry_name: cls for cls in (
    Mamba2, MetaMamba2, Palimpsa, GatedDeltaNet, MetaGatedDeltaNet, GLA, MetaGLA, MesaNet, LongHorn, MetaLongHorn)}


def build_mixer(name: str, hidden_size: int, **kwargs: Any) -> nn.Module:
    """A mixer by name (see ``MIXERS``); unknown names raise ``ValueError`` listing the known ones."""
    try:
        cls = MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; known: {', '.join(MIXERS)}") from None
    return cls(hidden_size, **kwargs)
