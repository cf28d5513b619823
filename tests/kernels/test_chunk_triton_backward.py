"""The chunked Triton path, forward and Triton backward, against autograd through the reference scan.

``dot`` / point (Mamba2 / simple GLA / linear attention) and Palimpsa with a head-shared or grouped
importance rate (THEORY.md limits 7 and 8; the reference gets the grouped b expanded to one rate per value
row). Float64 through the Triton interpreter on CPU (tests/conftest.py sets it), float32 on a GPU.
"""
import math

import pytest
import torch

import metaplastic
from helpers import assert_close
from metaplastic.kernels.dispatch import scan as dispatch_scan

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float32 if ON_GPU else torch.float64  # the interpreter runs float64 tl.dot exactly
TOL = 1e-5 if ON_GPU else 1e-10


def _inputs(name, B, T, H, K, V, groups=None, init=False, N=None, seed=0):
    """Random valid float64 inputs (unit-norm keys, decays in [0.5, 1)); ``groups``: b [B,T,H,G]."""
    gen = torch.Generator().manual_seed(seed)
    obj = metaplastic.registry[name].objective
    d = dict(dtype=torch.float64, generator=gen)
    x = {"q": torch.randn(B, T, H, K, **d), "k": torch.nn.functional.normalize(torch.randn(B, T, H, K, **d), dim=-1),
         "v": torch.randn(B, T, H, V, **d)}
    if obj.forgetting != "none":
        x["log_decay"] = torch.log(0.5 + 0.5 * torch.rand(B, T, H, **d))
    x["beta"] = 0.5 + torch.rand(B, T, H, **d)
    if obj.posterior == "diagonal":
        x["b"] = torch.rand(B, T, H, **d) if groups is None else torch.rand(B, T, H, groups, **d)
    if init:
        n = B if N is None else N
        if obj.posterior == "point":
            x["initial_state"] = {"S": torch.randn(n, H, V, K, **d)}
        else:
            G = 1 if groups is None else groups
            I0 = (1 + torch.rand(n, H, G, 1, K, **d)).expand(n, H, G, V // G, K).reshape(n, H, V, K)
            x["initial_state"] = {"mu": torch.randn(n, H, V, K, **d), "I": I0.clone()}
    return obj, x


def _leaves(x):
    """Fresh leaf copies (with grad) of every tensor in ``x`` except the initial precision."""
    out = {}
    for key, val in x.items():
        if key == "initial_state":
            out[key] = {s: (t.detach().clone().requires_grad_(s != "I") if s != "I" else t.clone())
                        for s, t in val.items()}
        else:
            out[key] = val.detach().clone().requires_grad_()
    return out


def _flat(x):
    leaves = []
    for key, val in x.items():
        leaves += [t for t in val.values() if t.requires_grad] if key == "initial_state" else [val]
    return leaves


def _to(x, dtype, device):
    return {key: (_to(val, dtype, device) if isinstance(val, dict) else val.detach().to(device, dtype).requires_grad_(
        val.requires_grad)) for key, val in x.items()}


def _loss(res, weights):
    total = (res.output.double().cpu() * weights[0]).sum()
    if res.final_state is not None:
        for i, key in enumerate(sorted(res.final_state)):
            total = total + (res.final_state[key].double().cpu() * weights[1 + i]).sum()
    if res.variance is not None:
        total = total + (res.variance.double().cpu() * weights[-1]).sum()
    return total


def _check(name, x, groups=None, cu_seqlens=None, chunk_size=16, **kw):
    """Outputs, final states, variance and every gradient of ``backend='triton_chunk'`` against autograd
    through :func:`metaplastic.scan` (grouped b expanded per value row for the reference)."""
    obj = metaplastic.registry[name].objective
    kw = dict(kw, output_final_state=True, output_variance=obj.posterior == "diagonal")
    ref_x = _leaves(x)
    ref_kw = dict(ref_x)
    if groups is not None:
        V = x["v"].shape[-1]
        ref_kw["b"] = ref_x["b"].repeat_interleave(V // groups, -1)
    ref = metaplastic.scan(obj, **ref_kw, **kw, cu_seqlens=cu_seqlens)
    got_x = _to(_leaves(x), DTYPE, DEVICE)
    got = dispatch_scan(obj, **got_x, **kw, cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE),
                        backend="triton_chunk", chunk_size=chunk_size)
    assert_close(got.output.cpu(), ref.output, rtol=TOL)
    for key in ref.final_state:
        assert_close(got.final_state[key].cpu(), ref.final_state[key], rtol=TOL, msg=str(key))
    if ref.variance is not None:
        assert_close(got.variance.cpu(), ref.variance, rtol=TOL)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(ref.output.shape, generator=gen, dtype=torch.float64)]
    weights += [torch.randn(ref.final_state[key].shape, generator=gen, dtype=torch.float64)
                for key in sorted(ref.final_state)]
    if ref.variance is not None:
        weights.append(torch.randn(ref.variance.shape, generator=gen, dtype=torch.float64))
    g_ref = torch.autograd.grad(_loss(ref, weights), _flat(ref_x))
    g_got = torch.autograd.grad(_loss(got, weights), _flat(got_x))
    for a, b in zip(g_ref, g_got):
        assert torch.isfinite(b).all()
        assert_close(b.cpu(), a, rtol=TOL)


@pytest.mark.parametrize("name,shape,init", [
    ("mamba2", (2, 21, 2, 5, 3), False),        # T not a multiple of the chunk
    ("linear_attention", (1, 17, 1, 4, 4), True),  # no forgetting, an initial state
    ("palimpsa", (1, 18, 2, 5, 3), True),       # head-shared b (limit 7), initial state, variance
])
def test_triton_chunk_backward_matches_reference(name, shape, init):
    obj, x = _inputs(name, *shape, init=init, seed=sum(shape))
    _check(name, x, scale=0.7)


@pytest.mark.parametrize("groups,V,init", [(2, 4, False), (3, 6, True)])
def test_triton_chunk_grouped_importance(groups, V, init):
    """Palimpsa with b [B,T,H,G] (limit 8): G reads of one numerator with queries q ⊘ J⁽ᵍ⁾."""
    obj, x = _inputs("palimpsa", 1, 19, 2, 4, V, groups=groups, init=init, seed=groups)
    _check("palimpsa", x, groups=groups, scale=0.6)


def test_triton_chunk_backward_varlen():
    cu = torch.tensor([0, 3, 3, 20])  # an empty sequence; one spans two chunks
    obj, x = _inputs("palimpsa", 1, 20, 1, 4, 4, groups=2, init=True, N=3, seed=4)
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
    obj, x = _inputs("mamba2", 1, 12, 1, 4, 4, seed=2)
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
