"""A checkpoint -> ``MetaplasticForCausalLM`` with metaplastic mixers (THEORY.md §5), and the command
``metaplastic convert SRC DST``.

One mechanism for every source format: :func:`open_checkpoint` reads ``config.json`` and describes the
source as a :class:`SourceCheckpoint`, a point-posterior ``MetaplasticForCausalLM`` config plus a key map
(our state-dict key -> the checkpoint's key); :func:`convert_checkpoint` copies every tensor and passes each
layer's mixer through :func:`to_metaplastic`.

| format | architecture | detected by | module |
|---|---|---|---|
| ``hf`` | Mamba2 (transformers) | ``model_type: "mamba2"`` | :mod:`.source_mamba2` |
| ``mamba_ssm`` | Mamba2 (original) | ``d_model`` and no ``model_type`` | :mod:`.source_mamba2` |
| ``fla`` | Gated DeltaNet (fla) | ``model_type: "gated_deltanet"`` | :mod:`.source_fla` |
| ``fla`` | GLA (fla) | ``model_type: "gla"`` | :mod:`.source_gla` |
| ``authors`` | Palimpsa, MetaMamba2 (paper) | ``model_type: "palimpsa"``, ``"meta_mamba2"`` | :mod:`.source_authors` |

Mamba2 -> ``meta_mamba2`` mixers; Gated DeltaNet -> ``meta_gated_deltanet`` and GLA -> ``meta_gla`` mixers,
each with the source's SwiGLU MLPs. With ``init="identity"`` (γ = 0) the converted model's logits equal the
source's; ``init="paper"`` initialises the plasticity path by the paper's surgery law (γ = 1,
W_b1 ~ N(0, 0.02²), W_b2 ~ U(±rank^{-1/2}), b_scale = 1), ``"paper-finetuning"`` with b_scale ~ U(0.1, 1): not
output-preserving. The authors' own
checkpoints are already metaplastic: they keep every weight (identity) or go through their surgery
(:mod:`.source_authors`).

Tensors move one at a time (memory-mapped source, streaming safetensors writer), and the result is
written to a temporary directory beside ``dst`` that is renamed at the end, so a failure leaves no ``dst``.

Safety (docs/safety.md): every source tensor must be floating-point and finite, and fit the requested
``--dtype``; ``dst`` is locked against a second writer (``.DST.lock``); ``--force`` replaces only an earlier
output of this command (recognised by its ``config.json`` and the marker ``conversion.json``), never SRC, a
directory containing SRC or one inside it; ``--verify`` fails on any non-finite logit difference.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from metaplastic.errors import UserError
from metaplastic.safe_io import DirLock, atomic_dir, check_output_location, clean_stale, describe_reason

from . import source_authors, source_fla, source_gla, source_mamba2
from .checkpoint_io import (CheckpointError, StreamingSafetensorsWriter, TensorStore, compare_keys, nbytes, open_store,
                            read_config, stored_layers)
from .configuration import MetaplasticConfig
from .importance import INITS
from .twins import to_metaplastic, twin_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt")
SEED = 0  # the importance path's initialisation is deterministic: generator seeded SEED + layer index
_MIXER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.mixer\.(.+)$")
ARCHITECTURES = {"hf": "Mamba2", "mamba_ssm": "Mamba2", "fla": "Gated DeltaNet"}
SOURCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLA_MODELS = {"Gated DeltaNet": "GatedDeltaNetForCausalLM", "GLA": "GLAForCausalLM"}  # fla's classes (verify)
MARKER = "conversion.json"  # written into every DST: what --force may replace
WRITTEN_BY = "metaplastic convert"


class ConversionError(ValueError):
    """Bad input to the converter (one-line message)."""


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
    max_rel_diff: Optional[float] = None  # the larger difference over max |source logit| (verify)


# --- sources ---------------------------------------------------------------------------------------

@dataclass
class SourceCheckpoint:
    """A checkpoint to convert: its format, its architecture object, the equivalent point-posterior config,
    its tensors and the key map from our names to its names."""

    path: Path
    format: str
    arch: object  # Mamba2Arch, GatedDeltaNetArch or GLAArch
    config: MetaplasticConfig
    store: TensorStore
    source_key: Callable[[str], str]
    extra_keys: List[str] = field(default_factory=list)  # present but redundant (a tied lm_head)
    name: Optional[str] = None  # the architecture's name where the format alone does not tell it
    # already-metaplastic formats: (init, rank) -> the converted config, and their per-layer conversion
    target: Optional[Callable[[str, Optional[int]], MetaplasticConfig]] = None
    layer_fn: Optional[Callable[..., Dict[str, torch.Tensor]]] = None
    _keys: Optional[List[str]] = field(default=None, repr=False)  # our state-dict keys, built once

    @property
    def architecture(self) -> str:
        return self.name or ARCHITECTURES[self.format]

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


def lm_shapes(config: MetaplasticConfig, layers=None) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of ``MetaplasticForCausalLM(config)``'s state dict, in its order (no ``lm_head`` when
    tied), built on the meta device. ``layers``: only those blocks (and nothing outside the blocks)."""
    from .modeling import MetaplasticBlock
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


def _open_mamba2(directory: Path, cfg: dict) -> SourceCheckpoint:
    fmt, arch = source_mamba2.arch_from_config(cfg)  # refuses every other model_type by name
    store = open_store(directory)
    source_mamba2.adapt_store(store)
    _check_layer_count(store, arch.num_hidden_layers)
    ckpt = SourceCheckpoint(directory, fmt, arch, source_mamba2.point_config(arch), store, source_mamba2.source_key)
    check_keys(ckpt)
    return ckpt


def _open_fla_gdn(directory: Path, cfg: dict) -> SourceCheckpoint:
    try:
        arch = source_fla.arch_from_fla(cfg)
        store = open_store(directory)
        _check_layer_count(store, arch.num_hidden_layers)
        ckpt = SourceCheckpoint(directory, "fla", arch, source_fla.point_config(arch), store, source_fla.source_key)
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"Gated DeltaNet checkpoint: {exc}") from None
    return ckpt


def _open_fla_gla(directory: Path, cfg: dict) -> SourceCheckpoint:
    try:
        arch = source_gla.arch_from_fla(cfg)
        store = open_store(directory)
        _check_layer_count(store, arch.num_hidden_layers)
        ckpt = SourceCheckpoint(directory, "fla", arch, source_gla.point_config(arch), store, source_gla.source_key,
                                name="GLA")
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"GLA checkpoint: {exc}") from None
    return ckpt


def _open_authors(directory: Path, cfg: dict) -> SourceCheckpoint:
    config = source_authors.source_config(cfg)
    model_type = cfg["model_type"]
    ckpt = SourceCheckpoint(directory, "authors", model_type, config, open_store(directory),
                            source_authors.source_key(model_type), name=source_authors.ARCHITECTURES[model_type],
                            target=lambda init, rank: source_authors.target_config(config, init, rank),
                            layer_fn=source_authors.layer_tensors)
    try:
        check_keys(ckpt)
    except CheckpointError as exc:
        raise CheckpointError(f"{ckpt.architecture} checkpoint: {exc}") from None
    return ckpt


def open_checkpoint(path) -> SourceCheckpoint:
    """Open a checkpoint directory of any supported format; validate config, keys and shapes (no data read)."""
    directory, cfg = read_config(path)
    if source_authors.is_authors(cfg):
        return _open_authors(directory, cfg)
    if cfg.get("model_type") == "gated_deltanet":
        return _open_fla_gdn(directory, cfg)
    if cfg.get("model_type") == "gla":
        return _open_fla_gla(directory, cfg)
    return _open_mamba2(directory, cfg)  # Mamba2 of either format; refuses every other model_type by name


def _check_layer_count(store: TensorStore, layers: int) -> None:
    """The config's layer count must be that of the tensors on disk (checked before building any layer)."""
    held = stored_layers(store.shapes)
    if held != layers:
        raise CheckpointError(f"config.json: num_hidden_layers={layers}, but the checkpoint's tensors hold {held} "
                              "layers")


# --- conversion ------------------------------------------------------------------------------------

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
    from .mixers import MIXERS
    with torch.device("meta"):
        mixer = MIXERS[config.mixer_for(layer)](config.hidden_size, **config.mixer_kwargs_for(layer))
    mixer.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True, assign=True)
    generator = torch.Generator().manual_seed(SEED + layer)
    twin = to_metaplastic(mixer, init=init, rank=importance_rank, generator=generator, copy=False,
                          groups=importance_groups)
    return twin.state_dict()


def _dst_layout(config: MetaplasticConfig, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """``(key, shape, dtype)`` of every tensor of the converted model, in writing order."""
    return [(key, shape, dtype) for key, shape in lm_shapes(config).items()]


def _dst_tensors(ckpt: SourceCheckpoint, config: MetaplasticConfig, layout, init: str,
                 rank: Optional[int], groups: Optional[int] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """The converted model's (``config``'s) tensors in writing order, one layer in memory at a time."""
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


def _check_tied_head(ckpt: SourceCheckpoint) -> None:
    if "lm_head.weight" in ckpt.extra_keys:
        if not torch.equal(ckpt.tensor("lm_head.weight"), ckpt.tensor("backbone.embeddings.weight")):
            raise CheckpointError("the config ties the embeddings but lm_head.weight differs from the embedding")


def convert_checkpoint(src, dst, *, init: str = "identity", dtype: str = "float32", force: bool = False,
                       verify: bool = False, importance_rank: Optional[int] = None, progress: bool = True,
                       verify_tokens: int = 16, log=print, importance_groups: Optional[int] = None) -> ConversionResult:
    """Convert the checkpoint directory ``src`` (Mamba2 in the Hugging Face or mamba_ssm format, Gated DeltaNet
    or GLA in fla's, or the paper authors' Palimpsa / MetaMamba2) into a metaplastic model directory ``dst``.

    ``importance_groups``: importance groups per head of the twins (None: one rate per value channel; an
    int must divide the head's value width). Raises :class:`ConversionError` / :class:`CheckpointError` (both
    ``ValueError``) for bad input; ``dst`` then does not exist (or, with ``force``, still holds what it held before).
    """
    if init not in INITS:
        raise ConversionError(f"--init must be one of {INITS}, got {init!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if importance_rank is not None and importance_rank < 1:
        raise ConversionError(f"--rank must be positive, got {importance_rank}")
    if importance_groups is not None and (isinstance(importance_groups, bool) or not isinstance(importance_groups, int)
                                          or importance_groups < 1):
        raise ConversionError(f"--importance-groups must be a positive integer, got {importance_groups!r}")
    torch_dtype = DTYPES[dtype]
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, force)
    ckpt = open_checkpoint(src)
    _check_tied_head(ckpt)
    config = ckpt.target_config(torch_dtype, init, importance_rank, importance_groups)
    rank = config.mixer_kwargs_for(0)["importance_rank"]
    try:
        layout = _dst_layout(config, torch_dtype)
    except ValueError as exc:
        if importance_groups is None or "importance_groups" not in str(exc):
            raise
        raise ConversionError(f"--importance-groups {importance_groups}: {str(exc).splitlines()[0]}") from None
    total = sum(nbytes(shape, dt) for _, shape, dt in layout)
    check_free_space(dst, total)
    marker = {"written_by": WRITTEN_BY, "source": str(src.resolve()), "format": ckpt.format, "init": init,
              "dtype": dtype, "importance_rank": rank}
    with DirLock(dst, "DST"):
        check_destination(src, dst, force)  # again, under the lock: another writer may have finished meanwhile
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the work is copying: one thread avoids OpenMP start-up on every small op
        try:
            with atomic_dir(dst, replace=True) as tmp:  # replace: check_destination allowed it
                with StreamingSafetensorsWriter(tmp / "model.safetensors", layout) as writer, \
                        tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
                    for name, tensor in _dst_tensors(ckpt, config, layout, init, rank, importance_groups):
                        writer.write(name, tensor)
                        check_values(ckpt.source_key(name) or name, tensor, torch_dtype)
                        bar.update(tensor.numel() * torch.empty((), dtype=torch_dtype).element_size())
                config.save_pretrained(tmp)
                for name in TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copy2(src / name, tmp / name)
                (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        finally:
            torch.set_num_threads(threads)
        result = ConversionResult(dst, ckpt.format, len(layout), total, architecture=ckpt.architecture)
        if verify:
            verify_conversion(ckpt, dst, init, rank, result, tokens=verify_tokens, log=log,
                                  groups=importance_groups)
    return result


convert_mamba2 = convert_checkpoint  # the name of the first converter (it reads every supported format)


def is_conversion_output(path: Path) -> bool:
    """``path`` is a directory written by this command: a metaplastic ``config.json`` and the marker file."""
    try:
        marker = json.loads((path / MARKER).read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == WRITTEN_BY and isinstance(config, dict) \
        and config.get("model_type") == MetaplasticConfig.model_type


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that would lose anything: SRC itself, a directory containing SRC or inside it, an existing
    DST without ``--force``, and with ``--force`` anything but an earlier output of this command."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise ConversionError("DST must differ from SRC")
    if d in s.parents:
        raise ConversionError(f"DST {dst} contains SRC {src}: replacing it would delete the source")
    if s in d.parents:
        raise ConversionError(f"DST {dst} lies inside SRC {src}: write the conversion elsewhere")
    check_output_location(dst, what="DST", kind="dir")
    if not dst.exists():
        return
    if not force:
        raise ConversionError(f"{dst} already exists (use --force to replace an earlier conversion)")
    if is_conversion_output(dst) or (dst.is_dir() and not any(dst.iterdir())):
        return
    raise ConversionError(f"--force replaces only an earlier output of metaplastic convert, and {dst} is not one "
                          f"(no {MARKER} beside a metaplastic config.json); remove it yourself if it may go")


def check_free_space(dst: Path, needed: int) -> None:
    """Refuse, before any work, a file system without room for the converted weights."""
    where = dst.absolute().parent
    while not where.exists():
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return
    if needed > free:
        raise ConversionError(f"DST {dst}: the converted weights need {needed / 2**20:.1f} MiB, "
                              f"{where} has {free / 2**20:.1f} MiB free")


# --- verification ----------------------------------------------------------------------------------

def point_model(ckpt: SourceCheckpoint):
    """The source's weights in a ``MetaplasticForCausalLM`` of ``ckpt.config`` (float32; a key the format does
    not have is a closed gate γ = 0)."""
    from .modeling import MetaplasticForCausalLM
    model = MetaplasticForCausalLM(ckpt.config)
    state = {key: (ckpt.tensor(key).float() if ckpt.source_key(key) is not None else torch.zeros(shape))
             for key, shape in lm_shapes(ckpt.config).items()}
    model.load_state_dict(state, strict=not ckpt.config.tie_word_embeddings)
    return model.eval()


def load_source_model(ckpt: SourceCheckpoint) -> Tuple[Any, str]:
    """``(model, description)``: the source run by code nobody here wrote where that runs on this machine
    (transformers' ``Mamba2ForCausalLM``; fla's ``GatedDeltaNetForCausalLM`` / ``GLAForCausalLM`` on a GPU), else
    :func:`point_model` (always for the authors' checkpoints, whose code is not a dependency: their maths is
    checked against an independent oracle in the tests). transformers before 5.23 is no reference for Mamba2 at
    n_groups > 1."""
    from metaplastic.oracles import transformers_mamba2_is_grouped
    if ckpt.format in ("hf", "mamba_ssm") and ckpt.arch.n_groups > 1 and not transformers_mamba2_is_grouped():
        return point_model(ckpt), ("mamba2 mixers holding the source weights (the installed transformers < 5.23 "
                                   "does not normalise per group)")
    if ckpt.format == "hf":
        from transformers import Mamba2ForCausalLM
        model = Mamba2ForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
        return model, "transformers Mamba2ForCausalLM"
    if ckpt.format == "mamba_ssm":
        return _transformers_mamba2(ckpt), "transformers Mamba2ForCausalLM (renamed mamba_ssm weights)"
    if ckpt.format == "fla" and torch.cuda.is_available():
        name = FLA_MODELS[ckpt.architecture]
        try:
            import fla.models
        except ImportError:
            pass
        else:
            model = getattr(fla.models, name).from_pretrained(str(ckpt.path), dtype=torch.float32).cuda().eval()
            return model, f"fla {name} (GPU)"
    return point_model(ckpt), f"{ckpt.config.mixer_for(0)} mixers holding the source weights"


def relative(diff: float, ref: torch.Tensor) -> float:
    """``max |ours − ref| / max |ref|``."""
    return diff / max(ref.abs().max().item(), 1e-30)


def _transformers_mamba2(ckpt: SourceCheckpoint):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    a = ckpt.arch
    cfg = Mamba2Config(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
                       num_heads=a.num_heads, head_dim=a.head_dim, state_size=a.state_size, expand=a.expand,
                       n_groups=a.n_groups, conv_kernel=a.conv_kernel, use_bias=a.use_bias,
                       use_conv_bias=a.use_conv_bias, time_step_limit=tuple(a.time_step_limit),
                       layer_norm_epsilon=a.layer_norm_epsilon, residual_in_fp32=a.residual_in_fp32,
                       tie_word_embeddings=a.tie_word_embeddings, pad_token_id=None, bos_token_id=None,
                       eos_token_id=None)
    model = Mamba2ForCausalLM(cfg)
    state = {key: ckpt.tensor(key).float() for key in lm_shapes(ckpt.config)}
    model.load_state_dict(state, strict=not a.tie_word_embeddings)
    if a.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def converted_model(ckpt: SourceCheckpoint, init: str, rank: int, groups: Optional[int] = None):
    """The converted model built in memory from ``ckpt`` (the same tensors the converter writes)."""
    from .modeling import MetaplasticForCausalLM
    config = ckpt.target_config(torch.float32, init, rank, groups)
    model = MetaplasticForCausalLM(config)
    state = dict(_dst_tensors(ckpt, config, _dst_layout(config, torch.float32), init, rank, groups))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not config.tie_word_embeddings)
    return model.eval()


@torch.no_grad()
def verify_conversion(ckpt: SourceCheckpoint, dst: Path, init: str, rank: int, result: ConversionResult,
                      tokens: int = 16, log=print, groups: Optional[int] = None) -> None:
    """Largest |logit difference| on random tokens: source vs converted, and source vs ``dst`` reloaded."""
    from transformers import AutoModelForCausalLM
    source, description = load_source_model(ckpt)
    device = next(source.parameters()).device
    vocab = getattr(ckpt.arch, "unpadded_vocab_size", None) or ckpt.config.vocab_size
    ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(0))
    ref = source(ids.to(device)).logits.float().cpu()
    del source
    converted = converted_model(ckpt, init, rank, groups)
    result.max_abs_diff = (converted(ids).logits.float() - ref).abs().max().item()
    del converted
    reloaded = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    result.max_abs_diff_reloaded = (reloaded(ids).logits.float() - ref).abs().max().item()
    result.reference = description
    log(f"verify: {tokens} random tokens x 2 sequences, max |logit| of source {ref.abs().max().item():.3g} "
        f"(source run by {description})")
    result.max_rel_diff = relative(max(result.max_abs_diff, result.max_abs_diff_reloaded), ref)
    log(f"verify: max |logit difference| source vs converted        = {result.max_abs_diff:.3e}")
    log(f"verify: max |logit difference| source vs reloaded {dst.name} (relative to max |logit|: "
        f"{relative(result.max_abs_diff_reloaded, ref):.2e}) = {result.max_abs_diff_reloaded:.3e}")


# --- the command ``metaplastic convert SRC DST`` -------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory: Mamba2 (Hugging Face or mamba_ssm format), "
                        "Gated DeltaNet or GLA (fla format), or the paper authors' Palimpsa / MetaMamba2")
    parser.add_argument("dst", metavar="DST", help="output directory (Hugging Face format, MetaplasticForCausalLM with the metaplastic twin mixers)")
    parser.add_argument("--init", choices=INITS, default="identity",
                        help="identity: output-identical to SRC (γ = 0; the authors' checkpoints keep every weight; "
                             "default); paper: the paper's surgery law (fresh plasticity path, b_scale = 1), not "
                             "output-preserving; paper-finetuning: the same with b_scale ~ U(0.1, 1)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of DST's weights")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the importance path (default min(64, d_model); the authors' checkpoints: "
                             "theirs, changed only with --init paper*)")
    parser.add_argument("--importance-groups", type=int, default=None, metavar="G",
                        help="share each importance rate within G contiguous groups of a head's value rows (G must "
                             "divide the head's value width; G = 1: one rate per head). Default: one per value channel")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits of SRC and DST on random tokens (also after reloading DST)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be positive, got {args.rank}")
    if args.importance_groups is not None and args.importance_groups < 1:
        raise UserError(f"--importance-groups must be positive, got {args.importance_groups}")
    try:
        result = convert_checkpoint(args.src, args.dst, init=args.init, dtype=args.dtype, force=args.force,
                                    verify=args.verify, importance_rank=args.rank, progress=not args.no_progress,
                                    importance_groups=args.importance_groups)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(f"converted {args.src} ({result.architecture}, {result.source_format} format) -> {result.dst}: "
          f"{result.num_tensors} tensors, {result.bytes_written / 1e6:.1f} MB, init={args.init}, dtype={args.dtype}")
    if args.verify:
        diffs = (result.max_abs_diff, result.max_abs_diff_reloaded)
        if not all(d is not None and math.isfinite(d) for d in diffs):
            print(f"verify: FAILED, non-finite logit differences {diffs} (NaN or inf in the outputs)")
            return 1
    if args.verify and args.init == "identity" and args.dtype == "float32":
        worst = max(result.max_abs_diff, result.max_abs_diff_reloaded)
        if not worst <= 1e-4 or not result.max_rel_diff <= 1e-5:  # also fails on NaN
            print(f"verify: FAILED, max |logit difference| {worst:.3e} (relative {result.max_rel_diff:.2e}); "
                  "the bounds are 1e-4 and 1e-5 relative")
            return 1
        print(f"verify: OK (identity init: logits equal those of the {result.reference} to <= 1e-4, "
              f"relative {result.max_rel_diff:.1e} <= 1e-5)")
    return 0
