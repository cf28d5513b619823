"""The conversion proper: a point-posterior config -> its metaplastic twin's, one layer's tensors -> its twin's
(through :func:`~metaplastic.models.twins.to_metaplastic`), and the converted model's tensors in writing order,
one layer in memory at a time.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..checkpoint_io import CheckpointError
from ..configuration import MetaplasticConfig
from ..twins import to_metaplastic, twin_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 0  # the importance path's initialisation is deterministic: generator seeded SEED + layer index
_MIXER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$")


@dataclass
class ConversionResult:
    dst: Path
    source_format: str
    num_tensors: int
    bytes_written: int
    architecture: str = "Mamba2"
    max_abs_diff: Optional[float] = None  # source vs in-memory converted model (verify)
    max_abs_diff_reloaded: Optional[float] = None  # source vs the model reloaded from dst (verify)
    reference: Optional[str] = None  # what the logits were compared with (verify)
    max_rel_diff: Optional[float] = None  # the larger of max_abs_diff, max_abs_diff_rounded over max |source logit|
    dtype: str = "float32"  # dtype of DST's weights
    max_abs_diff_rounded: Optional[float] = None  # source with its weights rounded to `dtype` vs reloaded (verify)
    rounding_effect: Optional[float] = None  # source with its weights rounded to `dtype` vs source (verify)


def lm_shapes(config: MetaplasticConfig, layers=None) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of ``MetaplasticForCausalLM(config)``'s state dict, in its order (no ``lm_head`` when
    tied), built on the meta device. ``layers``: only those blocks (and nothing outside the blocks)."""
    from ..modeling import MetaplasticBlock
    shapes: Dict[str, Tuple[int, ...]] = {}
    if layers is None:
        shapes["backbone.embeddings.weight"] = (config.vocab_size, config.hidden_size)
    blocks: Dict[str, Dict[str, Tuple[int, ...]]] = {}  # a block's shapes depend on its mixer and kwargs only
    with torch.device("meta"):
        for i in (range(config.num_hidden_layers) if layers is None else layers):
            kind = json.dumps([config.mixer_for(i), config.mixer_kwargs_for(i)], sort_keys=True, default=str)
            if kind not in blocks:
                blocks[kind] = {name: tuple(t.shape) for name, t in MetaplasticBlock(config, i).state_dict().items()}
            for name, shape in blocks[kind].items():
                shapes[f"backbone.layers.{i}.{name}"] = shape
    if layers is None:
        shapes["backbone.norm_f.weight"] = (config.hidden_size,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def twin_config(config: MetaplasticConfig, dtype: torch.dtype = torch.float32,
                importance_rank: Optional[int] = None, importance_groups: Optional[int] = None) -> MetaplasticConfig:
    """``config`` with every point-posterior mixer replaced by its metaplastic twin (importance rank added;
    ``importance_groups`` recorded in the config when given, else one importance rate per value channel)."""
    rank = importance_rank if importance_rank is not None else min(64, config.hidden_size)
    names = [twin_name(config.mixer_for(i)) for i in range(config.num_hidden_layers)]
    kwargs = [{**config.mixer_kwargs_for(i), "importance_rank": rank} for i in range(config.num_hidden_layers)]
    out = copy.deepcopy(config)
    out.mixer = names[0] if isinstance(config.mixer, str) else names
    out.mixer_kwargs = kwargs[0] if isinstance(config.mixer_kwargs, dict) else kwargs
    out.dtype = dtype
    if importance_groups is not None:
        out.importance_groups = importance_groups
    return out


def convert_layer(config: MetaplasticConfig, tensors: Dict[str, torch.Tensor], layer: int, init: str,
                  importance_rank: Optional[int], importance_groups: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One layer's point-posterior mixer tensors (``config``'s mixer) -> its twin's state dict (via
    :func:`to_metaplastic`; the importance path seeded ``SEED + layer``)."""
    from ..mixers import MIXERS
    with torch.device("meta"):
        mixer = MIXERS[config.mixer_for(layer)](config.hidden_size, **config.mixer_kwargs_for(layer))
    mixer.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True, assign=True)
    generator = torch.Generator().manual_seed(SEED + layer)
    twin = to_metaplastic(mixer, init=init, rank=importance_rank, generator=generator, copy=False,
                          groups=importance_groups)
    return twin.state_dict()


def dst_layout(config: MetaplasticConfig, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """``(key, shape, dtype)`` of every tensor of the converted model, in writing order."""
    return [(key, shape, dtype) for key, shape in lm_shapes(config).items()]


def dst_tensors(ckpt, config: MetaplasticConfig, layout, init: str, rank: Optional[int],
                groups: Optional[int] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """The converted model's (``config``'s) tensors in writing order, one layer in memory at a time; ``ckpt``: the
    :class:`~.reading.SourceCheckpoint`."""
    layer, twin = None, {}
    for key, _, _ in layout:
        match = _MIXER_KEY.match(key)
        if match is None:
            yield key, ckpt.tensor(key)
            continue
        if int(match[1]) != layer:
            layer = int(match[1])
            twin = ckpt.converted_layer(config, layer, init, rank, groups)
        yield key, twin[match[2]]


def check_tied_head(ckpt) -> None:
    """A tied head saved twice (``ckpt.extra_keys``) must equal the embedding (:class:`CheckpointError` otherwise)."""
    if "lm_head.weight" in ckpt.extra_keys:
        if not torch.equal(ckpt.tensor("lm_head.weight"), ckpt.tensor("backbone.embeddings.weight")):
            raise CheckpointError("the config ties the embeddings but lm_head.weight differs from the embedding")
