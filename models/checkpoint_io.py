"""Reading Mamba2 checkpoints in either format of REFERENCES.md, one tensor at a time.

- Hugging Face: ``config.json`` with ``model_type: "mamba2"``; ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json`` (``pytorch_model.bin`` also accepted).
- original mamba_ssm: ``config.json`` with ``d_model`` / ``n_layer`` / ``ssm_cfg``; ``pytorch_model.bin`` or
  ``model.safetensors``. The embedding is ``backbone.embedding.weight`` (renamed here), its rows are the
  vocabulary padded to ``pad_vocab_size_multiple``, and ``ngroups`` lives inside ``ssm_cfg``.

:func:`open_mamba2` returns a :class:`Mamba2Checkpoint`: the normalised architecture (:class:`Mamba2Arch`)
and a :class:`TensorStore` with Hugging Face key names. Every problem raises :class:`CheckpointError`
(a ``ValueError``) with a one-line message naming it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the problem in one line."""


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
        """Keyword arguments of :class:`metaplastic.models.Mamba2`."""
        return dict(num_heads=self.num_heads, head_dim=self.head_dim, state_size=self.state_size, expand=self.expand,
                    n_groups=self.n_groups, conv_kernel=self.conv_kernel, use_bias=self.use_bias,
                    use_conv_bias=self.use_conv_bias, time_step_limit=list(self.time_step_limit),
                    layer_norm_epsilon=self.layer_norm_epsilon)


# --- tensor stores -------------------------------------------------------------------------------

class TensorStore:
    """Name → tensor, loaded lazily one at a time. ``shapes`` is known without reading any data."""

    shapes: Dict[str, Tuple[int, ...]]

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def rename(self, old: str, new: str) -> None:
        self._aliases[new] = self._aliases.pop(old, old)
        self.shapes[new] = self.shapes.pop(old)

    def _source_name(self, name: str) -> str:
        return self._aliases.get(name, name)


class SafetensorsStore(TensorStore):
    """One or several ``.safetensors`` files, memory-mapped."""

    def __init__(self, files: List[Path]) -> None:
        from safetensors import safe_open
        self._handles, self._where, self.shapes, self._aliases = [], {}, {}, {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
                shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
            except Exception as exc:
                raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)} (truncated or not a safetensors file?)")
            self._handles.append(handle)
            for name in names:
                self._where[name] = handle
            self.shapes.update(shapes)

    def get(self, name: str) -> torch.Tensor:
        src = self._source_name(name)
        try:
            return self._where[src].get_tensor(src)
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {src!r}: {_one_line(exc)}")


class TorchBinStore(TensorStore):
    """A ``pytorch_model.bin`` state dict, memory-mapped where the file format allows it."""

    def __init__(self, path: Path) -> None:
        self._aliases = {}
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            try:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception:
                raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)} (truncated or not a torch file?)")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
        self._state = state
        self.shapes = {name: tuple(t.shape) for name, t in state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self._state[self._source_name(name)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _open_store(directory: Path) -> TensorStore:
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    binary = directory / "pytorch_model.bin"
    if index.exists():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index.name} has no 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).exists()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} listed in {index.name} is missing")
        return SafetensorsStore([directory / name for name in files])
    if single.exists():
        return SafetensorsStore([single])
    if binary.exists():
        return TorchBinStore(binary)
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _decode_floats(obj):
    """transformers writes ``inf`` as ``{"__float__": "Infinity"}``; turn such objects back into floats."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and obj["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[obj["__float__"]]
        return {key: _decode_floats(val) for key, val in obj.items()}
    if isinstance(obj, list):
        return [_decode_floats(val) for val in obj]
    return obj


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return _decode_floats(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {_one_line(exc)}")


# --- configs -------------------------------------------------------------------------------------

_NOT_MAMBA2 = {  # refused by name (Gated DeltaNet is read by fla_checkpoints, not here)
    "mamba": "a Mamba (v1) checkpoint",
    "gated_deltanet": "a Gated DeltaNet checkpoint (convert it with metaplastic.models.convert_checkpoint)",
    "mesa_net": "a MesaNet checkpoint (not supported: its full posterior has no point-posterior source)",
}


def _arch_from_hf(cfg: dict) -> Mamba2Arch:
    hidden = _get_int(cfg, "hidden_size")
    expand = _get_int(cfg, "expand", 2)
    head_dim = _get_int(cfg, "head_dim", 64)
    num_heads = _get_int(cfg, "num_heads", hidden * expand // head_dim)
    limit = _limit(cfg.get("time_step_limit", (0.0, math.inf)), "time_step_limit")
    return Mamba2Arch(
        vocab_size=_get_int(cfg, "vocab_size"), hidden_size=hidden, num_hidden_layers=_get_int(cfg, "num_hidden_layers"),
        num_heads=num_heads, head_dim=head_dim, state_size=_get_int(cfg, "state_size", 128), expand=expand,
        n_groups=_get_int(cfg, "n_groups", 8), conv_kernel=_get_int(cfg, "conv_kernel", 4),
        use_bias=bool(cfg.get("use_bias", False)), use_conv_bias=bool(cfg.get("use_conv_bias", True)),
        time_step_limit=limit,
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        pad_token_id=cfg.get("pad_token_id"), bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


def _arch_from_mamba_ssm(cfg: dict) -> Mamba2Arch:
    if int(cfg.get("d_intermediate", 0) or 0) > 0:
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
    hidden = _get_int(cfg, "d_model")
    expand = _get_int(ssm, "expand", 2)
    d_inner = expand * hidden
    if ssm.get("d_ssm") not in (None, d_inner):
        raise CheckpointError(f"ssm_cfg.d_ssm={ssm['d_ssm']} (a partial SSM) is not supported")
    head_dim = _get_int(ssm, "headdim", 64)
    if d_inner % head_dim:
        raise CheckpointError(f"expand·d_model = {d_inner} is not divisible by headdim = {head_dim}")
    vocab = _get_int(cfg, "vocab_size")
    multiple = _get_int(cfg, "pad_vocab_size_multiple", 1)
    padded = vocab + (-vocab % multiple) if multiple > 1 else vocab
    limit = _limit(ssm.get("dt_limit", (0.0, math.inf)), "ssm_cfg.dt_limit")
    return Mamba2Arch(
        vocab_size=padded, hidden_size=hidden, num_hidden_layers=_get_int(cfg, "n_layer"), num_heads=d_inner // head_dim,
        head_dim=head_dim, state_size=_get_int(ssm, "d_state", 128), expand=expand, n_groups=_get_int(ssm, "ngroups", 1),
        conv_kernel=_get_int(ssm, "d_conv", 4), use_bias=bool(ssm.get("bias", False)),
        use_conv_bias=bool(ssm.get("conv_bias", True)), time_step_limit=limit,
        layer_norm_epsilon=float(cfg.get("norm_epsilon", 1e-5)), residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        tie_word_embeddings=bool(cfg.get("tie_embeddings", True)), unpadded_vocab_size=vocab)


def _limit(value, key: str) -> Tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CheckpointError(f"config.json: {key}={value!r} is not a pair of numbers")
    return low, high


def _get_int(cfg: dict, key: str, default: Optional[int] = None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json has no {key!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 0:
        raise CheckpointError(f"config.json: {key}={value!r} is not a non-negative integer")
    return int(value)


# --- the checkpoint ------------------------------------------------------------------------------

@dataclass
class Mamba2Checkpoint:
    """A Mamba2 checkpoint: its format (``"hf"`` or ``"mamba_ssm"``), architecture and tensors (HF names)."""

    path: Path
    format: str
    arch: Mamba2Arch
    store: TensorStore
    extra_keys: List[str] = field(default_factory=list)  # present but redundant (a tied lm_head)

    def tensor(self, name: str) -> torch.Tensor:
        return self.store.get(name)


def read_config(path) -> Tuple[Path, dict]:
    """``(directory, config.json as a dict)`` of a checkpoint directory; ``CheckpointError`` naming the problem."""
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"{directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    cfg = _read_json(directory / "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError("config.json is not a JSON object")
    return directory, cfg


def open_mamba2(path) -> Mamba2Checkpoint:
    """Open a checkpoint directory of either format; validate its config, keys and shapes (no data read)."""
    directory, cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type == "mamba2":
        fmt, arch = "hf", _arch_from_hf(cfg)
    elif model_type is None and "d_model" in cfg:
        fmt, arch = "mamba_ssm", _arch_from_mamba_ssm(cfg)
    elif model_type in _NOT_MAMBA2:
        raise CheckpointError(f"model_type {model_type!r} is {_NOT_MAMBA2[model_type]}, not Mamba2 or Gated DeltaNet")
    elif "num_attention_heads" in cfg or "n_head" in cfg:
        raise CheckpointError(f"model_type {model_type!r} is a Transformer checkpoint (attention layers): only "
                              "Mamba2 and Gated DeltaNet checkpoints convert")
    elif model_type is None:
        raise CheckpointError("config.json has neither 'model_type' (Hugging Face) nor 'd_model' (mamba_ssm)")
    else:
        raise CheckpointError(f"unknown model_type {model_type!r}: only Mamba2 (Hugging Face, mamba_ssm) and "
                              "Gated DeltaNet (fla) checkpoints convert")
    if arch.num_heads * arch.head_dim != arch.expand * arch.hidden_size:
        raise CheckpointError(f"num_heads·head_dim = {arch.num_heads}·{arch.head_dim} differs from "
                              f"expand·hidden_size = {arch.expand}·{arch.hidden_size}")
    if arch.n_groups < 1 or arch.num_heads % arch.n_groups:
        raise CheckpointError(f"num_heads={arch.num_heads} is not divisible by n_groups={arch.n_groups}")
    store = _open_store(directory)
    if "backbone.embedding.weight" in store.shapes and "backbone.embeddings.weight" not in store.shapes:
        store.rename("backbone.embedding.weight", "backbone.embeddings.weight")
    ckpt = Mamba2Checkpoint(directory, fmt, arch, store)
    _check_keys(ckpt)
    return ckpt


def expected_shapes(arch: Mamba2Arch) -> Dict[str, Tuple[int, ...]]:
    """The Hugging Face Mamba2 state dict of ``arch``, from the mixer class itself (meta device)."""
    from .mamba2 import Mamba2
    with torch.device("meta"):
        mixer = Mamba2(arch.hidden_size, **arch.mixer_kwargs())
    shapes = {"backbone.embeddings.weight": (arch.vocab_size, arch.hidden_size)}
    for i in range(arch.num_hidden_layers):
        shapes[f"backbone.layers.{i}.norm.weight"] = (arch.hidden_size,)
        for name, t in mixer.state_dict().items():
            shapes[f"backbone.layers.{i}.mixer.{name}"] = tuple(t.shape)
    shapes["backbone.norm_f.weight"] = (arch.hidden_size,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return shapes


def compare_keys(want: Dict[str, Tuple[int, ...]], have: Dict[str, Tuple[int, ...]]) -> None:
    """Every key of ``want`` is in ``have`` with its shape, and nothing else is; ``CheckpointError`` otherwise."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    if missing:
        raise CheckpointError(f"missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"unexpected key {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for key, shape in want.items():
        if tuple(have[key]) != shape:
            raise CheckpointError(f"shape mismatch for {key!r}: checkpoint has {list(have[key])}, the config implies "
                                  f"{list(shape)}")


def _check_keys(ckpt: Mamba2Checkpoint) -> None:
    want = dict(expected_shapes(ckpt.arch))
    if ckpt.arch.tie_word_embeddings and "lm_head.weight" in ckpt.store.shapes:
        ckpt.extra_keys.append("lm_head.weight")  # a tied head saved twice: checked equal, then dropped
        want["lm_head.weight"] = want["backbone.embeddings.weight"]
    compare_keys(want, ckpt.store.shapes)


def iter_layer_tensors(ckpt: Mamba2Checkpoint, layer: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name within the mixer, tensor)`` for every mixer tensor of ``layer``."""
    prefix = f"backbone.layers.{layer}.mixer."
    for key in ckpt.store.shapes:
        if key.startswith(prefix):
            yield key[len(prefix):], ckpt.tensor(key)
