"""Gated Linear Attention checkpoints in fla's format (``GLAForCausalLM.save_pretrained``): the source format
:data:`GLA`.

``config.json`` has ``model_type: "gla"``; the weights are named (fla/models/gla)::

    model.embeddings.weight
    model.layers.{i}.attn_norm.weight
    model.layers.{i}.attn.{q,k,v,o}_proj.weight, g_proj.weight (with ``use_output_gate``),
        {q,k,v}_conv1d.weight (with ``use_short_conv``), gk_proj.0.weight, gk_proj.1.{weight,bias},
        g_norm_swish_gate.weight (``fuse_norm`` and an output gate) or g_norm.weight
    model.layers.{i}.mlp_norm.weight,  model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight,  lm_head.weight (absent when tied)

Such a model is a :class:`MetaplasticForCausalLM` with ``gla`` mixers and a SwiGLU MLP per block
(:func:`point_config`); the key names are those of fla's Gated DeltaNet (:func:`.source_gated_deltanet.source_key`).
fla's block builds each layer with ``gate_low_rank_dim = 16``, ``gate_logit_normalizer = 16`` and no
convolution bias. Options that change the layer's math and that our ``gla`` mixer does not implement are
refused by name (:func:`arch_from_fla`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from ..checkpoint_io import CheckpointError, get_bool, get_float, get_int, open_store
from ..configuration import MetaplasticConfig
from ..gla import FEATURE_MAPS
from .reading import SourceCheckpoint, SourceFormat, check_keys, check_layer_count
from .source_gated_deltanet import mlp_width, source_key  # the key names and MLP width are those of Gated DeltaNet

# fla's GLAConfig defaults (used when config.json omits a field)
DEFAULTS = dict(expand_k=0.5, expand_v=1.0, hidden_ratio=4, intermediate_size=None, num_heads=4, num_kv_heads=None,
                feature_map=None, attn_mode="chunk", use_short_conv=False, conv_size=4, use_output_gate=True,
                clamp_min=None, hidden_act="swish", elementwise_affine=True, norm_eps=1e-6, attn=None,
                tie_word_embeddings=False, fuse_norm=True, attnres_block_size=None)
ATTN_MODES = ("chunk", "fused_recurrent", "fused_chunk")  # fla's kernels for one and the same recurrence
GATE_LOW_RANK_DIM = 16  # fla's GatedLinearAttention defaults, which its GLABlock does not override
GATE_LOGIT_NORMALIZER = 16


@dataclass(frozen=True)
class GLAArch:
    """A fla GLA language model's architecture (the fields that fix its shapes and math)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    num_kv_heads: Optional[int]
    expand_k: float
    expand_v: float
    feature_map: Optional[str]
    use_short_conv: bool
    conv_size: int
    use_output_gate: bool
    clamp_min: Optional[float]
    fuse_norm: bool
    norm_eps: float
    intermediate_size: int
    tie_word_embeddings: bool
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    def mixer_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of :class:`metaplastic.GLA`."""
        kwargs = dict(num_heads=self.num_heads, expand_k=self.expand_k, expand_v=self.expand_v,
                      use_short_conv=self.use_short_conv, conv_size=self.conv_size, conv_bias=False,
                      use_output_gate=self.use_output_gate, fuse_norm=self.fuse_norm, norm_eps=self.norm_eps,
                      gate_logit_normalizer=GATE_LOGIT_NORMALIZER, gate_low_rank_dim=GATE_LOW_RANK_DIM)
        optional = dict(num_kv_heads=self.num_kv_heads, feature_map=self.feature_map, clamp_min=self.clamp_min)
        kwargs.update({key: val for key, val in optional.items() if val is not None})
        return kwargs


def _width(hidden: int, expand: float, name: str, num_heads: int) -> None:
    width = hidden * expand
    if expand <= 0 or width != int(width) or int(width) % num_heads:
        raise CheckpointError(f"hidden_size·{name} = {hidden}·{expand} is not a positive integer divisible by "
                              f"num_heads={num_heads}")


def arch_from_fla(cfg: dict) -> GLAArch:
    """The architecture of a fla ``gla`` config; unsupported options raise :class:`CheckpointError`."""
    c = {**DEFAULTS, **cfg}
    if c["attn"] is not None:
        raise CheckpointError(f"hybrid attention layers (attn={c['attn']!r}) are not supported: only pure GLA "
                              "stacks convert")
    feature_map = c["feature_map"]
    unknown_map = feature_map is not None and (not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS)
    refused = (("attnres_block_size", c["attnres_block_size"] is not None, "attention residuals"),
               ("hidden_act", c["hidden_act"] != "swish", "a non-swish output gate and MLP"),
               ("feature_map", unknown_map, f"supported: {', '.join(sorted(FEATURE_MAPS))} or none"),
               ("elementwise_affine", c["elementwise_affine"] is not True, "an output norm without weight"),
               ("attn_mode", c["attn_mode"] not in ATTN_MODES, f"fla knows {', '.join(ATTN_MODES)}"))
    for key, bad, why in refused:
        if bad:
            raise CheckpointError(f"{key}={c[key]!r} ({why}) is not supported")
    clamp_min = c["clamp_min"]
    if clamp_min is not None:
        clamp_min = get_float(c, "clamp_min", positive=False)
        if clamp_min > 0:
            raise CheckpointError(f"clamp_min={clamp_min!r} (a log-decay floor above 0) is not supported")
    hidden = get_int(c, "hidden_size")
    num_heads = get_int(c, "num_heads")
    num_kv_heads = None if c["num_kv_heads"] is None else get_int(c, "num_kv_heads")
    if num_kv_heads is not None and num_heads % num_kv_heads:
        raise CheckpointError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    expand_k, expand_v = get_float(c, "expand_k"), get_float(c, "expand_v")
    _width(hidden, expand_k, "expand_k", num_heads)
    _width(hidden, expand_v, "expand_v", num_heads)
    return GLAArch(
        vocab_size=get_int(c, "vocab_size"), hidden_size=hidden, num_hidden_layers=get_int(c, "num_hidden_layers"),
        num_heads=num_heads, num_kv_heads=num_kv_heads, expand_k=expand_k, expand_v=expand_v,
        feature_map=feature_map, use_short_conv=get_bool(c, "use_short_conv", False),
        conv_size=get_int(c, "conv_size"), use_output_gate=get_bool(c, "use_output_gate", True),
        clamp_min=clamp_min, fuse_norm=get_bool(c, "fuse_norm", True), norm_eps=get_float(c, "norm_eps"),
        intermediate_size=mlp_width(c, hidden), tie_word_embeddings=get_bool(c, "tie_word_embeddings", False),
        pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"), eos_token_id=c.get("eos_token_id"))


def point_config(arch: GLAArch) -> MetaplasticConfig:
    """The ``MetaplasticConfig`` computing the same function as the fla model (``gla`` mixers)."""
    return MetaplasticConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                             num_hidden_layers=arch.num_hidden_layers, mixer="gla",
                             mixer_kwargs=arch.mixer_kwargs(), intermediate_size=arch.intermediate_size,
                             layer_norm_epsilon=arch.norm_eps, residual_in_fp32=False,
                             tie_word_embeddings=arch.tie_word_embeddings, pad_token_id=arch.pad_token_id,
                             bos_token_id=arch.bos_token_id, eos_token_id=arch.eos_token_id)


def is_gla(cfg: dict) -> bool:
    """Whether ``config.json`` is fla's GLA config."""
    return cfg.get("model_type") == "gla"


def open_checkpoint(directory: Path, cfg: dict) -> SourceCheckpoint:
    """The GLA checkpoint in ``directory``, its layer count and keys checked (errors name the architecture)."""
    try:
        arch = arch_from_fla(cfg)
        store = open_store(directory)
        check_layer_count(store, arch.num_hidden_layers)
        ckpt = SourceCheckpoint(directory, "fla", arch, point_config(arch), store, source_key, architecture="GLA",
                                fla_model="GLAForCausalLM")
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"GLA checkpoint: {exc}") from None
    return ckpt


GLA = SourceFormat("fla", ("GLA",), recognise=is_gla, open=open_checkpoint)
