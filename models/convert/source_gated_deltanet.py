"""Gated DeltaNet checkpoints in fla's format (``GatedDeltaNetForCausalLM.save_pretrained``): the source format
:data:`GATED_DELTANET`.

``config.json`` has ``model_type: "gated_deltanet"``; the weights are named (docs/references.md#fla-checkpoints)::

    model.embeddings.weight
    model.layers.{i}.attn_norm.weight
    model.layers.{i}.attn.{q,k,v,a,b,g,o}_proj.weight, {q,k,v}_conv1d.weight, A_log, dt_bias, o_norm.weight
    model.layers.{i}.mlp_norm.weight,  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight,  lm_head.weight (absent when tied)

Such a model is a :class:`MetaplasticForCausalLM` with ``gated_deltanet`` mixers and a SwiGLU MLP per block
(:func:`point_config`); :func:`source_key` maps our key names onto fla's (those of its GLA too). Options that
change the layer's math and that our mixer does not implement are refused by name (:func:`arch_from_fla`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from ..checkpoint_io import CheckpointError, get_bool, get_float, get_int, open_store
from ..configuration import MetaplasticConfig
from .reading import SourceCheckpoint, SourceFormat, check_keys, check_layer_count

# fla's GatedDeltaNetConfig defaults (used when config.json omits a field)
DEFAULTS = dict(expand_v=2.0, use_gate=True, use_short_conv=True, allow_neg_eigval=False, conv_size=4, head_dim=256,
                num_heads=6, num_v_heads=None, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
                norm_eps=1e-6, attn=None, tie_word_embeddings=False, attnres_block_size=None,
                output_gate_activation="swish")


@dataclass(frozen=True)
class GatedDeltaNetArch:
    """A fla Gated DeltaNet language model's architecture (the fields that fix its shapes and math)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    num_v_heads: Optional[int]
    head_dim: int
    expand_v: float
    conv_size: int
    use_gate: bool
    norm_eps: float
    intermediate_size: int
    tie_word_embeddings: bool
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def mixer_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of :class:`metaplastic.GatedDeltaNet`."""
        kwargs = dict(num_heads=self.num_heads, head_dim=self.head_dim, expand_v=self.expand_v,
                      conv_size=self.conv_size, conv_bias=False, use_gate=self.use_gate, norm_eps=self.norm_eps)
        if self.num_v_heads is not None and self.num_v_heads != self.num_heads:
            kwargs["num_v_heads"] = self.num_v_heads
        return kwargs


def arch_from_fla(cfg: dict) -> GatedDeltaNetArch:
    """The architecture of a fla ``gated_deltanet`` config; unsupported options raise :class:`CheckpointError`."""
    c = {**DEFAULTS, **cfg}
    if c["attn"] is not None:
        raise CheckpointError(f"hybrid attention layers (attn={c['attn']!r}) are not supported: "
                              "only pure Gated DeltaNet stacks convert")
    refused = (("attnres_block_size", c["attnres_block_size"] is not None, "attention residuals"),
               ("use_short_conv", not c["use_short_conv"], "no short convolutions"),
               ("allow_neg_eigval", bool(c["allow_neg_eigval"]), "β in (0, 2)"),
               ("output_gate_activation", c["output_gate_activation"] not in ("swish", "silu"), "a sigmoid gate"),
               ("hidden_act", c["hidden_act"] != "swish", "a non-SwiGLU MLP"))
    for key, bad, why in refused:
        if bad:
            raise CheckpointError(f"{key}={c[key]!r} ({why}) is not supported")
    hidden = get_int(c, "hidden_size")
    num_heads = get_int(c, "num_heads")
    head_dim = get_int(c, "head_dim")
    num_v_heads = None if c["num_v_heads"] is None else get_int(c, "num_v_heads")
    if num_heads < 1 or head_dim < 1:
        raise CheckpointError(f"num_heads={num_heads} and head_dim={head_dim} must be positive")
    if num_v_heads is not None and (num_v_heads < num_heads or num_v_heads % num_heads):
        raise CheckpointError(f"num_v_heads={num_v_heads} is not a multiple of num_heads={num_heads}")
    expand_v = get_float(c, "expand_v")
    if expand_v <= 0 or head_dim * expand_v != int(head_dim * expand_v):
        raise CheckpointError(f"head_dim·expand_v = {head_dim}·{expand_v} is not a positive integer")
    intermediate = mlp_width(c, hidden)
    eps = get_float(c, "norm_eps")
    return GatedDeltaNetArch(
        vocab_size=get_int(c, "vocab_size"), hidden_size=hidden, num_hidden_layers=get_int(c, "num_hidden_layers"),
        num_heads=num_heads, num_v_heads=num_v_heads, head_dim=head_dim, expand_v=expand_v,
        conv_size=get_int(c, "conv_size"), use_gate=get_bool(c, "use_gate", True), norm_eps=eps,
        intermediate_size=intermediate, tie_word_embeddings=get_bool(c, "tie_word_embeddings", False),
        pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"))


def mlp_width(c: dict, hidden: int) -> int:
    """The width of fla's ``GatedMLP`` (SwiGLU) in a block: ``intermediate_size``, or when that is None
    ``2/3 · hidden_ratio · hidden`` (ratio 4 when None) rounded up to a multiple of 256."""
    if c.get("intermediate_size") is not None:
        return get_int(c, "intermediate_size")
    ratio = c.get("hidden_ratio")
    ratio = 4 if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1e4:
        raise CheckpointError(f"config.json: hidden_ratio={ratio!r} is not a positive number")
    intermediate = int(hidden * ratio * 2 / 3)
    return 256 * ((intermediate + 255) // 256)


def point_config(arch: GatedDeltaNetArch) -> MetaplasticConfig:
    """The ``MetaplasticConfig`` computing the same function as the fla model (``gated_deltanet`` mixers)."""
    return MetaplasticConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                             num_hidden_layers=arch.num_hidden_layers, mixer="gated_deltanet",
                             mixer_kwargs=arch.mixer_kwargs(), intermediate_size=arch.intermediate_size,
                             layer_norm_epsilon=arch.norm_eps, residual_in_fp32=False,
                             tie_word_embeddings=arch.tie_word_embeddings, pad_token_id=arch.pad_token_id,
                             bos_token_id=arch.bos_token_id, eos_token_id=arch.eos_token_id)


_KEY_RULES = ((re.compile(r"^backbone\.layers\.(\d+)\.norm\."), r"model.layers.\1.attn_norm."),
              (re.compile(r"^backbone\.layers\.(\d+)\.mixer\."), r"model.layers.\1.attn."),
              (re.compile(r"^backbone\.norm_f\."), "model.norm."),
              (re.compile(r"^backbone\."), "model."))


def source_key(key: str) -> str:
    """fla's name of our key ``key``: ``backbone.layers.0.mixer.q_proj.weight`` -> ``model.layers.0.attn.q_proj.weight``."""
    for pattern, repl in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def is_gated_deltanet(cfg: dict) -> bool:
    """Whether ``config.json`` is fla's Gated DeltaNet config."""
    return cfg.get("model_type") == "gated_deltanet"


def open_checkpoint(directory: Path, cfg: dict) -> SourceCheckpoint:
    """The Gated DeltaNet checkpoint in ``directory``, its layer count and keys checked (errors name the
    architecture)."""
    try:
        arch = arch_from_fla(cfg)
        store = open_store(directory)
        check_layer_count(store, arch.num_hidden_layers)
        ckpt = SourceCheckpoint(directory, "fla", arch, point_config(arch), store, source_key,
                                architecture="Gated DeltaNet", fla_model="GatedDeltaNetForCausalLM")
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"Gated DeltaNet checkpoint: {exc}") from None
    return ckpt


GATED_DELTANET = SourceFormat("fla", ("Gated DeltaNet",), recognise=is_gated_deltanet, open=open_checkpoint)
