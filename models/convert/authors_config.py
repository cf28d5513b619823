"""The paper authors' model types (``palimpsa``, ``meta_mamba2``) as the fields of a ``MetaplasticConfig``.

:func:`authors_config` takes the fields of their ``PalimpsaConfig`` / ``MetaMamba2Config`` (docs/authors.md#their-configs,
with their defaults) and returns the keyword arguments of the
:class:`~metaplastic.models.configuration.MetaplasticConfig` whose model computes exactly what theirs computes
(``MetaplasticConfig.authors_preset`` builds it), with every mixer option set to their choice:

- ``palimpsa``: ``palimpsa`` mixers with ``l2_norm="normalize"``, ``bs_bias=False``, ``A_init_range=(0, 16)``,
  ``importance_rank = beta_step_rank`` (``"auto"``: ceil(hidden/16)), ``importance_bias=False``, no gate γ,
  ``importance_init="paper"`` (``"paper-finetuning"`` when ``finetuning``); a SwiGLU MLP per block
  (``intermediate_size``, else 256·ceil(⌊d·hidden_ratio·2/3⌋/256)); every norm with ``norm_eps``.
- ``meta_mamba2``: ``meta_mamba2`` mixers with ``norm_per_group=False`` (one gated RMSNorm over d_inner),
  ``A_init_range=(0, 16)`` and the same importance options; no MLP.

``metaplasticity=False`` (their plain models: b ≡ 0, Ip = 1) gives ``mamba2`` mixers for ``meta_mamba2`` and
``palimpsa`` mixers whose gate γ starts closed (γ = 0, so b ≡ 0) for ``palimpsa``.

Options of theirs that change the function and that these mixers do not implement raise ``ValueError``
naming the field; fields that only steer their kernels, their loss fusion or logging are ignored.
"""
from __future__ import annotations

import math
from typing import Any, Dict

MODEL_TYPES = ("palimpsa", "meta_mamba2")

# their config defaults (docs/authors.md#their-configs)
PALIMPSA_DEFAULTS: Dict[str, Any] = dict(
    hidden_size=2048, head_dim=256, num_heads=6, num_v_heads=None, expand_k=1, expand_v=2.0, beta_step_rank="auto",
    use_gate=True, use_short_conv=True, conv_size=4, norm_eps=1e-6, metaplasticity=True, use_residual=True,
    hidden_ratio=4, intermediate_size=None, hidden_act="swish", attn=None, num_hidden_layers=21, vocab_size=32000,
    pad_token_id=None, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False, use_l2warp=False,
    finetuning=False, initializer_range=0.02)
META_MAMBA2_DEFAULTS: Dict[str, Any] = dict(
    head_dim=64, hidden_size=2048, state_size=128, expand=2, n_groups=1, conv_kernel=4, use_bias=False,
    use_conv_bias=True, hidden_act="silu", norm_eps=1e-5, metaplasticity=True, beta_step_rank="auto",
    time_step_limit=(0.0, math.inf), num_hidden_layers=48, vocab_size=32000, pad_token_id=0, bos_token_id=None,
    eos_token_id=None, tie_word_embeddings=False, use_l2warp=False, finetuning=False, initializer_range=0.02,
    num_heads=None)

# field -> (is it refused?, why); checked on the merged fields
REFUSED = {
    "palimpsa": (
        ("attn", lambda c: c["attn"] is not None, "hybrid attention layers are not supported"),
        ("hidden_act", lambda c: c["hidden_act"] not in ("swish", "silu"), "only a SwiGLU MLP is supported"),
        ("use_l2warp", lambda c: bool(c["use_l2warp"]), "a training-loss option the fine-tuning does not reproduce"),
    ),
    "meta_mamba2": (
        ("hidden_act", lambda c: c["hidden_act"] not in ("silu", "swish"), "only a SiLU convolution is supported"),
        ("use_l2warp", lambda c: bool(c["use_l2warp"]), "a training-loss option the fine-tuning does not reproduce"),
    ),
}


def _int(c: Dict[str, Any], key: str) -> int:
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"{key}={value!r} is not a positive integer")
    return int(value)


def _rank(c: Dict[str, Any]) -> int:
    """``beta_step_rank``: an int, or ``"auto"`` = ceil(hidden_size / 16)."""
    rank = c["beta_step_rank"]
    return -(-_int(c, "hidden_size") // 16) if rank in ("auto", None) else _int(c, "beta_step_rank")


def refusals(model_type: str, fields: Dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first field of ``fields`` that these mixers cannot reproduce."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of the authors' types {MODEL_TYPES}")
    c = {**(PALIMPSA_DEFAULTS if model_type == "palimpsa" else META_MAMBA2_DEFAULTS), **fields}
    for key, bad, why in REFUSED[model_type]:
        if bad(c):
            raise ValueError(f"{key}={c[key]!r}: {why}")


def palimpsa_intermediate_size(hidden: int, hidden_ratio: Any, intermediate_size: Any) -> int:
    """fla's GatedMLP width: ``intermediate_size``, else 256·ceil(⌊hidden·ratio·2/3⌋/256)."""
    if intermediate_size is not None:
        return int(intermediate_size)
    ratio = 4 if hidden_ratio is None else hidden_ratio
    width = int(hidden * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


def authors_config(model_type: str, **fields: Any) -> Dict[str, Any]:
    """The ``MetaplasticConfig`` keyword arguments of the authors' ``model_type`` with their config ``fields``
    (their names and defaults). Raises ``ValueError`` for an option these mixers cannot reproduce."""
    refusals(model_type, fields)
    if model_type == "palimpsa":
        return _palimpsa(PALIMPSA_DEFAULTS | fields)
    return _meta_mamba2(META_MAMBA2_DEFAULTS | fields)


def _importance(c: Dict[str, Any]) -> Dict[str, Any]:
    meta = bool(c["metaplasticity"])
    return dict(importance_rank=_rank(c), importance_bias=False, importance_gate=not meta,
                importance_init=("paper-finetuning" if c["finetuning"] else "paper") if meta else "identity")


def _lm(c: Dict[str, Any], **kwargs: Any) -> Dict[str, Any]:
    return dict(vocab_size=_int(c, "vocab_size"), hidden_size=_int(c, "hidden_size"),
                num_hidden_layers=_int(c, "num_hidden_layers"), layer_norm_epsilon=float(c["norm_eps"]),
                tie_word_embeddings=bool(c["tie_word_embeddings"]), initializer_range=float(c["initializer_range"]),
                pad_token_id=c["pad_token_id"], bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
                **kwargs)


def _palimpsa(c: Dict[str, Any]) -> Dict[str, Any]:
    hidden = _int(c, "hidden_size")
    mixer = dict(num_heads=_int(c, "num_heads"), head_dim=_int(c, "head_dim"), expand_k=float(c["expand_k"]),
                 expand_v=float(c["expand_v"]),
                 num_v_heads=None if c["num_v_heads"] is None else _int(c, "num_v_heads"),
                 conv_size=_int(c, "conv_size"), conv_bias=False, use_gate=bool(c["use_gate"]),
                 use_short_conv=bool(c["use_short_conv"]), use_residual=bool(c["use_residual"]),
                 norm_eps=float(c["norm_eps"]), l2_norm="normalize", bs_bias=False, A_init_range=[0.0, 16.0],
                 **_importance(c))
    if mixer["num_v_heads"] in (None, mixer["num_heads"]):
        mixer.pop("num_v_heads")
    return _lm(c, mixer="palimpsa", mixer_kwargs=mixer, residual_in_fp32=False,
               intermediate_size=palimpsa_intermediate_size(hidden, c["hidden_ratio"], c["intermediate_size"]))


def _meta_mamba2(c: Dict[str, Any]) -> Dict[str, Any]:
    hidden, expand, head_dim = _int(c, "hidden_size"), _int(c, "expand"), _int(c, "head_dim")
    num_heads = _int(c, "num_heads") if c["num_heads"] is not None else int(expand * hidden / head_dim)
    try:
        low, high = (float(t) for t in c["time_step_limit"])
    except (TypeError, ValueError):
        raise ValueError(f"time_step_limit={c['time_step_limit']!r} is not a pair of numbers") from None
    mixer = dict(num_heads=num_heads, head_dim=head_dim, state_size=_int(c, "state_size"), expand=expand,
                 n_groups=_int(c, "n_groups"), conv_kernel=_int(c, "conv_kernel"), use_bias=bool(c["use_bias"]),
                 use_conv_bias=bool(c["use_conv_bias"]), time_step_limit=[low, high],
                 layer_norm_epsilon=float(c["norm_eps"]), norm_per_group=False, A_init_range=[0.0, 16.0])
    if c["metaplasticity"]:
        name = "meta_mamba2"
        mixer.update(_importance(c))
    else:
        name = "mamba2"
    # their "residual_in_fp32" casts the residual sum to the norm weight's dtype: the model's own dtype
    return _lm(c, mixer=name, mixer_kwargs=mixer, residual_in_fp32=False, intermediate_size=0)
