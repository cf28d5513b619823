"""Checkpoints written by the paper authors' code (``model_type`` ``palimpsa`` or ``meta_mamba2``;
docs/authors.md#their-format): the source format :data:`AUTHORS`, and their surgery.

Their Hugging Face export (``save_pretrained``) holds ``config.json`` (their config fields; MetaMamba2's may
contain ``Infinity`` in ``time_step_limit``), one ``model.safetensors`` (or ``pytorch_model.bin``) and the
tokenizer; a tied ``lm_head.weight`` is left out. The model becomes the :class:`MetaplasticConfig` of
:meth:`MetaplasticConfig.authors_preset` and the keys are renamed (:func:`source_key`):

| ours | theirs (Palimpsa) | theirs (MetaMamba2) |
|---|---|---|
| ``backbone.embeddings`` | ``model.embeddings`` | ``backbone.embeddings`` |
| ``backbone.layers.{i}.norm`` | ``model.layers.{i}.attn_norm`` | ``backbone.layers.{i}.norm`` |
| ``backbone.layers.{i}.mixer.*`` | ``model.layers.{i}.attn.*`` | ``backbone.layers.{i}.mixer.*`` |
| ``….mixer.a_proj`` | ``….attn.dt_proj`` | – |
| ``….mixer.importance.W_b1`` / ``W_b2`` | ``….b_rank_proj`` / ``….b_proj`` | same |
| ``….mixer.importance.b_scale`` / ``Ip_log`` | ``….b_scale`` / ``….Ip_log`` | same |
| ``backbone.layers.{i}.mlp_norm``, ``mlp.*`` | ``model.layers.{i}.mlp_norm``, ``mlp.*`` | – (no MLP) |
| ``backbone.norm_f`` | ``model.norm`` | ``backbone.norm_f`` |

``init="identity"`` keeps every weight: the converted logits equal theirs. A checkpoint trained with
``metaplasticity=false`` (b ≡ 0) converts to the metaplastic mixer with its gate closed (γ = 0, their saved
b-parameters kept), so fine-tuning can open it. ``init="paper"`` / ``"paper-finetuning"`` is their surgery
(docs/authors.md#their-surgery-script): every key whose name contains ``b_proj``, ``b_rank_proj``, ``b_scale``, ``Ip_log`` or
``bs_proj`` is dropped and drawn again by their laws (W_b1 ~ N(0, 0.02²), W_b2 ~ U(±rank^{-1/2}), b_scale = 1
raw or U(0.1, 1) raw, Ip_log = 0, bs_proj ~ N(0, 0.02²)), into the metaplastic model without a gate.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..base import resolve_rank
from ..checkpoint_io import CheckpointError, open_store
from ..configuration import MetaplasticConfig
from .authors_config import MODEL_TYPES
from .reading import SourceCheckpoint, SourceFormat, check_keys

ARCHITECTURES = {"palimpsa": "Palimpsa", "meta_mamba2": "MetaMamba2"}
DROPPED = ("b_proj", "b_rank_proj", "b_scale", "Ip_log", "bs_proj")  # their surgery drops keys containing these
INITIALIZER_RANGE = 0.02  # their N(0, 0.02²) for a fresh bs_proj
_IMPORTANCE = {"importance.W_b1.weight": "b_rank_proj.weight", "importance.W_b2.weight": "b_proj.weight",
               "importance.b_scale": "b_scale", "importance.Ip_log": "Ip_log"}
_ABSENT = ("importance.gamma",)  # ours only: the gate of a checkpoint trained without metaplasticity
_MIXER = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$")


def is_authors(cfg: dict) -> bool:
    """Whether ``config.json`` comes from the authors' code."""
    return cfg.get("model_type") in MODEL_TYPES


def source_config(cfg: dict) -> MetaplasticConfig:
    """The config whose model computes what the checkpoint computes (γ = 0 where it was trained with
    ``metaplasticity=false``); unsupported options raise :class:`CheckpointError` naming them."""
    model_type = cfg["model_type"]
    fields = {key: val for key, val in cfg.items() if key not in ("model_type", "architectures", "auto_map",
                                                                 "transformers_version", "torch_dtype", "dtype")}
    meta = bool(fields.get("metaplasticity", True))
    try:
        config = MetaplasticConfig.authors_preset(model_type, **{**fields, "metaplasticity": True})
    except ValueError as exc:
        raise CheckpointError(f"{ARCHITECTURES[model_type]} checkpoint: {exc}") from None
    if not meta:  # their plain model: the same layer with b ≡ 0, i.e. the gate closed
        config.mixer_kwargs = {**config.mixer_kwargs, "importance_gate": True, "importance_init": "identity"}
    config.mixer_kwargs["importance_rank"] = resolve_rank(config.mixer_kwargs["importance_rank"], config.hidden_size)
    return config


def surgery_config(config: MetaplasticConfig, init: str, rank: Optional[int]) -> MetaplasticConfig:
    """The model their surgery writes: metaplastic, no gate, ``rank`` if given (else the source's)."""
    out = copy.deepcopy(config)
    kwargs = {**out.mixer_kwargs, "importance_gate": False, "importance_init": init}
    if rank is not None:
        kwargs["importance_rank"] = rank
    out.mixer_kwargs = kwargs
    return out


def target_config(config: MetaplasticConfig, init: str, rank: Optional[int]) -> MetaplasticConfig:
    """The converted model's config: ``config`` as it is for ``identity``, the surgery's otherwise."""
    if init == "identity":
        have = config.mixer_kwargs["importance_rank"]
        if rank is not None and rank != have:
            raise CheckpointError(f"--rank {rank} differs from the checkpoint's importance rank {have}: a new rank "
                                  "needs --init paper (the path is drawn again)")
        return copy.deepcopy(config)
    return surgery_config(config, init, rank)


def source_key(model_type: str):
    """Our key -> their key for ``model_type`` (None for keys they do not have)."""
    palimpsa = model_type == "palimpsa"

    def key(ours: str) -> Optional[str]:
        match = _MIXER.match(ours)
        if match is not None:
            layer, name = match[1], match[2]
            if name in _ABSENT:
                return None
            name = _IMPORTANCE.get(name, name)
            if palimpsa:
                return f"model.layers.{layer}.attn." + ("dt_proj.weight" if name == "a_proj.weight" else name)
            return f"backbone.layers.{layer}.mixer.{name}"
        if not palimpsa:
            return ours
        if ours == "backbone.norm_f.weight":
            return "model.norm.weight"
        ours = re.sub(r"^backbone\.layers\.(\d+)\.norm\.", r"backbone.layers.\1.attn_norm.", ours)
        return re.sub(r"^backbone\.", "model.", ours)
    return key


def dropped(their_key: str) -> bool:
    """Whether their surgery drops ``their_key``."""
    return any(part in their_key for part in DROPPED)


def layer_tensors(tensor, key, config: MetaplasticConfig, layer: int, init: str,
                  generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Layer ``layer``'s mixer state dict for the converted ``config``: ``tensor(their key)`` for every kept
    weight; γ = 0 where absent (identity); the dropped keys drawn again by their laws (surgery)."""
    from ..mixers import MIXERS
    with torch.device("meta"):
        mixer = MIXERS[config.mixer_for(layer)](config.hidden_size, **config.mixer_kwargs_for(layer))
    fresh: Dict[str, Any] = {}
    if init != "identity":
        fresh = {f"importance.{name}": value for name, value in mixer.importance.init_values(init, generator).items()}
        if hasattr(mixer, "bs_proj"):
            fresh["bs_proj.weight"] = torch.randn(mixer.bs_proj.weight.shape, generator=generator) * INITIALIZER_RANGE
    out = {}
    for name, meta in mixer.state_dict().items():
        theirs = key(f"backbone.layers.{layer}.mixer.{name}")
        if theirs is None:
            out[name] = torch.zeros(meta.shape)  # γ = 0: b ≡ 0, as the source computed
        elif init != "identity" and dropped(theirs):
            out[name] = fresh[name]
        else:
            out[name] = tensor(theirs)
    return out


def open_checkpoint(directory: Path, cfg: dict) -> SourceCheckpoint:
    """The authors' checkpoint in ``directory``, its keys checked (errors name the architecture)."""
    config = source_config(cfg)
    model_type = cfg["model_type"]
    ckpt = SourceCheckpoint(directory, "authors", model_type, config, open_store(directory), source_key(model_type),
                            architecture=ARCHITECTURES[model_type],
                            target=lambda init, rank: target_config(config, init, rank), layer_fn=layer_tensors)
    try:
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.architecture} checkpoint: {exc}") from None
    return ckpt


AUTHORS = SourceFormat("authors", tuple(ARCHITECTURES.values()), recognise=is_authors, open=open_checkpoint)
