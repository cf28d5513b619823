"""``to_metaplastic``: the metaplastic twin of a point-posterior mixer (docs/theory.md#limit-2-metaplastic-twins, docs/theory.md#converting-a-checkpoint).

The twin is the mixer class whose registry entry has ``base == mixer.registry_name`` (``meta_mamba2`` for
``mamba2``, ...). Its objective is ``metaplastic(mixer.objective)``; every original weight is copied, and
the importance path is added: with ``init="identity"`` its gate γ is 0, so the twin's outputs equal the
mixer's; with ``init="paper"`` γ = 1 and the path is freshly initialised (not output-preserving).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from metaplastic.objective import metaplastic
from metaplastic.registry import registry


def twin_name(name: str) -> str:
    """The registry name of the metaplastic twin of point-posterior model ``name`` (``meta_<name>`` first,
    else the first entry whose ``base`` is ``name``)."""
    candidates = [spec.name for spec in registry.values() if spec.base == name]
    if f"meta_{name}" in candidates:
        return f"meta_{name}"
    if candidates:
        return candidates[0]
    raise ValueError(f"model {name!r} has no metaplastic twin in the registry")


def to_metaplastic(mixer: nn.Module, init: str = "identity", rank: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, copy: bool = True,
                   groups: Optional[int] = None) -> nn.Module:
    """The metaplastic twin of ``mixer`` (all its weights kept, importance path + γ added).

    ``rank``: width of the importance path (default: the mixer's ``importance_rank`` or ``min(64, hidden)``);
    ``groups``: importance groups per head (default: the mixer's ``importance_groups``, else one rate per value
    channel; an int must divide the head's value width);
    ``generator`` seeds its initialisation; ``copy=False`` shares the original tensors instead of cloning them.
    """
    from .mixers import MIXERS
    name = getattr(mixer, "registry_name", None)
    if name is None or name not in registry:
        raise ValueError(f"{type(mixer).__name__} is not a metaplastic mixer (no registry_name)")
    if registry[name].objective.posterior != "point":
        raise ValueError(f"{name!r} has a {registry[name].objective.posterior!r} posterior; to_metaplastic "
                         "converts point-posterior mixers only")
    meta = twin_name(name)
    if meta not in MIXERS:
        raise ValueError(f"the twin {meta!r} of {name!r} has no mixer class in metaplastic.MIXERS")
    param = next(mixer.parameters())
    kwargs = dict(mixer.mixer_kwargs)
    if rank is not None:
        kwargs["importance_rank"] = rank
    if groups is not None:
        kwargs["importance_groups"] = groups
    with torch.device("meta"):  # no initialisation work: every tensor is assigned below
        twin = MIXERS[meta](mixer.hidden_size, **kwargs)
    if twin.objective != metaplastic(mixer.objective):
        raise ValueError(f"{meta!r} does not run metaplastic({name!r}): {twin.objective.describe()}")
    state = {key: (t.detach().clone() if copy else t) for key, t in mixer.state_dict().items()}
    missing, unexpected = twin.load_state_dict(state, strict=False, assign=True)
    bad = [key for key in missing if not key.startswith("importance.")]
    if bad or unexpected:
        raise ValueError(f"{meta!r} is not weight-compatible with {name!r}: missing {bad}, unexpected {unexpected}")
    twin.importance.to_empty(device=param.device)
    twin.importance.reset_parameters(init, generator)
    twin.importance.to(dtype=param.dtype)
    return twin.train(mixer.training)
