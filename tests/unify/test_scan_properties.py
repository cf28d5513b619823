"""Properties of the reference scan: limits 1 and 2, splitting, varlen, and predictive variance by Monte Carlo."""
import math

import pytest
import torch

import metaplastic
from metaplastic import registry, scan

from helpers import random_inputs

torch.manual_seed(0)


# valid random float64 inputs (unit-norm keys, decays in (0.6, 1)); T = 10, H = 3 unless given
INPUTS = dict(decay_min=0.6)


def test_palimpsa_with_b_zero_is_mamba2():
    """Limit 1: Palimpsa with b ≡ 0 and Ip = 1 equals Mamba2 (float64, 1e-12)."""
    x = random_inputs(registry["palimpsa"], b_zero=True, T=10, H=3, **INPUTS)
    pal = scan(registry["palimpsa"].objective, **x, output_final_state=True)
    x.pop("b"); x.pop("prior_precision")
    m2 = scan(registry["mamba2"].objective, **x, output_final_state=True)
    assert (pal.output - m2.output).abs().max() <= 1e-12
    assert (pal.final_state["mu"] - m2.final_state["S"]).abs().max() <= 1e-12
    assert (pal.final_state["I"] - 1).abs().max() <= 1e-12


def test_palimpsa_with_b_zero_and_prior_precision_is_dot_with_beta_over_ip():
    """Limit 1 with Ip ≠ 1: dot/point with β/Ip."""
    x = random_inputs(registry["palimpsa"], b_zero=True, T=10, H=3, **INPUTS)
    Ip = 2.5
    pal = scan(registry["palimpsa"].objective, **{**x, "prior_precision": Ip})
    x.pop("b"); x.pop("prior_precision")
    m2 = scan(registry["mamba2"].objective, **{**x, "beta": x["beta"] / Ip})
    assert (pal.output - m2.output).abs().max() <= 1e-12


@pytest.mark.parametrize("name", [s.name for s in registry.point_entries()])
def test_metaplastic_twin_at_b_zero_is_the_model(name):
    """Limit 2: metaplastic(X) at b ≡ 0, Ip = 1 equals X, for every point-posterior entry."""
    spec = registry[name]
    twin = metaplastic.metaplastic(spec.objective)
    x = random_inputs(spec, init="random", T=10, H=3, **INPUTS)
    ref = scan(spec.objective, **x, output_final_state=True)
    S0 = x["initial_state"]["S"]
    y = dict(x, b=torch.zeros_like(x["v"]), initial_state={"mu": S0, "I": torch.ones_like(S0)})
    got = scan(twin, **y, output_final_state=True)
    assert (got.output - ref.output).abs().max() <= 1e-12
    assert (got.final_state["mu"] - ref.final_state["S"]).abs().max() <= 1e-12


@pytest.mark.parametrize("name", list(registry))
def test_two_halves_equal_whole(name):
    spec = registry[name]
    x = random_inputs(spec, T=9, init="random", seed=3, H=3, **INPUTS)
    whole = scan(spec.objective, **x, output_final_state=True)
    cut = 4
    first = {key: (val[:, :cut] if key in ("q", "k", "v", "log_decay", "beta", "b") else val) for key, val in x.items()}
    second = {key: (val[:, cut:] if key in ("q", "k", "v", "log_decay", "beta", "b") else val) for key, val in x.items()}
    a = scan(spec.objective, **first, output_final_state=True)
    bres = scan(spec.objective, **dict(second, initial_state=a.final_state), output_final_state=True)
    assert (torch.cat([a.output, bres.output], 1) - whole.output).abs().max() <= 1e-12
    for key in whole.final_state:
        assert (bres.final_state[key] - whole.final_state[key]).abs().max() <= 1e-12


@pytest.mark.parametrize("name", ["mamba2", "palimpsa", "gated_deltanet", "mesanet", "meta_longhorn"])
def test_varlen_equals_separate_sequences(name):
    spec = registry[name]
    lengths = [3, 0, 5, 1]
    T = sum(lengths)
    x = random_inputs(spec, B=1, T=T, seed=5, H=3, **INPUTS)
    cu = torch.tensor([0, 3, 3, 8, 9])
    packed = scan(spec.objective, **x, cu_seqlens=cu, output_final_state=True)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:
            continue
        seg = {key: (val[:, s:e] if key in ("q", "k", "v", "log_decay", "beta", "b") else val) for key, val in x.items()}
        one = scan(spec.objective, **seg, output_final_state=True)
        assert (packed.output[:, s:e] - one.output).abs().max() <= 1e-12
        for key in one.final_state:
            assert (packed.final_state[key][n] - one.final_state[key][0]).abs().max() <= 1e-12


def test_float32_runs_and_agrees_with_float64():
    spec = registry["palimpsa"]
    x = random_inputs(spec, T=10, H=3, **INPUTS)
    ref = scan(spec.objective, **x)
    x32 = {key: (val.float() if torch.is_tensor(val) else val) for key, val in x.items()}
    got = scan(spec.objective, **x32)
    assert got.output.dtype == torch.float32
    assert (got.output.double() - ref.output).abs().max() / ref.output.abs().max() < 1e-5


def _z_bound(n: int) -> float:
    """5-sigma bound for the relative error of a sample variance from n Gaussian draws."""
    return 5 * math.sqrt(2 / (n - 1))


@pytest.mark.parametrize("name", ["palimpsa", "meta_gated_deltanet", "meta_longhorn"])
def test_diagonal_predictive_variance_matches_monte_carlo(name):
    """Var[o] of the mean-field posterior vs samples S_ij ~ N(mu_ij, 1/I_ij), o = scale · S q."""
    spec = registry[name]
    x = random_inputs(spec, B=1, T=6, H=2, K=5, V=3, seed=11, **INPUTS)
    scale = spec.scale_for(5)
    res = scan(spec.objective, **x, scale=scale, output_final_state=True, output_variance=True)
    mu, I = res.final_state["mu"][0], res.final_state["I"][0]  # [H, V, K]
    q = x["q"][0, -1]  # [H, K]
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    S = mu + torch.randn(n, *mu.shape, generator=gen, dtype=torch.float64) / I.sqrt()
    o = scale * (S * q[:, None, :]).sum(-1)  # [n, H, V]
    mc_mean, mc_var = o.mean(0), o.var(0)
    var = res.variance[0, -1]
    assert ((mc_var - var).abs() / var).max() <= _z_bound(n)
    assert ((mc_mean - res.output[0, -1]).abs() / (var / n).sqrt()).max() <= 5


def test_full_predictive_variance_matches_monte_carlo():
    """MesaNet's matrix-normal posterior: rows s_i ~ N(G_i P^-1, P^-1), Var[o_i] = qᵀ P^-1 q."""
    spec = registry["mesanet"]
    x = random_inputs(spec, B=1, T=6, H=2, K=4, V=4, seed=12, **INPUTS)
    res = scan(spec.objective, **x, output_final_state=True, output_variance=True)
    G, Hm = res.final_state["G"][0], res.final_state["H"][0]
    P = Hm + torch.diag_embed(x["lam"])
    cov = torch.linalg.inv(P)
    mean = G @ cov  # μ = G P^-1, [H, V, K]
    L = torch.linalg.cholesky(cov)
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, *mean.shape, generator=gen, dtype=torch.float64)
    S = mean + z @ L.transpose(-1, -2)[None]  # rows ~ N(mean_i, cov)
    q = x["q"][0, -1]
    o = (S * q[:, None, :]).sum(-1)
    var = res.variance[0, -1]
    assert ((o.var(0) - var).abs() / var).max() <= _z_bound(n)
    assert ((o.mean(0) - res.output[0, -1]).abs() / (var / n).sqrt()).max() <= 5


def test_point_posterior_has_no_variance():
    spec = registry["mamba2"]
    x = random_inputs(spec, T=10, H=3, **INPUTS)
    with pytest.raises(ValueError, match="point"):
        scan(spec.objective, **x, output_variance=True)
