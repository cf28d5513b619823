"""Gates outside the theory's domain are refused by name before any computation (docs/theory.md#notation: α = exp(g) ≤ 1,
precisions are positive), on every backend that goes through ``validate_inputs``; GPU tensors are value-checked
only on request (METAPLASTIC_CHECK_VALUES=1)."""
import math

import pytest
import torch

import metaplastic
from metaplastic.kernels.dispatch import scan as kernel_scan
from metaplastic.scan import CHECK_VALUES_ENV, validate_inputs, values_checked

from hostile import refused_scan_calls, scan_tensors

B, T, H, K, V = 1, 5, 2, 4, 3


def palimpsa_objective():
    return metaplastic.registry["palimpsa"].objective


def mamba2_objective():
    return metaplastic.registry["mamba2"].objective


def run(objective, **kw):
    q, k, v, g = scan_tensors(B, T, H, K, V)
    kw.setdefault("log_decay", g)
    return metaplastic.scan(objective, q, k, v, **kw)


@pytest.mark.parametrize("bad", [0.5, math.inf])
def test_positive_log_decay_is_refused(bad):
    q, k, v, g = scan_tensors(B, T, H, K, V)
    g[0, 2, 1] = bad
    with pytest.raises(ValueError, match="log_decay must be ≤ 0"):
        metaplastic.scan(mamba2_objective(), q, k, v, log_decay=g)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 0.0, -1.0])
def test_prior_precision_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError, match="prior_precision"):
        run(palimpsa_objective(), prior_precision=bad)
    with pytest.raises(ValueError, match="prior_precision"):
        run(palimpsa_objective(), prior_precision=torch.tensor([1.0, bad]))


def test_full_posterior_lam_must_be_positive():
    obj = metaplastic.registry["mesanet"].objective
    lam = torch.ones(H, K)
    lam[1, 2] = 0.0
    with pytest.raises(ValueError, match="lam must be > 0"):
        run(obj, lam=lam)
    lam[1, 2] = math.nan
    with pytest.raises(ValueError, match="lam has non-finite"):
        run(obj, lam=lam)


@pytest.mark.parametrize("name", ["beta", "b", "log_decay"])
def test_a_gate_given_as_a_python_float_is_named(name):
    with pytest.raises(ValueError, match=f"{name} must be a tensor"):
        run(palimpsa_objective(), **{name: 0.5})


def test_float_cu_seqlens_is_named():
    with pytest.raises(ValueError, match="cu_seqlens must hold integers"):
        run(mamba2_objective(), cu_seqlens=torch.tensor([0.0, 2.0, 5.0]))


@pytest.mark.parametrize("backend", ["chunk", "triton_recurrent"])
def test_fast_paths_refuse_the_same(backend):
    q, k, v, g = scan_tensors(B, T, H, K, V)
    g[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="log_decay must be ≤ 0"):
        kernel_scan(mamba2_objective(), q, k, v, log_decay=g, backend=backend)


def test_accelerator_tensors_are_value_checked_only_on_request(monkeypatch):
    """A tensor off the CPU (the meta device stands in for a GPU: no data, no sync) is not value-checked
    unless METAPLASTIC_CHECK_VALUES=1; shapes are checked either way."""
    q, k, v, g = (x.to("meta") for x in scan_tensors(B, T, H, K, V))
    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    assert not values_checked(g) and values_checked(torch.zeros(1))
    validate_inputs(mamba2_objective(), q, k, v, g, None, None, 1.0, None, None)  # no value read
    with pytest.raises(ValueError, match="log_decay must be"):
        validate_inputs(mamba2_objective(), q, k, v, g[..., :1], None, None, 1.0, None, None)
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    assert values_checked(g)


@pytest.mark.parametrize("backend", ["chunk", "triton_chunk", "triton_per_value", "triton_recurrent"])
def test_every_backend_refuses_what_the_reference_refuses(backend):
    """One front door (``metaplastic.scan_call.prepare``): each call the reference refuses, every backend
    refuses with the same message."""
    q, k, v, g = scan_tensors(B, T, H, K, V)
    base = dict(log_decay=g, beta=torch.rand(B, T, H), b=torch.rand(B, T, H))
    for what, change in refused_scan_calls(B, T, H, K, V, g):
        kw = {**base, **change}
        with pytest.raises(ValueError) as ref:
            metaplastic.scan(palimpsa_objective(), q, k, v, **kw)
        with pytest.raises(ValueError) as got:
            kernel_scan(palimpsa_objective(), q, k, v, **kw, backend=backend)
        assert str(got.value) == str(ref.value), what
