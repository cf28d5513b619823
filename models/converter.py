"""Mamba2 checkpoint → ``MetaplasticForCausalLM`` with ``MetaMamba2`` mixers (THEORY.md §5).

Every Mamba2 weight is copied; each layer gets the importance path of :func:`to_metaplastic`. With
``init="identity"`` (γ = 0) the converted model's logits equal the source's; ``init="paper"`` initialises
the plasticity path as the paper's surgery does (γ = 1, fresh W_b1/W_b2, b_scale = 1): not output-preserving.

Tensors move one at a time (memory-mapped source, streaming safetensors writer), and the result is
written to a temporary directory beside ``dst`` that is renamed at the end, so a failure leaves no ``dst``.
"""
from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, Mamba2Arch, Mamba2Checkpoint, expected_shapes, iter_layer_tensors, open_mamba2
from .configuration import MetaplasticConfig
from .importance import INITS
from .mamba2 import Mamba2
from .safetensors_stream import StreamingSafetensorsWriter, nbytes
from .twins import to_metaplastic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "vocab.txt")
SEED = 0  # the importance path's initialisation is deterministic: generator seeded SEED + layer index


class ConversionError(ValueError):
    """Bad input to the converter (one-line message)."""


@dataclass
class ConversionResult:
    dst: Path
    source_format: str
    num_tensors: int
    bytes_written: int
    max_abs_diff: Optional[float] = None  # source vs in-memory converted model (verify)
    max_abs_diff_reloaded: Optional[float] = None  # source vs the model reloaded from dst (verify)


def metaplastic_config(arch: Mamba2Arch, dtype: torch.dtype = torch.float32,
                       importance_rank: Optional[int] = None) -> MetaplasticConfig:
    """The ``MetaplasticConfig`` of the MetaMamba2 twin of ``arch``."""
    kwargs = arch.mixer_kwargs()
    kwargs["importance_rank"] = importance_rank if importance_rank is not None else min(64, arch.hidden_size)
    config = MetaplasticConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                               num_hidden_layers=arch.num_hidden_layers, mixer="meta_mamba2", mixer_kwargs=kwargs,
                               intermediate_size=0, layer_norm_epsilon=arch.layer_norm_epsilon,
                               residual_in_fp32=arch.residual_in_fp32, tie_word_embeddings=arch.tie_word_embeddings,
                               pad_token_id=arch.pad_token_id, bos_token_id=arch.bos_token_id,
                               eos_token_id=arch.eos_token_id)
    config.dtype = dtype
    return config


def convert_layer(arch: Mamba2Arch, tensors: Dict[str, torch.Tensor], layer: int, init: str,
                  importance_rank: Optional[int]) -> Dict[str, torch.Tensor]:
    """One layer's Mamba2 mixer tensors -> its MetaMamba2 twin's state dict (via :func:`to_metaplastic`)."""
    with torch.device("meta"):
        mixer = Mamba2(arch.hidden_size, **arch.mixer_kwargs())
    mixer.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True, assign=True)
    generator = torch.Generator().manual_seed(SEED + layer)
    twin = to_metaplastic(mixer, init=init, rank=importance_rank, generator=generator, copy=False)
    return twin.state_dict()


def _dst_layout(arch: Mamba2Arch, config: MetaplasticConfig, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """``(key, shape, dtype)`` of every tensor of the converted model, in writing order."""
    from .mamba2 import MetaMamba2
    with torch.device("meta"):
        twin = MetaMamba2(arch.hidden_size, **config.mixer_kwargs)
    layer_keys = [(name, tuple(t.shape)) for name, t in twin.state_dict().items()]
    layout = [("backbone.embeddings.weight", (arch.vocab_size, arch.hidden_size), dtype)]
    for i in range(arch.num_hidden_layers):
        layout.append((f"backbone.layers.{i}.norm.weight", (arch.hidden_size,), dtype))
        layout += [(f"backbone.layers.{i}.mixer.{name}", shape, dtype) for name, shape in layer_keys]
    layout.append(("backbone.norm_f.weight", (arch.hidden_size,), dtype))
    if not arch.tie_word_embeddings:
        layout.append(("lm_head.weight", (arch.vocab_size, arch.hidden_size), dtype))
    return layout


def _dst_tensors(ckpt: Mamba2Checkpoint, init: str, rank: Optional[int]) -> Iterator[Tuple[str, torch.Tensor]]:
    """The converted model's tensors in writing order, one layer in memory at a time."""
    arch = ckpt.arch
    yield "backbone.embeddings.weight", ckpt.tensor("backbone.embeddings.weight")
    for i in range(arch.num_hidden_layers):
        yield f"backbone.layers.{i}.norm.weight", ckpt.tensor(f"backbone.layers.{i}.norm.weight")
        twin = convert_layer(arch, dict(iter_layer_tensors(ckpt, i)), i, init, rank)
        for name, tensor in twin.items():
            yield f"backbone.layers.{i}.mixer.{name}", tensor
    yield "backbone.norm_f.weight", ckpt.tensor("backbone.norm_f.weight")
    if not arch.tie_word_embeddings:
        yield "lm_head.weight", ckpt.tensor("lm_head.weight")


def _check_tied_head(ckpt: Mamba2Checkpoint) -> None:
    if "lm_head.weight" in ckpt.extra_keys:
        if not torch.equal(ckpt.tensor("lm_head.weight"), ckpt.tensor("backbone.embeddings.weight")):
            raise CheckpointError("the config ties the embeddings but lm_head.weight differs from the embedding")


def convert_mamba2(src, dst, *, init: str = "identity", dtype: str = "float32", force: bool = False,
                   verify: bool = False, importance_rank: Optional[int] = None, progress: bool = True,
                   verify_tokens: int = 16, log=print) -> ConversionResult:
    """Convert the Mamba2 checkpoint directory ``src`` into a metaplastic model directory ``dst``.

    Raises :class:`ConversionError` / :class:`CheckpointError` (both ``ValueError``) for bad input; ``dst``
    then does not exist (or, with ``force``, still holds what it held before).
    """
    if init not in INITS:
        raise ConversionError(f"--init must be one of {INITS}, got {init!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (use --force to replace it)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} exists and is not a directory")
    if dst.resolve() == src.resolve():
        raise ConversionError("DST must differ from SRC")
    ckpt = open_mamba2(src)
    _check_tied_head(ckpt)
    config = metaplastic_config(ckpt.arch, torch_dtype, importance_rank)
    rank = config.mixer_kwargs["importance_rank"]
    layout = _dst_layout(ckpt.arch, config, torch_dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work is copying: one thread avoids OpenMP start-up on every small op
    try:
        total = sum(nbytes(shape, dt) for _, shape, dt in layout)
        with StreamingSafetensorsWriter(tmp / "model.safetensors", layout) as writer, \
                tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
            for name, tensor in _dst_tensors(ckpt, init, rank):
                writer.write(name, tensor)
                bar.update(tensor.numel() * torch.empty((), dtype=torch_dtype).element_size())
        config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    result = ConversionResult(dst, ckpt.format, len(layout), total)
    if verify:
        verify_conversion(ckpt, dst, init, rank, result, tokens=verify_tokens, log=log)
    return result


def _replace(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` (``--force``) is moved aside first, then removed."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- verification ----------------------------------------------------------------------------------

def load_source_model(ckpt: Mamba2Checkpoint):
    """The source as a transformers ``Mamba2ForCausalLM`` (float32): ``from_pretrained`` for the HF format, the
    renamed state dict for mamba_ssm's."""
    from transformers import Mamba2Config, Mamba2ForCausalLM
    if ckpt.format == "hf":
        return Mamba2ForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    a = ckpt.arch
    cfg = Mamba2Config(vocab_size=a.vocab_size, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers,
                       num_heads=a.num_heads, head_dim=a.head_dim, state_size=a.state_size, expand=a.expand,
                       n_groups=a.n_groups, conv_kernel=a.conv_kernel, use_bias=a.use_bias,
                       use_conv_bias=a.use_conv_bias, time_step_limit=tuple(a.time_step_limit),
                       layer_norm_epsilon=a.layer_norm_epsilon, residual_in_fp32=a.residual_in_fp32,
                       tie_word_embeddings=a.tie_word_embeddings, pad_token_id=None, bos_token_id=None,
                       eos_token_id=None)
    model = Mamba2ForCausalLM(cfg)
    state = {key: ckpt.tensor(key).float() for key in expected_shapes(a)}
    model.load_state_dict(state, strict=not a.tie_word_embeddings)
    if a.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def metaplastic_from_source(source_model, arch: Mamba2Arch, init: str, rank: int):
    """The converted model built in memory from a transformers Mamba2 (the same :func:`convert_layer`)."""
    from .modeling import MetaplasticForCausalLM
    config = metaplastic_config(arch, torch.float32, rank)
    model = MetaplasticForCausalLM(config)
    state = {}
    src_state = source_model.state_dict()
    for key, value in src_state.items():
        if ".mixer." not in key:
            state[key.replace("backbone.embedding.", "backbone.embeddings.")] = value
    for i in range(arch.num_hidden_layers):
        prefix = f"backbone.layers.{i}.mixer."
        layer = {k[len(prefix):]: v for k, v in src_state.items() if k.startswith(prefix)}
        for name, tensor in convert_layer(arch, layer, i, init, rank).items():
            state[prefix + name] = tensor
    model.load_state_dict(state, strict=not arch.tie_word_embeddings)
    return model.eval()


@torch.no_grad()
def verify_conversion(ckpt: Mamba2Checkpoint, dst: Path, init: str, rank: int, result: ConversionResult,
                      tokens: int = 16, log=print) -> None:
    """Largest |logit difference| on random tokens: source vs converted, and source vs ``dst`` reloaded."""
    from transformers import AutoModelForCausalLM
    source = load_source_model(ckpt)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ckpt.arch.unpadded_vocab_size or ckpt.arch.vocab_size, (2, tokens), generator=gen)
    ref = source(ids).logits.float()
    converted = metaplastic_from_source(source, ckpt.arch, init, rank)
    result.max_abs_diff = (converted(ids).logits.float() - ref).abs().max().item()
    del converted
    reloaded = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    result.max_abs_diff_reloaded = (reloaded(ids).logits.float() - ref).abs().max().item()
    log(f"verify: {tokens} random tokens x 2 sequences, max |logit| of source {ref.abs().max().item():.3g}")
    log(f"verify: max |logit difference| source vs converted        = {result.max_abs_diff:.3e}")
    log(f"verify: max |logit difference| source vs reloaded {dst.name} = {result.max_abs_diff_reloaded:.3e}")
