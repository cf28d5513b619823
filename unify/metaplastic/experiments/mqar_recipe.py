"""The training recipes of the MQAR harness: ``default`` and ``authors`` (the Palimpsa authors' MQAR runs).

``default``: embedding, pre-RMSNorm mixer-only blocks, final RMSNorm, an untied linear head, PyTorch's (and
each mixer's) initialisation, float32; AdamW (0.9, 0.98), weight decay on matrices only, linear warm-up then
cosine decay stepped per step, gradient clipping at 1, a fixed number of epochs.

``authors`` (their Zoology fork, ``zoology/mqar_figure/configs.py`` and the files it uses):

- skeleton: pre-RMSNorm mixer-only blocks (no MLP), a final **LayerNorm**, the head **tied** to the embedding;
- init: every ``Linear``, ``Conv1d`` and ``Embedding`` weight N(0, std = d_model^-1/2), every bias 0; then the
  importance path's ``W_b2`` U(±rank^-1/2), ``b_scale`` (raw) 1; the decay from ``decay_init`` (their
  'small': :func:`small_decay_`);
- **bfloat16** parameters (hence bfloat16 AdamW state);
- AdamW (0.9, 0.999), weight decay on **every** parameter, **no** clipping, **no** warm-up, cosine decay to 0
  stepped **per epoch** (T_max = the number of epochs);
- early stopping on *validation* accuracy (``early_stop``; theirs: on test accuracy > 0.99).

:data:`AUTHORS_FIELDS` are the data and schedule fields ``--set recipe=authors`` sets with it (unless the
same command sets them too): zero filler, the dense layout, 'small' decay, early stopping above 0.99, no
warm-up.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

RECIPES = ("default", "authors")
AUTHORS_FIELDS: Dict[str, Any] = dict(filler="zero", layout="dense", decay_init="small", early_stop=0.99, warmup=0.0)


@torch.no_grad()
def authors_init_(model: nn.Module, d_model: int) -> None:
    """Every ``Linear``/``Conv1d`` weight and ``Embedding`` N(0, std = d_model^-1/2), biases 0; then every
    importance path's ``W_b2`` U(±rank^-1/2) (bias 0) and ``b_scale`` 1, as the authors' layers reset them."""
    from metaplastic.models.importance import ImportancePath
    std = d_model ** -0.5
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    for module in model.modules():
        if isinstance(module, ImportancePath):
            bound = module.W_b1.out_features ** -0.5
            module.W_b2.weight.uniform_(-bound, bound)
            if module.W_b2.bias is not None:
                module.W_b2.bias.zero_()
            module.b_scale.fill_(1.0)


def small_decay(num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' 'small' decay, per head (float64 ``[H]`` each): ``A = linspace(0.01, 0.16, H)`` and ``dt``
    log-spaced from 0.1 to 0.001 over the heads; at zero pre-activation ``α_h = exp(−dt_h A_h)``."""
    A = torch.linspace(0.01, 0.16, num_heads, dtype=torch.float64)
    dt = torch.logspace(math.log10(0.1), math.log10(0.001), num_heads, dtype=torch.float64)
    return A, dt


@torch.no_grad()
def small_decay_(mixer: nn.Module) -> bool:
    """Set the mixer's decay to the authors' 'small' initialisation: ``A_log = log A`` and ``dt_bias =
    softplus⁻¹(dt)`` where ``α = exp(−softplus(x + dt_bias)·exp(A_log))``; the ``a_proj`` bias ``logit α``
    where ``α = σ(a_proj h)``. Returns False when the mixer has no decay parameter it knows (left as is)."""
    from metaplastic.models.common import inverse_softplus
    dt_bias, A_log = getattr(mixer, "dt_bias", None), getattr(mixer, "A_log", None)
    a_proj = getattr(mixer, "a_proj", None)
    if dt_bias is not None and A_log is not None:
        A, dt = small_decay(dt_bias.numel())
        A_log.copy_(A.log().to(A_log.dtype))
        dt_bias.copy_(inverse_softplus(dt).to(dt_bias.dtype))
        return True
    if dt_bias is None and isinstance(a_proj, nn.Linear) and a_proj.bias is not None:
        A, dt = small_decay(a_proj.bias.numel())
        alpha = torch.exp(-dt * A)
        a_proj.bias.copy_(torch.log(alpha / (1 - alpha)).to(a_proj.bias.dtype))
        return True
    return False


def optimizer(params: List[nn.Parameter], recipe: str, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW of the recipe: ``default`` (0.9, 0.98), decay on matrices only; ``authors`` (0.9, 0.999), decay
    on every parameter."""
    if recipe == "authors":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def lr_factor(recipe: str, step: int, total: int, warmup: int, steps_per_epoch: int) -> float:
    """The learning-rate multiplier at ``step``: ``default`` linear warm-up over ``warmup`` steps then cosine
    to 0 at ``total``; ``authors`` cosine over epochs, constant within one: ``½(1 + cos(π e / E))`` for epoch
    ``e`` of ``E = total / steps_per_epoch``."""
    if recipe == "authors":
        epochs = max(1, math.ceil(total / steps_per_epoch))
        return 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch) / epochs))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
