"""Mamba2 checkpoints in either format of docs/references.md#mamba2-checkpoints: two source formats
(:data:`HF`, :data:`MAMBA_SSM`), their architecture, key map and point-posterior config.

- Hugging Face: ``config.json`` with ``model_type: "mamba2"``; the key names are ours.
- original mamba_ssm: ``config.json`` with ``d_model`` / ``n_layer`` / ``ssm_cfg`` and no ``model_type``. The
  embedding is ``backbone.embedding.weight`` (renamed by :func:`adapt_store`), its rows are the vocabulary
  padded to ``pad_vocab_size_multiple``, and ``ngroups`` lives inside ``ssm_cfg``.

:func:`arch_from_config` reads the architecture (:class:`Mamba2Arch`) of either format, refusing unsupported
options by name (:class:`CheckpointError`); :func:`point_config` is the ``MetaplasticConfig`` with ``mamba2``
mixers computing the same function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..checkpoint_io import CheckpointError, TensorStore, get_bool, get_float, get_int, open_store
from ..configuration import MetaplasticConfig
from .reading import SourceCheckpoint, SourceFormat, check_keys, check_layer_count


@dataclass(frozen=True)
class Mamba2Arch:
    """A Mamba2 language model's architecture, in transformers' ``Mamba2Config`` vocabulary."""

    vocab_size: int  # rows of the embedding (the padded vocabulary for mamba_ssm checkpoints)
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    expand: int
    n_groups: int
    conv_kernel: int
    use_bias: bool
    use_conv_bias: bool
    time_step_limit: Tuple[float, float]
    layer_norm_epsilon: float
    residual_in_fp32: bool
    tie_word_embeddings: bool
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    unpadded_vocab_size: Optional[int] = None

    def mixer_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of :class:`metaplastic.Mamba2`."""
        return dict(num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.state_size, expand=self.expand,
                    n_groups=self.n_groups, conv_kernel=self.conv_kernel, use_bias=self.use_bias,
                    use_conv_bias=self.use_conv_bias, time_step_limit=list(self.time_step_limit),
                    layer_norm_epsilon=self.layer_norm_epsilon)


def _arch_from_hf(cfg: dict) -> Mamba2Arch:
    hidden = get_int(cfg, "hidden_size")
    expand = get_int(cfg, "expand", 2)
    head_dim = get_int(cfg, "head_dim", 64)
    num_heads = get_int(cfg, "num_heads", hidden * expand // head_dim)
    limit = _limit(cfg.get("time_step_limit", (0.0, math.inf)), "time_step_limit")
    return Mamba2Arch(
        vocab_size=get_int(cfg, "vocab_size"), hidden_size=hidden, num_hidden_layers=get_int(cfg, "num_hidden_layers"),
        num_heads=num_heads, head_dim=head_dim, state_size=get_int(cfg, "state_size", 128), expand=expand,
        n_groups=get_int(cfg, "n_groups", 8), conv_kernel=get_int(cfg, "conv_kernel", 4),
        use_bias=get_bool(cfg, "use_bias", False), use_conv_bias=get_bool(cfg, "use_conv_bias", True),
        time_step_limit=limit,
        layer_norm_epsilon=get_float(cfg, "layer_norm_epsilon", 1e-5),
        residual_in_fp32=get_bool(cfg, "residual_in_fp32", True),
        tie_word_embeddings=get_bool(cfg, "tie_word_embeddings", False),
        pad_token_id=cfg.get("pad_token_id"), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


def _arch_from_mamba_ssm(cfg: dict) -> Mamba2Arch:
    if get_int(cfg, "d_intermediate", 0, minimum=0) > 0:
        raise CheckpointError(f"d_intermediate={cfg['d_intermediate']} (an MLP in every block) is not supported: "
                              "only pure Mamba2 stacks convert")
    if cfg.get("attn_layer_idx"):
        raise CheckpointError(f"attention layers (attn_layer_idx={cfg['attn_layer_idx']}) are not supported: "
                              "only pure Mamba2 stacks convert")
    if not cfg.get("rms_norm", True):
        raise CheckpointError("rms_norm=false (LayerNorm blocks) is not supported")
    ssm = cfg.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise CheckpointError("ssm_cfg must be a JSON object")
    layer = ssm.get("layer", "Mamba1")
    if layer != "Mamba2":
        raise CheckpointError(f"ssm_cfg.layer is {layer!r} (mamba_ssm's default is Mamba1): not a Mamba2 checkpoint")
    for key, ok, why in (("D_has_hdim", False, "a D per channel"), ("norm_before_gate", False, "norm before gate"),
                         ("rmsnorm", True, "no gated norm")):
        if ssm.get(key, ok) != ok:
            raise CheckpointError(f"ssm_cfg.{key}={ssm[key]} ({why}) is not supported")
    hidden = get_int(cfg, "d_model")
    expand = get_int(ssm, "expand", 2)
    d_inner = expand * hidden
    if ssm.get("d_ssm") not in (None, d_inner):
        raise CheckpointError(f"ssm_cfg.d_ssm={ssm['d_ssm']} (a partial SSM) is not supported")
    head_dim = get_int(ssm, "headdim", 64)
    if d_inner % head_dim:
        raise CheckpointError(f"expand·d_model = {d_inner} is not divisible by headdim = {head_dim}")
    vocab = get_int(cfg, "vocab_size")
    multiple = get_int(cfg, "pad_vocab_size_multiple", 1)
    padded = vocab + (-vocab % multiple) if multiple > 1 else vocab
    limit = _limit(ssm.get("dt_limit", (0.0, math.inf)), "ssm_cfg.dt_limit")
    return Mamba2Arch(
        vocab_size=padded, hidden_size=hidden, num_hidden_layers=get_int(cfg, "n_layer"), num_heads=d_inner // head_dim,
        head_dim=head_dim, state_size=get_int(ssm, "d_state", 128), expand=expand, n_groups=get_int(ssm, "ngroups", 1),
        conv_kernel=get_int(ssm, "d_conv", 4), use_bias=get_bool(ssm, "bias", False),
        use_conv_bias=get_bool(ssm, "conv_bias", True), time_step_limit=limit,
        layer_norm_epsilon=get_float(cfg, "norm_epsilon", 1e-5), residual_in_fp32=get_bool(cfg, "residual_in_fp32", True),
        tie_word_embeddings=get_bool(cfg, "tie_embeddings", True), unpadded_vocab_size=vocab)


def _limit(value, key: str) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: {key}={value!r} is not a pair of numbers")
    if math.isnan(low) or math.isnan(high) or not 0 <= low <= high:
        raise CheckpointError(f"config.json: {key}={value!r} must be a pair 0 <= low <= high")
    return low, high


def is_hf(cfg: dict) -> bool:
    """Whether ``config.json`` is a Hugging Face Mamba2 config."""
    return cfg.get("model_type") == "mamba2"


def is_mamba_ssm(cfg: dict) -> bool:
    """Whether ``config.json`` is an original mamba_ssm config (``d_model`` and no ``model_type``)."""
    return cfg.get("model_type") is None and "d_model" in cfg


def arch_from_config(cfg: dict) -> Tuple[str, Mamba2Arch]:
    """``(format, architecture)`` of a Mamba2 ``config.json`` (format ``"hf"`` or ``"mamba_ssm"``); every
    unsupported option (and a config of neither format) raises :class:`CheckpointError` naming it."""
    if is_hf(cfg):
        fmt, arch = "hf", _arch_from_hf(cfg)
    elif is_mamba_ssm(cfg):
        fmt, arch = "mamba_ssm", _arch_from_mamba_ssm(cfg)
    else:
        raise CheckpointError("config.json is not a Mamba2 config of the Hugging Face or mamba_ssm format")
    if arch.num_heads * arch.head_dim != arch.expand * arch.hidden_size:
        raise CheckpointError(f"num_heads·head_dim = {arch.num_heads}·{arch.head_dim} differs from "
                              f"expand·hidden_size = {arch.expand}·{arch.hidden_size}")
    if arch.n_groups < 1 or arch.num_heads % arch.n_groups:
        raise CheckpointError(f"num_heads={arch.num_heads} is not divisible by n_groups={arch.n_groups}")
    return fmt, arch


def adapt_store(store: TensorStore) -> None:
    """Give a mamba_ssm checkpoint's embedding its Hugging Face name (``backbone.embeddings.weight``)."""
    if "backbone.embedding.weight" in store.shapes and "backbone.embeddings.weight" not in store.shapes:
        store.rename("backbone.embedding.weight", "backbone.embeddings.weight")


def source_key(key: str) -> str:
    """The checkpoint's name of our key ``key`` (the same, once :func:`adapt_store` renamed the embedding)."""
    return key


def point_config(arch: Mamba2Arch) -> MetaplasticConfig:
    """The ``MetaplasticConfig`` computing the same function as the Mamba2 model ``arch`` (``mamba2`` mixers)."""
    return MetaplasticConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                             num_hidden_layers=arch.num_hidden_layers, mixer="mamba2", mixer_kwargs=arch.mixer_kwargs(),
                             intermediate_size=0, layer_norm_epsilon=arch.layer_norm_epsilon,
                             residual_in_fp32=arch.residual_in_fp32, tie_word_embeddings=arch.tie_word_embeddings,
                             pad_token_id=arch.pad_token_id, bos_token_id=arch.bos_token_id,
                             eos_token_id=arch.eos_token_id)


def open_checkpoint(directory: Path, cfg: dict) -> SourceCheckpoint:
    """The Mamba2 checkpoint in ``directory`` (either format), its layer count and keys checked."""
    fmt, arch = arch_from_config(cfg)
    store = open_store(directory)
    adapt_store(store)
    check_layer_count(store, arch.num_hidden_layers)
    ckpt = SourceCheckpoint(directory, fmt, arch, point_config(arch), store, source_key, architecture="Mamba2")
    check_keys(ckpt)
    return ckpt


HF = SourceFormat("hf", ("Mamba2",), recognise=is_hf, open=open_checkpoint)
MAMBA_SSM = SourceFormat("mamba_ssm", ("Mamba2",), recognise=is_mamba_ssm, open=open_checkpoint)
