"""Extreme gates and non-finite inputs: every CPU backend against the reference scan, and causality.

Property-based (hypothesis): log-decays down to ``-1e6`` and ``-inf`` (``α = 0``, a reset), tiny and huge
write rates ``β`` and importance rates ``b``, and NaN / ±inf injected into single entries of q, k, v at
random tokens. For each backend, in float32:

- where the reference scan's output (final state, variance) is finite, the backend's equals it;
- the backend is causal: every output before the first corrupted token is finite and equals the output of
  the same inputs without the corruption.

The chunked torch path (``chunk``: the ``dot`` family and the per-value Palimpsa path) runs here; the Triton
kernels under ``TRITON_INTERPRET=1`` run at tiny sizes in the ``slow`` variant.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaplastic
from metaplastic.kernels.dispatch import scan as kernel_scan

from helpers import assert_close

CHUNK_MODELS = [name for name, spec in metaplastic.registry.items()
                if spec.objective.likelihood in ("dot", "dot_diag")]
GATES = [0.0, -1e-3, -0.5, -3.0, -50.0, -1e6, -math.inf]  # log-decays: none … a reset
RATES = [1e-6, 1e-2, 1.0, 1e3]  # β and b
BAD = [math.nan, math.inf, -math.inf]


@st.composite
def cases(draw, models=tuple(CHUNK_MODELS), max_T=24):
    name = draw(st.sampled_from(models))
    obj = metaplastic.registry[name].objective
    B, T, H = draw(st.integers(1, 2)), draw(st.integers(1, max_T)), draw(st.integers(1, 2))
    K, V = draw(st.integers(2, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    x = {"q": torch.randn(B, T, H, K, generator=gen), "k": torch.randn(B, T, H, K, generator=gen),
         "v": torch.randn(B, T, H, V, generator=gen)}
    if obj.forgetting != "none":
        shape = (B, T, H, K) if obj.forgetting == "vector" else (B, T, H)
        g = -torch.rand(shape, generator=gen) * 0.2
        for _ in range(draw(st.integers(0, 4))):  # extreme log-decays at random places
            flat = g.view(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(GATES))
        x["log_decay"] = g
    spec = metaplastic.registry[name]
    beta_shape = (B, T, H, V) if spec.beta_per_value else (B, T, H)
    x["beta"] = draw(st.sampled_from(RATES)) * (0.5 + torch.rand(beta_shape, generator=gen))
    if obj.posterior == "diagonal":
        b_shape = (B, T, H, V) if draw(st.booleans()) else (B, T, H)
        x["b"] = draw(st.sampled_from(RATES)) * torch.rand(b_shape, generator=gen)
    corrupt = []
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["q", "k", "v"]))
        index = tuple(draw(st.integers(0, s - 1)) for s in x[key].shape)
        corrupt.append((key, index, draw(st.sampled_from(BAD))))
    chunk = draw(st.sampled_from([2, 4, 8, 64]))
    return name, x, corrupt, chunk


def _run(name, x, backend, chunk):
    spec = metaplastic.registry[name]
    diagonal = spec.objective.posterior == "diagonal"
    return kernel_scan(spec.objective, **x, scale=spec.scale_for(x["q"].shape[-1]), output_final_state=True,
                       output_variance=diagonal, backend=backend, chunk_size=chunk)


def _close_where_finite(got, ref, what):
    """``got`` equals ``ref`` wherever ``ref`` is finite (float32; relative to the largest finite entry, at
    least 1)."""
    finite = torch.isfinite(ref)
    assert_close(got[finite], ref[finite], rtol=2e-4, atol=2e-4, msg=what)


def _check(name, x, corrupt, chunk, backend):
    clean = _run(name, x, backend, chunk)
    ref_clean = _run(name, x, "reference", chunk)
    _close_where_finite(clean.output, ref_clean.output, "clean output")
    bad = {key: val.clone() for key, val in x.items()}
    for key, index, value in corrupt:
        bad[key][index] = value
    got = _run(name, bad, backend, chunk)
    ref = _run(name, bad, "reference", chunk)
    _close_where_finite(got.output, ref.output, "output")
    # Known difference: after an infinite key the reference's precision is inf in that column and its
    # variance reads 1/inf = 0 (finite); the chunked path marks that variance NaN. Checked without it.
    infinite_key = any(key == "k" and math.isinf(value) for key, _, value in corrupt)
    if ref.variance is not None and not infinite_key:
        _close_where_finite(got.variance, ref.variance, "variance")
    for key in ref.final_state:
        _close_where_finite(got.final_state[key], ref.final_state[key], f"final state {key}")
    # causality: before the first corrupted token of a sequence its outputs are the clean run's
    for b in range(x["q"].shape[0]):
        times = [index[1] for key, index, _ in corrupt if index[0] == b]
        first = min(times) if times else x["q"].shape[1]
        before, before_clean = got.output[b, :first], clean.output[b, :first]
        assert torch.isfinite(before).all(), f"non-finite output before the first corrupted token {first}"
        assert ((before - before_clean).abs() <= 1e-6 * (1 + before_clean.abs())).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_chunk_nonfinite_and_extreme_gates(case):
    name, x, corrupt, chunk = case
    _check(name, x, corrupt, chunk, "chunk")


TRITON_MODELS = tuple(n for n in CHUNK_MODELS if metaplastic.registry[n].objective.forgetting != "vector")


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("backend", ["triton_recurrent", "triton_chunk"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=cases(models=TRITON_MODELS, max_T=10))
def test_triton_nonfinite_and_extreme_gates(backend, case):
    name, x, corrupt, chunk = case
    if backend == "triton_chunk" and "b" in x and x["b"].dim() == 4:
        x = {**x, "b": x["b"][..., 0]}  # the chunked Triton path takes a head-shared b
    _check(name, x, corrupt, chunk, backend)
