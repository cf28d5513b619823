"""``MetaplasticConfig``: a stack of mixers chosen per layer (model_type ``metaplastic``)."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Union

from transformers import PretrainedConfig

MAX_SIZE = 2 ** 24  # the largest vocabulary, width, layer count or head size a config may give
MAX_PARAMETERS = 10 ** 12  # configs whose (lower-bound) parameter estimate exceeds this are refused
SIZE_KWARGS = ("num_heads", "head_dim", "state_size", "expand", "n_groups", "conv_kernel", "conv_size",
               "importance_rank", "num_v_heads")  # mixer kwargs that are sizes (positive integers)


class MetaplasticConfig(PretrainedConfig):
    """Configuration of :class:`MetaplasticForCausalLM`.

    Args:
        mixer: a mixer name of ``metaplastic.MIXERS`` for every layer, or a list with one per layer.
        mixer_kwargs: keyword arguments of the mixer (a dict for every layer, or a list of dicts).
        intermediate_size: width of a SwiGLU MLP after each mixer (0: no MLP, as in Mamba2).
        residual_in_fp32: keep the residual stream in float32 (Mamba2's default).
        importance_groups: importance groups per head for every mixer with an importance path (a diagonal
            posterior): None (default) is one importance rate per value channel, the paper's layer; an int G
            (dividing the head's value width) shares each rate within G contiguous groups of value rows
            (docs/theory.md#limit-8-grouped-importance; G = 1: one rate per head). A layer's own ``mixer_kwargs["importance_groups"]``
            takes precedence.
    """

    model_type = "metaplastic"

    def __init__(self, vocab_size: int = 50288, hidden_size: int = 768, num_hidden_layers: int = 24,
                 mixer: Union[str, List[str]] = "meta_mamba2",
                 mixer_kwargs: Union[Dict[str, Any], List[Dict[str, Any]], None] = None,
                 intermediate_size: int = 0, layer_norm_epsilon: float = 1e-5, residual_in_fp32: bool = True,
                 tie_word_embeddings: bool = True, initializer_range: float = 0.02, use_cache: bool = True,
                 pad_token_id: Optional[int] = None, bos_token_id: Optional[int] = None,
                 eos_token_id: Optional[int] = None, importance_groups: Optional[int] = None,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.mixer = mixer
        self.mixer_kwargs = {} if mixer_kwargs is None else mixer_kwargs
        self.intermediate_size = intermediate_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.residual_in_fp32 = residual_in_fp32
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        if importance_groups is not None and (isinstance(importance_groups, bool) or not isinstance(importance_groups, int)
                                              or importance_groups < 1):
            raise ValueError(f"importance_groups must be None or a positive integer, got {importance_groups!r}")
        self.importance_groups = importance_groups
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.check()

    def check(self) -> None:
        """Types and ranges of every field the model uses; ``ValueError`` naming the field. Absurd sizes are
        refused here, before anything is allocated (see ``MAX_SIZE``, ``MAX_PARAMETERS``)."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            _size(name, getattr(self, name), 1)
        _size("intermediate_size", self.intermediate_size, 0)
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"config: layer_norm_epsilon={eps!r} must be a finite positive number")
        layers = self.num_hidden_layers
        for name, value, kind in (("mixer", self.mixer, str), ("mixer_kwargs", self.mixer_kwargs, dict)):
            entries = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) != layers:
                raise ValueError(f"{name} has {len(value)} entries but num_hidden_layers={layers}")
            for entry in entries:
                if not isinstance(entry, kind):
                    raise ValueError(f"config: {name} must be a {kind.__name__} or a list of them, got {entry!r:.60}")
        for kwargs in (self.mixer_kwargs if isinstance(self.mixer_kwargs, list) else [self.mixer_kwargs]):
            for key in SIZE_KWARGS:
                if kwargs.get(key) is not None and not (key == "importance_rank" and kwargs[key] == "auto"):
                    _size(f"mixer_kwargs.{key}", kwargs[key], 1)  # importance_rank may be "auto": ceil(hidden/16)
        h = self.hidden_size
        estimate = self.vocab_size * h + layers * (h * h + 3 * h * self.intermediate_size)
        if estimate > MAX_PARAMETERS:
            raise ValueError(f"config: vocab_size={self.vocab_size}, hidden_size={h}, num_hidden_layers={layers} "
                             f"imply over {estimate:.3g} parameters (more than {MAX_PARAMETERS:.0e})")

    @classmethod
    def authors_preset(cls, model_type: str, **fields: Any) -> "MetaplasticConfig":
        """The paper authors' ``model_type`` (``"palimpsa"`` or ``"meta_mamba2"``) with every mixer option set
        to their choice; ``fields`` are their config's fields, with their names and defaults
        (e.g. ``authors_preset("palimpsa", hidden_size=768, num_heads=16, head_dim=48, expand_v=1,
        num_hidden_layers=19)``). See :mod:`metaplastic.models.convert.authors_config`."""
        from .convert.authors_config import authors_config
        return cls(**authors_config(model_type, **fields))

    def mixer_for(self, layer_idx: int) -> str:
        """The mixer name of layer ``layer_idx``."""
        return self.mixer[layer_idx] if isinstance(self.mixer, list) else self.mixer

    def mixer_kwargs_for(self, layer_idx: int) -> Dict[str, Any]:
        """The mixer kwargs of layer ``layer_idx``."""
        kw = dict(self.mixer_kwargs[layer_idx] if isinstance(self.mixer_kwargs, list) else self.mixer_kwargs)
        groups = getattr(self, "importance_groups", None)
        if groups is not None and "importance_groups" not in kw:
            from metaplastic.registry import registry
            spec = registry.get(self.mixer_for(layer_idx))
            if spec is not None and spec.objective.uses_importance_rate:
                kw["importance_groups"] = groups
        return kw


def _size(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_SIZE:
        raise ValueError(f"config: {name}={value!r:.60} must be an integer in [{minimum}, {MAX_SIZE}]")
