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


def _fused_calls(monkeypatch):
    """Counts the calls of the fused grouped-importance Function (the route under test)."""
    from metaplastic.kernels import chunk_triton
    calls = []
    apply = chunk_triton.TritonGroupedDiagonal.apply
    monkeypatch.setattr(chunk_triton.TritonGroupedDiagonal, "apply",
                        staticmethod(lambda *a: calls.append(a[4].shape[-1]) or apply(*a)))
    return calls


@pytest.mark.parametrize("groups,V,T,init", [(None, 3, 21, "shared"), (1, 4, 17, None), (2, 4, 19, "shared"),
                                             (3, 6, 35, None)])
def test_triton_chunk_fused_grouped_prior_precision(monkeypatch, groups, V, T, init):
    """The fused grouped kernels (group precisions and reads q ⊘ I formed on chip) with a prior precision
    per head that requires a gradient, with or without an initial state, the variance, T not a multiple of
    the chunk and two chunks or more: every gradient (q, k, v, log-decay, β, b, Ip, the initial state)
    against autograd through the reference. ``groups=None``: b head-shared ``[B,T,H]``."""
    calls = _fused_calls(monkeypatch)
    obj, x = scan_inputs("palimpsa", 2, T, 2, 5, V, groups=groups, init=init, seed=T,
                         **dict(INPUTS, prior_precision=True))
    _check("palimpsa", x, groups=groups or 1, scale=0.8) if groups else _check("palimpsa", x, scale=0.8)
    assert calls and all(c == (groups or 1) for c in calls)


def test_triton_chunk_fused_grouped_ampere_launch(monkeypatch):
    """The fused grouped kernels with the launch settings of compute capability 8 (``LAUNCH_SM80``: among
    them the dq, dk kernel's other schedule, each group's precision formed after its read), three groups,
    two chunks or more, an initial state, the variance: every gradient against autograd through the
    reference."""
    from metaplastic.kernels import chunk_triton
    assert not chunk_triton.LAUNCH_SM80["grouped_dqk_groups"]["PRECISION_FIRST"]
    assert chunk_triton.LAUNCH["grouped_dqk_groups"]["PRECISION_FIRST"]
    monkeypatch.setattr(chunk_triton, "launch_table", lambda x: {**chunk_triton.LAUNCH, **chunk_triton.LAUNCH_SM80})
    calls = _fused_calls(monkeypatch)
    obj, x = scan_inputs("palimpsa", 1, 37, 2, 5, 6, groups=3, init="shared", seed=11,
                         **dict(INPUTS, prior_precision=True))
    _check("palimpsa", x, groups=3, scale=0.7)
    assert calls and all(c == 3 for c in calls)


@pytest.mark.parametrize("log_decay", [-math.inf, -1e4, -30.0])
def test_triton_chunk_fused_grouped_resets(monkeypatch, log_decay):
    """Resets (a log-decay of -inf or below the floor: α = 0 exactly) and an extreme decay (-30) inside a
    chunk and on a chunk's last token, grouped b: outputs, states, variance and every gradient."""
    calls = _fused_calls(monkeypatch)
    obj, x = scan_inputs("palimpsa", 1, 40, 2, 4, 4, groups=2, init="shared", seed=7,
                         **dict(INPUTS, prior_precision=True))
    x["log_decay"][:, 5] = log_decay
    x["log_decay"][:, 15] = log_decay
    x["log_decay"][:, 33, 1] = log_decay
    _check("palimpsa", x, groups=2, scale=0.6, may_vanish=())
    assert calls


@pytest.mark.parametrize("name,groups", [("palimpsa", 2), ("meta_mamba2", None), ("mamba2", None)])
def test_triton_chunk_bfloat16_inputs(name, groups):
    """q, k, v in bfloat16, read in place by the kernels (computing in float32), against the float64
    reference on the same bfloat16-rounded values. Outputs and gradients come back in bfloat16 (8 bits of
    mantissa: a relative error up to 2⁻⁸ ≈ 0.4 % of the largest entry per rounding), so the stated
    tolerance is 1 % of the largest entry."""
    from helpers import cotangent_loss, random_cotangents
    obj, x = scan_inputs(name, 2, 37, 2, 16, 16, groups=groups, seed=5, **INPUTS)
    for key in ("q", "k", "v"):
        x[key] = x[key].to(torch.bfloat16).double()
    ref_leaves = {key: val.clone().requires_grad_() for key, val in x.items() if isinstance(val, torch.Tensor)}
    got_leaves = {key: val.to(torch.bfloat16 if key in ("q", "k", "v") else torch.float32).clone().requires_grad_()
                  for key, val in ref_leaves.items()}
    kw = dict(scale=0.5, output_final_state=True, output_variance=obj.posterior != "point")
    b_ref = dict(ref_leaves)
    if groups:
        b_ref["b"] = ref_leaves["b"].repeat_interleave(16 // groups, -1)
    ref = metaplastic.scan(obj, **b_ref, **kw)
    got = dispatch_scan(obj, **got_leaves, **kw, backend="triton_chunk", chunk_size=16)
    assert got.output.dtype == torch.bfloat16
    assert_close(got.output, ref.output, rtol=1e-2, msg="output")
    if ref.variance is not None:
        assert_close(got.variance, ref.variance, rtol=1e-2, msg="variance")
    weights = random_cotangents(ref)
    g_ref = torch.autograd.grad(cotangent_loss(ref, weights), list(ref_leaves.values()))
    g_got = torch.autograd.grad(cotangent_loss(got, weights), list(got_leaves.values()))
    for key, a, b in zip(ref_leaves, g_ref, g_got):
        assert b.dtype == got_leaves[key].dtype
        assert_close(b, a, rtol=1e-2, msg=f"gradient of {key}")


def test_triton_chunk_dot_one_query_per_group():
    """``TritonChunkDot`` with one query per group of value rows (``q [B,H,T,NG,K]``, 3 groups of 2 rows)
    against the torch ``ChunkDot`` run once per group on its rows: outputs, final state and every gradient."""
    from metaplastic.kernels.chunk import ChunkDot
    from metaplastic.kernels.chunk_triton import TritonChunkDot
    gen = torch.Generator().manual_seed(11)
    B, H, T, K, V, NG = 1, 2, 23, 5, 6, 3
    d = dict(dtype=torch.float64, generator=gen)
    q, k, v = torch.randn(B, H, T, NG, K, **d), torch.randn(B, H, T, K, **d), torch.randn(B, H, T, V, **d)
    g = torch.log(0.6 + 0.4 * torch.rand(B, H, T, 1, **d))
    S0, do, dS = torch.randn(B, H, V, K, **d), torch.randn(B, H, T, V, **d), torch.randn(B, H, V, K, **d)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, S0)]
    R = V // NG
    parts = [ChunkDot.apply(leaves[0][:, :, :, i], leaves[1], leaves[2][..., i * R:(i + 1) * R], leaves[3],
                            leaves[4][:, :, i * R:(i + 1) * R], 0.4, 16) for i in range(NG)]
    o_ref, S_ref = torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], 2)
    expected = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), leaves)
    got_leaves = [t.detach().to(DEVICE, DTYPE).requires_grad_() for t in (q, k, v, g, S0)]
    o, S_T = TritonChunkDot.apply(*got_leaves, 0.4, 16)
    assert_close(o.cpu(), o_ref, rtol=TOL)
    assert_close(S_T.cpu(), S_ref, rtol=TOL)
    got = torch.autograd.grad((o * do.to(DEVICE, DTYPE)).sum() + (S_T * dS.to(DEVICE, DTYPE)).sum(), got_leaves)
    for a, b in zip(expected, got):
        assert_close(b.cpu(), a, rtol=TOL)


@pytest.mark.parametrize("name,groups", [("palimpsa", 2), ("palimpsa", None), ("mamba2", None)])
def test_triton_chunk_bfloat16_rounded_once(name, groups):
    """The kernels store the output and the gradients of q, k, v in bfloat16 themselves: bit for bit what
    torch's own rounding (``Tensor.to``, round to nearest even) gives of the same computation with float32
    inputs holding the same values (at K = V = 16 both read with the same tiles), the cotangent
    bfloat16-exact."""
    obj, x = scan_inputs(name, 2, 37, 2, 16, 16, groups=groups, seed=7, **INPUTS)
    x = {key: val.float() if isinstance(val, torch.Tensor) else val for key, val in x.items()}
    for key in ("q", "k", "v"):
        x[key] = x[key].to(torch.bfloat16).float()
    weights = torch.randn(2, 37, 2, 16, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        leaves = {key: (val.to(dt) if key in ("q", "k", "v") else val).clone().requires_grad_()
                  for key, val in x.items() if isinstance(val, torch.Tensor)}
        out = dispatch_scan(obj, **leaves, scale=0.5, backend="triton_chunk", chunk_size=16).output
        grads = torch.autograd.grad((out * weights.to(dt)).sum(), [leaves[key] for key in ("q", "k", "v")])
        runs[dt] = (out,) + grads
    for what, wide, narrow in zip(("output", "dq", "dk", "dv"), runs[torch.float32], runs[torch.bfloat16]):
        assert narrow.dtype == torch.bfloat16, what
        assert torch.equal(narrow, wide.to(torch.bfloat16)), what
