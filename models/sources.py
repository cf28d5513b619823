"""Any supported checkpoint, seen as a point-posterior ``MetaplasticForCausalLM`` plus a key map.

One conversion mechanism for every architecture: a source checkpoint is described by

- ``config``: the :class:`MetaplasticConfig` whose model computes the same function as the source, with
  point-posterior mixers (``mamba2``, ``gated_deltanet``);
- ``source_key``: our state-dict key -> the checkpoint's key (the per-architecture key map);

and the converter then copies every tensor and passes each layer's mixer through :func:`to_metaplastic`.

Formats (detected from ``config.json``):

| format | architecture | detected by |
|---|---|---|
| ``hf`` | Mamba2 (transformers) | ``model_type: "mamba2"`` |
| ``mamba_ssm`` | Mamba2 (original) | ``d_model`` and no ``model_type`` |
| ``fla`` | Gated DeltaNet (fla) | ``model_type: "gated_deltanet"`` |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from . import fla_checkpoints
from .checkpoints import CheckpointError, Mamba2Arch, TensorStore, _open_store, compare_keys, open_mamba2, read_config
from .configuration import MetaplasticConfig

ARCHITECTURES = {"hf": "Mamba2", "mamba_ssm": "Mamba2", "fla": "Gated DeltaNet"}


@dataclass
class SourceCheckpoint:
    """A checkpoint to convert: its format, its architecture object, the equivalent point-posterior config,
    its tensors and the key map from our names to its names."""

    path: Path
    format: str
    arch: object  # Mamba2Arch or GatedDeltaNetArch
    config: MetaplasticConfig
    store: TensorStore
    source_key: Callable[[str], str]
    extra_keys: List[str] = field(default_factory=list)  # present but redundant (a tied lm_head)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.format]

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor of our key ``key``."""
        return self.store.get(self.source_key(key))

    def mixer_tensors(self, layer: int) -> Dict[str, torch.Tensor]:
        """``{name within the mixer: tensor}`` of layer ``layer``."""
        prefix = f"backbone.layers.{layer}.mixer."
        return {key[len(prefix):]: self.tensor(key) for key in lm_shapes(self.config, layers=[layer])
                if key.startswith(prefix)}


def lm_shapes(config: MetaplasticConfig, layers=None) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of ``MetaplasticForCausalLM(config)``'s state dict, in its order (no ``lm_head`` when
    tied), built on the meta device. ``layers``: only those blocks (and nothing outside the blocks)."""
    from .modeling import MetaplasticBlock
    shapes: Dict[str, Tuple[int, ...]] = {}
    if layers is None:
        shapes["backbone.embeddings.weight"] = (config.vocab_size, config.hidden_size)
    with torch.device("meta"):
        for i in (range(config.num_hidden_layers) if layers is None else layers):
            for name, t in MetaplasticBlock(config, i).state_dict().items():
                shapes[f"backbone.layers.{i}.{name}"] = tuple(t.shape)
    if layers is None:
        shapes["backbone.norm_f.weight"] = (config.hidden_size,)
        if not config.tie_word_embeddings:
            shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return shapes


def check_keys(ckpt: SourceCheckpoint) -> None:
    """Every key the config implies is present with its shape, nothing else is (a tied head saved twice is
    recorded in ``extra_keys``)."""
    want = {ckpt.source_key(key): shape for key, shape in lm_shapes(ckpt.config).items()}
    have = ckpt.store.shapes
    head = ckpt.source_key("lm_head.weight")
    if ckpt.config.tie_word_embeddings and head in have:
        ckpt.extra_keys.append("lm_head.weight")
        want[head] = want[ckpt.source_key("backbone.embeddings.weight")]
    compare_keys(want, have)


def point_config_mamba2(arch: Mamba2Arch) -> MetaplasticConfig:
    """The ``MetaplasticConfig`` computing the same function as the Mamba2 model ``arch`` (``mamba2`` mixers)."""
    return MetaplasticConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                             num_hidden_layers=arch.num_hidden_layers, mixer="mamba2", mixer_kwargs=arch.mixer_kwargs(),
                             intermediate_size=0, layer_norm_epsilon=arch.layer_norm_epsilon,
                             residual_in_fp32=arch.residual_in_fp32, tie_word_embeddings=arch.tie_word_embeddings,
                             pad_token_id=arch.pad_token_id, bos_token_id=arch.bos_token_id,
                             eos_token_id=arch.eos_token_id)


def _open_mamba2(directory: Path) -> SourceCheckpoint:
    ckpt = open_mamba2(directory)  # validates config, keys and shapes; renames mamba_ssm's embedding
    return SourceCheckpoint(directory, ckpt.format, ckpt.arch, point_config_mamba2(ckpt.arch), ckpt.store,
                            lambda key: key, list(ckpt.extra_keys))


def _open_fla_gdn(directory: Path, cfg: dict) -> SourceCheckpoint:
    try:
        arch = fla_checkpoints.arch_from_fla(cfg)
        ckpt = SourceCheckpoint(directory, "fla", arch, fla_checkpoints.point_config(arch), _open_store(directory),
                                fla_checkpoints.source_key)
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"Gated DeltaNet checkpoint: {exc}") from None
    return ckpt


def open_checkpoint(path) -> SourceCheckpoint:
    """Open a checkpoint directory of any supported format; validate config, keys and shapes (no data read)."""
    directory, cfg = read_config(path)
    if cfg.get("model_type") == "gated_deltanet":
        return _open_fla_gdn(directory, cfg)
    return _open_mamba2(directory)  # Mamba2 of either format; refuses every other model_type by name


def iter_source_tensors(ckpt: SourceCheckpoint) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(our key, tensor)`` for every tensor of the point-posterior model, in state-dict order."""
    for key in lm_shapes(ckpt.config):
        yield key, ckpt.tensor(key)
