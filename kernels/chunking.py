"""Helpers of the chunked paths (torch and Triton): cutting time into chunks, the log-decay floor, decay
matrices. A leaf module: it imports torch only, so every chunked module can use it.

The sequence is cut into chunks of ``C`` tokens; inside a chunk ``G`` is the cumulative log-decay and the
masked decay matrix is ``D[t, s] = exp(G_t − G_s)`` (``s ≤ t``), so every exponent is ≤ 0. A log-decay at or
below :data:`LOG_DECAY_FLOOR` is exactly a reset (``α = 0``): :func:`floor_log_decay` clamps it there, so a
``-inf`` never meets another one (``-inf − -inf`` is NaN) inside a chunk.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor
LOG_DECAY_FLOOR = -800.0  # exp(-800) == 0 in float64 and float32: a log-decay at or below it is a full reset
VECTOR_CHUNK = 8  # chunk cap with vector decay: the [C, C, K] decay tensor costs C·K per token


def floor_log_decay(g: Tensor) -> Tensor:
    """``g`` clamped below at :data:`LOG_DECAY_FLOOR` (same dtype; ``-inf`` becomes the floor, a reset)."""
    return g.clamp(min=LOG_DECAY_FLOOR)


def heads_first(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``[B, T, H, ...] -> [B, H, T, ...]`` in ``dtype``; a ``[B, T, H]`` gate gets a trailing 1."""
    if x is None:
        return None
    x = x.to(dtype)
    if x.dim() == 3:
        x = x[..., None]
    return x.transpose(1, 2)


def pad_chunks(x: Tensor, C: int) -> Tensor:
    """``[B, H, T, ...] -> [B, H, N, C, ...]``, zero-padded at the end of time (``N = ceil(T / C)``)."""
    T = x.shape[2]
    N = math.ceil(T / C)
    if N * C != T:
        pad = x.new_zeros(x.shape[:2] + (N * C - T,) + x.shape[3:])
        x = torch.cat([x, pad], 2)
    return x.reshape(x.shape[:2] + (N, C) + x.shape[3:])


def unchunk(x: Tensor, T: int) -> Tensor:
    """``[B, H, N, C, ...] -> [B, H, T, ...]`` (drops the padding)."""
    return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])[:, :, :T]


def causal_mask(C: int, device: torch.device) -> Tensor:
    """``[C, C]`` boolean, true where ``s ≤ t``."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def cumulated_log_decay(gc: Tensor, dim: int = -2) -> Tensor:
    """The cumulative log-decay inside each chunk along ``dim`` (``gc [..., C, Kg]`` by default), in float64,
    each log-decay floored first (so ``G_t − G_s`` is exact even next to a ``-1e6``, and finite)."""
    return floor_log_decay(gc.to(torch.float64)).cumsum(dim)


def exp_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(x)`` in ``dtype``."""
    return x.exp().to(dtype)


def decay_matrix(G: Tensor, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(G_t - G_s)`` for ``s ≤ t``, else 0 (by ``torch.where``, never by a product). ``G [..., C, Kg]``
    (float64) -> ``[..., C, C]`` (Kg = 1) or ``[..., C, C, K]`` (vector decay), in ``dtype``."""
    if G.shape[-1] == 1:
        diff = G[..., :, None, 0] - G[..., None, :, 0]
        return torch.where(mask, diff, float("-inf")).exp().to(dtype)
    diff = G[..., :, None, :] - G[..., None, :, :]
    return torch.where(mask[..., None], diff, float("-inf")).exp().to(dtype)


def floored_grad(dg: Tensor, g: Tensor) -> Tensor:
    """No gradient reaches a log-decay at or below the floor (it was clamped: ``α`` is exactly 0 there)."""
    return torch.where(g > LOG_DECAY_FLOOR, dg, torch.zeros_like(dg))


def reverse_cumsum(x: Tensor, dim: int) -> Tensor:
    """``Σ_{s ≥ t} x_s`` along ``dim``."""
    return x.flip(dim).cumsum(dim).flip(dim)
