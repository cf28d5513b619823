"""The chunked Triton path, forward and Triton backward, against autograd through the reference scan.

``dot`` / point (Mamba2 / simple GLA / linear attention) and Palimpsa with a head-shared or grouped
importance rate (docs/theory.md#limit-7-head-shared-importance and docs/theory.md#limit-8-grouped-importance; the reference gets the grouped b expanded to one rate per value
row). Float64 through the Triton interpreter on CPU (tests/conftest.py sets it), float32 on a GPU.
"""
import math

import pytest
import torch

import metaplastic
from helpers import assert_close, check_against_reference, scan_inputs
from metaplastic.kernels.dispatch import scan as dispatch_scan

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float32 if ON_GPU else torch.float64  # the interpreter runs float64 tl.dot exactly
TOL = 1e-5 if ON_GPU else 1e-10


# unit-norm keys, decays in (0.5, 1), β in (0.5, 1.5) per head, b head-shared (or grouped: groups=G), the
# prior precision 1; init="shared": an initial state whose precision I is constant within each group of rows
INPUTS = dict(beta_min=0.5, beta_per_value=False, b_per_value=False, prior_precision=False)


def _check(name, x, groups=None, cu_seqlens=None, chunk_size=16, **kw):
    """Outputs, final states, variance and every gradient of ``backend='triton_chunk'`` against autograd
    through :func:`metaplastic.scan` (grouped b expanded per value row for the reference)."""
    def expand_b(ref_x):
        return dict(ref_x, b=ref_x["b"].repeat_interleave(x["v"].shape[-1] // groups, -1))

    def run(obj, **inputs):
        return dispatch_scan(obj, **inputs, backend="triton_chunk", chunk_size=chunk_size)
    check_against_reference(metaplastic.registry[name].objective, x, run, rtol=TOL, dtype=DTYPE, device=DEVICE,
                            cu_seqlens=cu_seqlens, reference_inputs=None if groups is None else expand_b,
                            grad_initial_precision=False, **kw)


@pytest.mark.parametrize("name,shape,init", [
    ("mamba2", (2, 21, 2, 5, 3), False),        # T not a multiple of the chunk
    ("linear_attention", (1, 17, 1, 4, 4), True),  # no forgetting, an initial state
    ("palimpsa", (1, 18, 2, 5, 3), True),       # head-shared b (limit 7), initial state, variance
])
def test_triton_chunk_backward_matches_reference(name, shape, init):
    obj, x = scan_inputs(name, *shape, init="shared" if init else None, seed=sum(shape), **INPUTS)
    _check(name, x, scale=0.7)


@pytest.mark.parametrize("groups,V,init", [(2, 4, False), (3, 6, True)])
def test_triton_chunk_grouped_importance(groups, V, init):
    """Palimpsa with b [B,T,H,G] (limit 8): G reads of one numerator with queries q ⊘ J⁽ᵍ⁾."""
    obj, x = scan_inputs("palimpsa", 1, 19, 2, 4, V, groups=groups, init="shared" if init else None, seed=groups,
                         **INPUTS)
    _check("palimpsa", x, groups=groups, scale=0.6)


def test_triton_chunk_backward_varlen():
    cu = torch.tensor([0, 3, 3, 20])  # an empty sequence; one spans two chunks
    obj, x = scan_inputs("palimpsa", 1, 20, 1, 4, 4, groups=2, init="shared", N=3, seed=4, **INPUTS)
    _check("palimpsa", x, groups=2, cu_seqlens=cu, scale=0.5)


@pytest.mark.slow
def test_triton_chunk_backward_tiles():
    """Several key and value tiles (K = 40, V = 35 in tiles of 16) and T not a multiple of the chunk."""
    from metaplastic.kernels.chunk_triton import chunk_dot_triton_backward, chunk_dot_triton_forward
    from metaplastic.kernels.chunk import ChunkDot
    gen = torch.Generator().manual_seed(3)
    B, H, T, K, V = 1, 1, 37, 40, 35
    d = dict(dtype=torch.float64, generator=gen)
    q, k, v = torch.randn(B, H, T, K, **d), torch.randn(B, H, T, K, **d), torch.randn(B, H, T, V, **d)
    g = torch.log(0.6 + 0.4 * torch.rand(B, H, T, 1, **d))
    S0, do, dS = torch.randn(B, H, V, K, **d), torch.randn(B, H, T, V, **d), torch.randn(B, H, V, K, **d)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, S0)]
    o, S_T = ChunkDot.apply(*leaves, 0.3, 16)
    expected = torch.autograd.grad((o * do).sum() + (S_T * dS).sum(), leaves)
    dev = [t.to(DEVICE, DTYPE) for t in (q, k, v, g, S0, do, dS)]
    _, states = chunk_dot_triton_forward(*dev[:5], 0.3, 16, block_k=16, block_v=16)
    got = chunk_dot_triton_backward(*dev[:4], states, dev[5], dev[6], 0.3, 16, block_k=16, block_v=16)
    for a, b in zip(expected, got):
        assert_close(b.cpu(), a, rtol=TOL)


@pytest.mark.parametrize("later_log_decay", [-math.inf, -1e4])
def test_triton_chunk_masks_later_tokens(later_log_decay):
    """A later token of the same chunk with a log-decay of -inf (full forgetting) or -1e4 and a key of 1e30
    leaves the earlier outputs unchanged; with the finite log-decay the gradients that reach the earlier
    tokens stay finite too (with -inf, ``G_t − G_s`` of two later tokens is ``−∞ + ∞``: the cumulated
    log-decay's own gradient is undefined there, as in any cumulative-decay formulation)."""
    obj, x = scan_inputs("mamba2", 1, 12, 1, 4, 4, seed=2, **INPUTS)
    xs = {key: val.to(DEVICE, DTYPE) for key, val in x.items()}
    base = dispatch_scan(obj, **xs, backend="triton_chunk", chunk_size=16).output
    bad = {key: val.clone() for key, val in xs.items()}
    bad["log_decay"][:, 10] = later_log_decay
    bad["k"][:, 11] = 1e30
    leaves = {key: val.clone().requires_grad_() for key, val in bad.items()}
    out = dispatch_scan(obj, **leaves, backend="triton_chunk", chunk_size=16).output
    assert torch.isfinite(out[:, :10]).all()
    assert_close(out[:, :10], base[:, :10], rtol=TOL)
    if math.isfinite(later_log_decay):
        out[:, :10].sum().backward()
        for key, leaf in leaves.items():
            assert torch.isfinite(leaf.grad[:, :10]).all(), key
