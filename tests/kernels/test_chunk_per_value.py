"""The per-value Palimpsa path (kernels/chunk_per_value.py) against the reference scan, and by gradcheck.

Float64 against :func:`metaplastic.scan` with autograd through it: outputs, final states, variance and the
gradient of every input, to rounding error, for chunk sizes that do and do not divide T and for blocks that
split the heads and the chunks in every way.
"""
import pytest
import torch

import metaplastic
from metaplastic.kernels import chunk_per_value
from metaplastic.kernels.chunk import chunk_scan
from metaplastic.kernels.chunk_per_value import PerValueScan
from metaplastic.kernels.cpu_per_value import native_unavailable_reason

from helpers import assert_close

TOL = 1e-10


def _inputs(B, T, H, K, V, seed, N=None):
    gen = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64, generator=gen)
    N = B if N is None else N
    x = {"q": torch.randn(B, T, H, K, **d), "k": torch.randn(B, T, H, K, **d), "v": torch.randn(B, T, H, V, **d),
         "log_decay": torch.log(0.3 + 0.7 * torch.rand(B, T, H, **d)), "beta": torch.rand(B, T, H, **d),
         "b": torch.rand(B, T, H, V, **d), "prior_precision": 0.5 + torch.rand(H, **d)}
    x["initial_state"] = {"mu": torch.randn(N, H, V, K, **d), "I": 0.5 + torch.rand(N, H, V, K, **d)}
    return x


def _check(x, chunk_size, cu_seqlens=None):
    obj = metaplastic.registry["palimpsa"].objective
    leaves = [t for t in x.values() if isinstance(t, torch.Tensor)] + list(x["initial_state"].values())
    for t in leaves:
        t.requires_grad_(True)
    kw = dict(scale=0.6, output_final_state=True, output_variance=True, cu_seqlens=cu_seqlens)
    ref = metaplastic.scan(obj, **x, **kw)
    got = chunk_scan(obj, **x, **kw, chunk_size=chunk_size)
    assert_close(got.output, ref.output, rtol=TOL, msg="output")
    assert_close(got.variance, ref.variance, rtol=TOL, msg="variance")
    for key in ("mu", "I"):
        assert_close(got.final_state[key], ref.final_state[key], rtol=TOL, msg=key)

    def loss(res):
        w = torch.linspace(-1, 1, res.output.numel(), dtype=torch.float64).view_as(res.output)
        return ((res.output * w).sum() + (res.variance * w.cos()).sum()
                + sum((s * s.detach().sin()).sum() for s in res.final_state.values()))

    for a, b, leaf in zip(torch.autograd.grad(loss(ref), leaves), torch.autograd.grad(loss(got), leaves), leaves):
        assert a.abs().max() > 0
        assert_close(b, a, rtol=TOL, msg=f"gradient {tuple(leaf.shape)}")


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("block", [1, 40, 1 << 20])  # a block per (head, chunk); several heads; everything
def test_matmul_form_matches_reference(monkeypatch, chunk_size, block):
    monkeypatch.setattr(chunk_per_value, "FORM", "matmul")
    monkeypatch.setattr(chunk_per_value, "BLOCK_ELEMENTS", block)
    _check(_inputs(2, 11, 3, 4, 3, seed=chunk_size), chunk_size)


@pytest.mark.parametrize("form", chunk_per_value.FORMS)
def test_per_value_varlen(monkeypatch, form):
    if form == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    monkeypatch.setattr(chunk_per_value, "FORM", form)
    _check(_inputs(1, 12, 2, 3, 4, seed=7, N=3), 4, cu_seqlens=torch.tensor([0, 5, 5, 12]))


@pytest.mark.parametrize("with_var", [False, True])
def test_gradcheck_per_value(with_var):
    gen = torch.Generator().manual_seed(1)
    B, H, T, K, V = 1, 2, 5, 3, 2
    d = dict(dtype=torch.float64, generator=gen)
    args = [torch.randn(B, H, T, K, **d), torch.randn(B, H, T, K, **d), torch.randn(B, H, T, V, **d),
            torch.rand(B, H, T, V, **d), torch.log(0.5 + 0.5 * torch.rand(B, H, T, 1, **d)),
            torch.randn(B, H, V, K, **d), torch.rand(B, H, V, K, **d), 0.5 + torch.rand(1, H, 1, 1, 1, **d)]
    for t in args:
        t.requires_grad_(True)

    def f(*a):
        o, var, M, J = PerValueScan.apply(*a, 0.8, 2, with_var)
        return (o, M, J, var) if with_var else (o, M, J)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("form", ["scan", "matmul"])  # the torch forms (the C kernel runs on one thread)
def test_per_value_runs_on_the_thread_cap(monkeypatch, form):
    """Forward and backward run on at most INTRA_OP_THREADS torch threads; the caller's setting is restored."""
    monkeypatch.setattr(chunk_per_value, "FORM", form)
    seen = []
    original = torch.addcmul

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return original(*a, **kw)

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "addcmul", spy)
    x = _inputs(1, 6, 1, 2, 2, seed=0)
    x["q"].requires_grad_(True)
    torch.set_num_threads(2)
    try:
        chunk_scan(metaplastic.registry["palimpsa"].objective, **x).output.sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {chunk_per_value.INTRA_OP_THREADS}
