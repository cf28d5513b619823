"""The table of source formats the converter reads, and :func:`open_checkpoint`, which picks the one row that
recognises a checkpoint's ``config.json``.

| format | architecture | recognised by | module |
|---|---|---|---|
| ``authors`` | Palimpsa, MetaMamba2 (paper) | ``model_type: "palimpsa"``, ``"meta_mamba2"`` | :mod:`.source_authors` |
| ``fla`` | Gated DeltaNet (fla) | ``model_type: "gated_deltanet"`` | :mod:`.source_gated_deltanet` |
| ``fla`` | GLA (fla) | ``model_type: "gla"`` | :mod:`.source_gla` |
| ``hf`` | Mamba2 (transformers) | ``model_type: "mamba2"`` | :mod:`.source_mamba2` |
| ``mamba_ssm`` | Mamba2 (original) | ``d_model`` and no ``model_type`` | :mod:`.source_mamba2` |

A new format is one :class:`~.reading.SourceFormat` row here, declared by its own module.
"""
from __future__ import annotations

from typing import Tuple

from ..checkpoint_io import CheckpointError, read_config
from .reading import SourceCheckpoint, SourceFormat
from .source_authors import AUTHORS
from .source_gated_deltanet import GATED_DELTANET
from .source_gla import GLA
from .source_mamba2 import HF, MAMBA_SSM

FORMATS: Tuple[SourceFormat, ...] = (AUTHORS, GATED_DELTANET, GLA, HF, MAMBA_SSM)

_REFUSED = {  # model types refused by name
    "mamba": "a Mamba (v1) checkpoint",
    "mesa_net": "a MesaNet checkpoint (not supported: its full posterior has no point-posterior source)",
}


def refusal(cfg: dict) -> CheckpointError:
    """Why no format of :data:`FORMATS` reads ``config.json``."""
    model_type = cfg.get("model_type")
    if model_type in _REFUSED:
        return CheckpointError(f"model_type {model_type!r} is {_REFUSED[model_type]}, not Mamba2 or Gated DeltaNet")
    if "num_attention_heads" in cfg or "n_head" in cfg:
        return CheckpointError(f"model_type {model_type!r} is a Transformer checkpoint (attention layers): only "
                               "Mamba2 and Gated DeltaNet checkpoints convert")
    if model_type is None:
        return CheckpointError("config.json has neither 'model_type' (Hugging Face) nor 'd_model' (mamba_ssm)")
    return CheckpointError(f"unknown model_type {model_type!r}: only Mamba2 (Hugging Face, mamba_ssm) and "
                           "Gated DeltaNet (fla) checkpoints convert")


def open_checkpoint(path) -> SourceCheckpoint:
    """Open a checkpoint directory of any supported format; validate config, keys and shapes (no data read)."""
    directory, cfg = read_config(path)
    for fmt in FORMATS:
        if fmt.recognise(cfg):
            return fmt.open(directory, cfg)
    raise refusal(cfg)
