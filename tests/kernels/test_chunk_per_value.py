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

from helpers import check_against_reference, random_inputs

TOL = 1e-10  # float64 against float64: rounding only
PALIMPSA = metaplastic.registry["palimpsa"].objective
# the inputs of every test here: keys N(0, 1), decays in (0.3, 1), b per value row, a random initial state
INPUTS = dict(keys=1.0, decay_min=0.3, init="random")


def _check(x, chunk_size, cu_seqlens=None):
    check_against_reference(PALIMPSA, x, lambda obj, **kw: chunk_scan(obj, **kw, chunk_size=chunk_size), rtol=TOL,
                            cu_seqlens=cu_seqlens, scale=0.6)


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("block", [1, 40, 1 << 20])  # a block per (head, chunk); several heads; everything
def test_matmul_form_matches_reference(monkeypatch, chunk_size, block):
    monkeypatch.setattr(chunk_per_value, "FORM", "matmul")
    monkeypatch.setattr(chunk_per_value, "BLOCK_ELEMENTS", block)
    _check(random_inputs("palimpsa", 2, 11, 3, 4, 3, seed=chunk_size, **INPUTS), chunk_size)


@pytest.mark.parametrize("form", chunk_per_value.FORMS)
def test_per_value_varlen(monkeypatch, form):
    if form == "native" and native_unavailable_reason() is not None:
        pytest.skip(native_unavailable_reason())
    monkeypatch.setattr(chunk_per_value, "FORM", form)
    x = random_inputs("palimpsa", 1, 12, 2, 3, 4, seed=7, N=3, **INPUTS)
    _check(x, 4, cu_seqlens=torch.tensor([0, 5, 5, 12]))


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
    x = random_inputs("palimpsa", 1, 6, 1, 2, 2, seed=0, **INPUTS)
    x["q"].requires_grad_(True)
    torch.set_num_threads(2)
    try:
        chunk_scan(PALIMPSA, **x).output.sum().backward()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {chunk_per_value.INTRA_OP_THREADS}
