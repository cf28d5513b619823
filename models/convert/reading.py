"""Reading a source checkpoint: the :class:`SourceFormat` entry every format declares, the
:class:`SourceCheckpoint` it opens, and the checks on keys, layer count and values.

A :class:`SourceCheckpoint` describes the source as a point-posterior ``MetaplasticForCausalLM`` config plus a
key map (our state-dict key -> the checkpoint's key); nothing is read from the tensors when it is opened.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..checkpoint_io import CheckpointError, TensorStore, compare_keys, stored_layers
from ..configuration import MetaplasticConfig
from .conversion import SEED, convert_layer, lm_shapes, twin_config

SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class ConversionError(ValueError):
    """Bad input to the converter (one-line message)."""


@dataclass(frozen=True)
class SourceFormat:
    """One checkpoint format the converter reads (one row of :data:`~.formats.FORMATS`).

    ``name``: the format as ``conversion.json`` records it; ``architectures``: the architectures it holds, as
    the converter names them; ``recognise(config.json) -> bool``; ``open(directory, config.json)`` reads the
    config, maps the keys and checks them (:class:`SourceCheckpoint`, no tensor data read)."""

    name: str
    architectures: Tuple[str, ...]
    recognise: Callable[[dict], bool]
    open: Callable[[Path, dict], "SourceCheckpoint"]


@dataclass
class SourceCheckpoint:
    """A checkpoint to convert: its format, its architecture object, the equivalent point-posterior config,
    its tensors and the key map from our names to its names."""

    path: Path
    format: str
    arch: object  # Mamba2Arch, GatedDeltaNetArch, GLAArch, or the authors' model_type
    config: MetaplasticConfig
    store: TensorStore
    source_key: Callable[[str], Optional[str]]
    architecture: str  # the architecture's name (Mamba2, Gated DeltaNet, GLA, Palimpsa, MetaMamba2)
    extra_keys: List[str] = field(default_factory=list)  # present but redundant (a tied lm_head)
    fla_model: Optional[str] = None  # fla's class of the source model (run by --verify on a GPU)
    # already-metaplastic formats: (init, rank) -> the converted config, and their per-layer conversion
    target: Optional[Callable[[str, Optional[int]], MetaplasticConfig]] = None
    layer_fn: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
    _keys: Optional[List[str]] = field(default=None, repr=False)  # our state-dict keys, built once

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor of our key ``key``, of a floating-point type (else :class:`CheckpointError` naming it;
        its values are checked as it is written: :func:`check_values`)."""
        return self.stored(self.source_key(key))

    def stored(self, name: str) -> torch.Tensor:
        """The checkpoint's tensor ``name`` (its own key), of a floating-point type (else :class:`CheckpointError`)."""
        tensor = self.store.get(name)
        if tensor.dtype not in SOURCE_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, not a floating-point weight type")
        return tensor

    def target_config(self, dtype: torch.dtype, init: str, rank: Optional[int],
                      groups: Optional[int] = None) -> MetaplasticConfig:
        """The converted model's config: the twin of ``config`` (point-posterior sources) or the format's own.
        ``groups``: importance groups of the twins (point-posterior sources only)."""
        if self.target is not None and groups is not None:
            raise ConversionError("--importance-groups applies to point-posterior sources (Mamba2, Gated DeltaNet, "
                                  "GLA); "
                                  f"a {self.architecture} checkpoint keeps its own importance path")
        config = twin_config(self.config, dtype, rank, groups) if self.target is None else self.target(init, rank)
        config.dtype = dtype
        return config

    def converted_layer(self, config: MetaplasticConfig, layer: int, init: str,
                        rank: Optional[int], groups: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Layer ``layer``'s mixer state dict in the converted model ``config``."""
        if self.layer_fn is None:
            return convert_layer(self.config, self.mixer_tensors(layer), layer, init, rank, groups)
        generator = torch.Generator().manual_seed(SEED + layer)
        return self.layer_fn(self.stored, self.source_key, config, layer, init, generator)

    def mixer_tensors(self, layer: int) -> Dict[str, torch.Tensor]:
        """``{name within the mixer: tensor}`` of layer ``layer``."""
        prefix = f"backbone.layers.{layer}.mixer."
        if self._keys is None:
            self._keys = list(lm_shapes(self.config))
        return {key[len(prefix):]: self.tensor(key) for key in self._keys if key.startswith(prefix)}


def check_keys(ckpt: SourceCheckpoint) -> None:
    """Every key the config implies is present with its shape, nothing else is (a tied head saved twice is
    recorded in ``extra_keys``)."""
    want = {ckpt.source_key(key): shape for key, shape in lm_shapes(ckpt.config).items()
            if ckpt.source_key(key) is not None}  # None: a key of ours the format does not have
    have = ckpt.store.shapes
    head = ckpt.source_key("lm_head.weight")
    if ckpt.config.tie_word_embeddings and head in have:
        ckpt.extra_keys.append("lm_head.weight")
        want[head] = want[ckpt.source_key("backbone.embeddings.weight")]
    compare_keys(want, have)


def check_layer_count(store: TensorStore, layers: int) -> None:
    """The config's layer count must be that of the tensors on disk (checked before building any layer)."""
    held = stored_layers(store.shapes)
    if held != layers:
        raise CheckpointError(f"config.json: num_hidden_layers={layers}, but the checkpoint's tensors hold {held} "
                              "layers")


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """``max |x|`` in one pass without a temporary copy (NaN if any element is NaN)."""
    low, high = torch.aminmax(tensor.detach())
    return max(abs(float(low)), abs(float(high)))


def check_values(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    """A weight must be finite and fit ``dtype`` (``--dtype float16`` would turn larger values into inf);
    :class:`CheckpointError` naming it otherwise. Run on each tensor just after it is written (its pages are
    then mapped: one pass over the weights, no extra reads from disk)."""
    if tensor.numel() == 0:
        return
    amax = _largest_magnitude(tensor)
    if not math.isfinite(amax):
        raise CheckpointError(f"tensor {name!r} has non-finite values (NaN or inf)")
    if amax > torch.finfo(dtype).max:
        raise CheckpointError(f"tensor {name!r} does not fit --dtype {str(dtype).split('.')[-1]}: max |x| = "
                              f"{amax:.4g} > {torch.finfo(dtype).max:.4g} (it would become inf)")
