"""Building blocks shared by the mixers: norms, a causal depthwise convolution with a cache, helpers.

Conventions: activations are ``[B, T, C]``; a convolution state holds the last ``W - 1`` inputs of a
depthwise convolution of width ``W`` as ``[B, C, W - 1]`` (the layout of transformers' Mamba2 cache).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


class RMSNorm(nn.Module):
    """``weight · x / rms(x)`` over the last dimension, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GroupedGatedRMSNorm(nn.Module):
    """Mamba2's gated norm, gate then norm: ``weight · norm_g(y ∘ silu(z))``, the RMS taken within each of
    ``n_groups`` contiguous groups of the last dimension."""

    def __init__(self, hidden_size: int, n_groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        if hidden_size % n_groups:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by n_groups={n_groups}")
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.n_groups = n_groups
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        shape = y.shape
        y = y.view(*shape[:-1], self.n_groups, shape[-1] // self.n_groups)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.view(shape).to(dtype)


class NormThenGate(nn.Module):
    """fla's output norm: ``weight · rms_norm(o) ∘ silu(g)`` per head (``o, g [..., D]``); no gate if g is None."""

    def __init__(self, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(self, o: Tensor, g: Optional[Tensor] = None) -> Tensor:
        dtype = o.dtype
        o = o.float()
        o = self.weight * (o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps))
        if g is not None:
            o = o * F.silu(g.float())
        return o.to(dtype)


def causal_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], state: Optional[Tensor] = None,
                activation: bool = True) -> Tuple[Tensor, Tensor]:
    """Depthwise causal convolution ``x [B, T, C]`` with ``weight [C, 1, W]``; optional SiLU.

    ``state [B, C, W-1]`` holds the previous inputs (zeros when None). Returns ``(y [B, T, C],
    new_state [B, C, W-1])`` so that running a sequence in pieces equals running it whole.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    xt = x.transpose(1, 2)
    if state is None:
        state = xt.new_zeros(B, C, W - 1)
    full = torch.cat([state.to(xt.dtype), xt], dim=-1)  # [B, C, W-1+T]
    y = F.conv1d(full.to(weight.dtype), weight, bias, groups=C)  # [B, C, T]
    if activation:
        y = F.silu(y)
    new_state = full[:, :, full.shape[-1] - (W - 1):] if W > 1 else full[:, :, :0]
    return y.transpose(1, 2).to(x.dtype), new_state


def short_convs(module: nn.Module, hidden_states: Tensor, conv_state: dict,
                names: Tuple[str, ...] = ("q", "k", "v"),
                mask: Optional[Tensor] = None) -> Tuple[Tuple[Tensor, ...], dict]:
    """``causal_conv(<name>_proj(h))`` through ``<name>_conv1d`` for each name (fla's short convolutions).

    ``mask [B, T, 1]`` (0 at padded tokens) zeroes the convolution's input there. Returns the activations in
    the order of ``names`` and the new convolution states ``{name: state}``.
    """
    outputs, states = [], {}
    for name in names:
        conv = getattr(module, f"{name}_conv1d")
        x = getattr(module, f"{name}_proj")(hidden_states)
        if mask is not None:
            x = x * mask
        x, states[name] = causal_conv(x, conv.weight, conv.bias, conv_state.get(name))
        outputs.append(x)
    return tuple(outputs), states


def padding_mask(attention_mask: Optional[Tensor], hidden_states: Tensor) -> Optional[Tensor]:
    """``attention_mask [B, T]`` (1 = token, 0 = padding) as ``[B, T, 1]`` in ``hidden_states``' dtype; None when
    there is no mask or it has no zeros. Mixers multiply their convolution inputs and write gates by it, so
    that a padded token leaves every state unchanged (α = 1, β = 0, b = 0, zero convolution input)."""
    if attention_mask is None:
        return None
    B, T, _ = hidden_states.shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}] (or longer, covering earlier tokens), "
                         f"got {list(attention_mask.shape)}")
    attention_mask = attention_mask[:, attention_mask.shape[1] - T:]
    if bool(attention_mask.all()):
        return None
    return attention_mask.to(device=hidden_states.device, dtype=hidden_states.dtype)[:, :, None]


def conv_layer(channels: int, kernel: int, bias: bool) -> nn.Conv1d:
    """A depthwise ``nn.Conv1d`` whose weight is ``[C, 1, W]`` (the layout of Mamba2 and fla checkpoints)."""
    return nn.Conv1d(channels, channels, kernel_size=kernel, groups=channels, padding=kernel - 1, bias=bias)


L2_NORMS = ("rsqrt", "normalize")


def l2_normalize(x: Tensor, eps: float = 1e-6, form: str = "rsqrt") -> Tensor:
    """``x / ||x||`` over the last dimension. ``form="rsqrt"``: fla's ``x · rsqrt(Σx² + eps)`` (eps 1e-6,
    computed in float32); ``form="normalize"``: ``F.normalize``, ``x / max(||x||, 1e-12)`` in x's dtype (the
    paper authors' layer)."""
    if form == "normalize":
        return F.normalize(x, p=2.0, dim=-1, eps=1e-12)
    if form != "rsqrt":
        raise ValueError(f"l2 norm form must be one of {L2_NORMS}, got {form!r}")
    return x * torch.rsqrt(x.float().pow(2).sum(-1, keepdim=True) + eps).to(x.dtype)


def inverse_softplus(x: Tensor) -> Tensor:
    """``softplus⁻¹(x)`` for ``x > 0``."""
    return x + torch.log(-torch.expm1(-x))


def init_A_log(num_heads: int, A_range=(1.0, 16.0)) -> Tensor:
    """``A_log = log A`` with ``A ~ U(lo, hi)`` per head (``(1, 16)``: mamba_ssm and fla; ``(0, 16)``: the paper
    authors')."""
    lo, hi = (float(a) for a in A_range)
    if not 0 <= lo < hi:
        raise ValueError(f"A_init_range must be (lo, hi) with 0 <= lo < hi, got {tuple(A_range)}")
    return torch.log(torch.empty(num_heads).uniform_(lo, hi))


def init_dt_bias(num_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> Tensor:
    """A ``dt_bias`` so that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]`` (Mamba's init)."""
    if torch.empty(0).is_meta:  # built on the meta device (shapes only): no values to draw
        return torch.empty(num_heads)
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp(min=floor))


def layer_cache(cache, layer_idx: Optional[int]) -> Optional[dict]:
    """The entry of ``cache`` for ``layer_idx`` (a dict, empty before the first token), or None without a cache."""
    if cache is None:
        return None
    if layer_idx is None:
        raise ValueError("a mixer called with a cache needs its layer_idx")
    return cache.layer(layer_idx)
