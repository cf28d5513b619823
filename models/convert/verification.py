"""``--verify``: the source run by code nobody here wrote where that runs on this machine, the converted model in
memory and DST reloaded, compared on random tokens, and the verdict (:func:`verify_conversion` says why the
reference of a bfloat16 / float16 DST is the source with its weights rounded alike, and what the bound is).

A check never says OK on non-finite differences.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Tuple

import torch

from .conversion import DTYPES, ConversionResult, dst_layout, dst_tensors, lm_shapes
from .reading import SourceCheckpoint

UNIT_ROUNDOFF = {name: torch.finfo(dt).eps / 2 for name, dt in DTYPES.items()}  # round to nearest: half an ulp at 1


def point_model(ckpt: SourceCheckpoint):
    """The source's weights in a ``MetaplasticForCausalLM`` of ``ckpt.config`` (float32; a key the format does
    not have is a closed gate γ = 0)."""
    from ..modeling import MetaplasticForCausalLM
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
    if ckpt.fla_model is not None and torch.cuda.is_available():
        name = ckpt.fla_model
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
    from ..modeling import MetaplasticForCausalLM
    config = ckpt.target_config(torch.float32, init, rank, groups)
    model = MetaplasticForCausalLM(config)
    state = dict(dst_tensors(ckpt, config, dst_layout(config, torch.float32), init, rank, groups))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=not config.tie_word_embeddings)
    return model.eval()


# What ``--verify`` requires of an identity conversion, in float32 arithmetic: the largest |logit difference|
# at most VERIFY_ABS and at most VERIFY_REL · max |source logit|.
VERIFY_ABS, VERIFY_REL = 1e-4, 1e-5


@torch.no_grad()
def round_weights_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point tensor of ``model``'s state dict to ``dtype`` and back, in place (what
    storing the weights in ``dtype`` and loading them in float32 does)."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def verify_conversion(ckpt: SourceCheckpoint, dst: Path, init: str, rank: int, result: ConversionResult,
                      tokens: int = 16, log=print, groups: Optional[int] = None,
                      dtype: torch.dtype = torch.float32) -> None:
    """Largest |logit difference| on random tokens: source vs converted (float32, in memory), source vs ``dst``
    reloaded, and (``dtype`` other than float32) the source with its weights rounded to ``dtype`` vs ``dst``.

    Why the rounded source is the reference for a bfloat16 / float16 DST: DST holds the source's weights rounded
    to ``dtype`` (round to nearest, unit roundoff u = 2^-8 for bfloat16, 2^-11 for float16) and is reloaded in
    float32, so the source run with its weights rounded the same way differs from it only by float32
    arithmetic, and the float32 bounds (VERIFY_ABS, VERIFY_REL) apply. A bound on |source − DST| alone, of the
    form c · u · depth, cannot be tight: how far rounding moves the logits depends on how the model amplifies
    weight perturbations (on the test suite's small random models, from a few u to over a hundred u,
    relative to the largest logit), so a c large enough for every model would also pass a weight that is wrong
    by a percent. The rounding's own effect, |source − rounded source|, is printed: it is a property of the
    model and the dtype, not of the conversion.
    """
    from transformers import AutoModelForCausalLM
    source, description = load_source_model(ckpt)
    device = next(source.parameters()).device
    vocab = getattr(ckpt.arch, "unpadded_vocab_size", None) or ckpt.config.vocab_size
    ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(0))
    ref = source(ids.to(device)).logits.float().cpu()
    rounded_ref = ref
    if dtype != torch.float32:
        round_weights_(source, dtype)
        rounded_ref = source(ids.to(device)).logits.float().cpu()
    del source
    converted = converted_model(ckpt, init, rank, groups)
    result.max_abs_diff = (converted(ids).logits.float() - ref).abs().max().item()
    del converted
    reloaded = AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32).eval()
    reloaded_logits = reloaded(ids).logits.float()
    result.max_abs_diff_reloaded = (reloaded_logits - ref).abs().max().item()
    result.max_abs_diff_rounded = (reloaded_logits - rounded_ref).abs().max().item()
    result.rounding_effect = (rounded_ref - ref).abs().max().item()
    result.reference = description
    log(f"verify: {tokens} random tokens x 2 sequences, max |logit| of source {ref.abs().max().item():.3g} "
        f"(source run by {description})")
    result.max_rel_diff = relative(max(result.max_abs_diff, result.max_abs_diff_rounded), ref)
    log(f"verify: max |logit difference| source vs converted        = {result.max_abs_diff:.3e}")
    log(f"verify: max |logit difference| source vs reloaded {dst.name} (relative to max |logit|: "
        f"{relative(result.max_abs_diff_reloaded, ref):.2e}) = {result.max_abs_diff_reloaded:.3e}")
    if dtype != torch.float32:
        name = str(dtype).split(".")[-1]
        log(f"verify: max |logit difference| source with its weights rounded to {name} vs reloaded {dst.name} "
            f"(relative: {relative(result.max_abs_diff_rounded, ref):.2e}) = {result.max_abs_diff_rounded:.3e}")


def verify_verdict(result: ConversionResult, init: str) -> Tuple[Optional[bool], str]:
    """``(passed, line)`` for the differences :func:`verify_conversion` measured; ``passed`` is None when there is
    nothing to require (an init that changes the outputs by design)."""
    diffs = (result.max_abs_diff, result.max_abs_diff_reloaded, result.max_abs_diff_rounded)
    if not all(d is not None and math.isfinite(d) for d in diffs):
        return False, f"verify: FAILED, non-finite logit differences {diffs} (NaN or inf in the outputs)"
    if init != "identity":
        return None, (f"verify: no verdict: --init {init} changes the outputs by design (the differences above "
                      "are for information)")
    worst = max(result.max_abs_diff, result.max_abs_diff_rounded)
    rounded = "" if result.dtype == "float32" else f" with its weights rounded to {result.dtype}"
    if not (worst <= VERIFY_ABS and result.max_rel_diff <= VERIFY_REL):  # also fails on NaN
        return False, (f"verify: FAILED, max |logit difference| from the {result.reference}{rounded} "
                       f"{worst:.3e} (relative {result.max_rel_diff:.2e}); the bounds are {VERIFY_ABS:g} and "
                       f"{VERIFY_REL:g} relative")
    line = (f"verify: OK (identity init: logits equal those of the {result.reference}{rounded} to <= {VERIFY_ABS:g}, "
            f"relative {result.max_rel_diff:.1e} <= {VERIFY_REL:g})")
    if result.dtype != "float32":
        u = UNIT_ROUNDOFF[result.dtype]
        line += (f"; rounding to {result.dtype} (unit roundoff {u:.1e}) itself moves them by up to "
                 f"{result.rounding_effect:.2e}")
    return True, line
