"""The symbolic derivations: every theorem holds, and each can fail.

Independent yardsticks: sympy (the stationarity conditions are solved, not typed), Monte Carlo and
``torch.distributions`` for the free energy's expectations and KL divergences, and ``metaplastic.scan`` for
the numeric loop. The planted errors edit the *source* of ``metaplastic.closed_forms`` (a flipped sign, a
missing factor) and check that exactly the theorems that depend on that line report ``holds = False``.
"""
from __future__ import annotations

import inspect
import json
import types

import numpy as np
import pytest
import sympy
import torch

from metaplastic import closed_forms, registry
from metaplastic.derivations.check import compare
from metaplastic.derivations.derive import derive
from metaplastic.derivations.proofs import run_all, theorem_names, theorems
from metaplastic.derivations.free_energy import expected_loss, kl_gaussian_rows
from metaplastic.derivations.symbols import matrix, vector

LIMIT_NAMES = ["palimpsa_to_mamba2", "metaplastic_identity", "palimpsa_is_meanfield_regression",
               "longhorn_is_diagonal_proximal", "gdn_is_first_order_proximal", "mesanet_full_to_diagonal",
               "headshared_importance_is_gla", "grouped_importance_is_gla"]


def test_theorem_names_are_the_limits_and_one_derivation_per_model():
    assert theorem_names() == LIMIT_NAMES + [f"derive_{name}" for name in registry]
    assert all(callable(fn) for fn in theorems())


@pytest.mark.parametrize("name", LIMIT_NAMES + [f"derive_{name}" for name in registry])
def test_theorem_holds(name):
    (record,) = run_all([name])
    assert record.name == name
    assert record.holds, f"{name}: {record.details}"
    assert record.checks and all(record.checks.values())
    data = record.to_json()
    assert {"name", "statement", "holds", "seconds"} <= set(data)
    json.dumps(data)  # every expression is serialisable


def test_run_all_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown theorem.*no_such_theorem"):
        run_all(["no_such_theorem"])


# --- planted errors: a wrong closed form must make its theorems fail ----------------------------------

def _mutated_closed_forms(old: str, new: str) -> types.ModuleType:
    """A copy of ``metaplastic.closed_forms`` with one line of source changed."""
    source = inspect.getsource(closed_forms)
    assert source.count(old) == 1, f"fragment not found once in closed_forms.py: {old!r}"
    module = types.ModuleType("planted_closed_forms")
    module.__package__ = "metaplastic"
    exec(compile(source.replace(old, new), "planted_closed_forms.py", "exec"), module.__dict__)
    return module


PLANTED = [
    # (id, old fragment, planted fragment, theorems that must now fail)
    ("prior sign flipped", "(1 - alpha) * gates.Ip", "(1 + alpha) * gates.Ip",
     ["derive_palimpsa", "derive_meta_gated_deltanet"]),
    ("dot step misses 1/Ip", 'return {"S": S + (beta / Ip) * outer(v, k)}', 'return {"S": S + beta * outer(v, k)}',
     ["derive_mamba2", "derive_linear_attention", "palimpsa_to_mamba2"]),
    ("LongHorn ε sign flipped", "eps = beta / (Ip + beta * k2", "eps = beta / (Ip - beta * k2",
     ["derive_longhorn", "longhorn_is_diagonal_proximal"]),
    ("MesaNet H misses β", '"H": prior_state["H"] + beta * outer(k, k)', '"H": prior_state["H"] + outer(k, k)',
     ["derive_mesanet", "mesanet_full_to_diagonal"]),
    ("Palimpsa write sign flipped", "(I_prior * mu + beta * outer(v, k)) / I_new",
     "(I_prior * mu - beta * outer(v, k)) / I_new",
     ["derive_palimpsa", "derive_meta_gla", "palimpsa_to_mamba2", "palimpsa_is_meanfield_regression",
      "headshared_importance_is_gla", "mesanet_full_to_diagonal", "metaplastic_identity"]),
    ("gradient step uses the prior precision", "mu + (beta / I_new) * outer(residual, k)",
     "mu + (beta / I_prior) * outer(residual, k)", ["derive_meta_gated_deltanet"]),
    ("GDN step misses 1/Ip", 'return {"S": S + (beta / Ip) * outer(residual, k)}',
     'return {"S": S + beta * outer(residual, k)}', ["derive_gated_deltanet", "derive_deltanet"]),
    ("variance scaled by scale, not scale²", 'scale * scale * matvec(1 / state["I"], q * q)',
     'scale * matvec(1 / state["I"], q * q)', ["derive_palimpsa", "derive_meta_longhorn"]),
    ("Kalman gain misses β", "c = beta / (1 + beta * (k_over_D", "c = beta / (1 + (k_over_D",
     ["derive_meta_longhorn"]),
]


@pytest.mark.parametrize("old,new,failing", [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED])
def test_planted_wrong_closed_form_is_caught(old, new, failing):
    wrong = _mutated_closed_forms(old, new)
    records = run_all(failing + ["derive_simple_gla"], closed_form=wrong)
    by_name = {r.name: r for r in records}
    for name in failing:
        assert not by_name[name].holds, f"{name} did not notice {new!r}"
        assert by_name[name].details
    # the planted line is not used by simple GLA: its theorem still holds with the same stand-in
    if "derive_linear_attention" not in failing:
        assert by_name["derive_simple_gla"].holds


def test_planted_error_through_a_stand_in_object():
    """``closed_form`` may be any object with prior/update/readout: here one that doubles MesaNet's G."""
    def update(objective, prior_state, k, v, gates):
        out = closed_forms.update(objective, prior_state, k, v, gates)
        if objective.posterior == "full":
            out = {**out, "G": out["G"] * 2}
        return out

    stand_in = types.SimpleNamespace(prior=closed_forms.prior, update=update, readout=closed_forms.readout)
    (record,) = run_all(["derive_mesanet"], closed_form=stand_in)
    assert not record.holds and "update G" in record.details
    honest = types.SimpleNamespace(prior=closed_forms.prior, update=closed_forms.update, readout=closed_forms.readout)
    (ok,) = run_all(["derive_mesanet"], closed_form=honest)
    assert ok.holds


def test_comparison_names_the_differing_entries():
    d = derive(registry["gated_deltanet"].objective)
    wrong = _mutated_closed_forms('return {"S": S + (beta / Ip) * outer(residual, k)}',
                                  'return {"S": S - (beta / Ip) * outer(residual, k)}')
    result = compare(d, wrong)
    assert not result.holds
    assert set(result.mismatches) == {"update S[1,1]", "update S[1,2]", "update S[2,1]", "update S[2,2]"}


# --- the free energy against independent numbers -------------------------------------------------------

def _numbers(symbols, values):
    return {s: float(x) for s, x in zip(np.ravel(symbols), np.ravel(values))}


@pytest.mark.parametrize("likelihood,posterior", [("dot", "point"), ("dot_diag", "diagonal"),
                                                  ("regression", "point"), ("regression", "diagonal"),
                                                  ("regression", "full")])
def test_expected_loss_matches_monte_carlo(likelihood, posterior):
    """E_q[l(S)] in closed form vs the average of l over samples S ~ q (b = β, the Bayesian free energy)."""
    V, K, n = 2, 2, 400_000
    gen = torch.Generator().manual_seed(0)
    m_sym, k_sym, v_sym = matrix("m", V, K), vector("k", K), vector("v", V)
    beta_sym = vector("beta", V)
    m, k, v = (torch.randn(V, K, generator=gen, dtype=torch.float64), torch.randn(K, generator=gen,
               dtype=torch.float64), torch.randn(V, generator=gen, dtype=torch.float64))
    beta = 0.3 + torch.rand(V, generator=gen, dtype=torch.float64)
    if posterior == "point":
        cov = [torch.eye(K, dtype=torch.float64) / 1.5] * V
    elif posterior == "diagonal":
        cov = [torch.diag(0.2 + torch.rand(K, generator=gen, dtype=torch.float64)) for _ in range(V)]
    else:
        A = torch.randn(K, K, generator=gen, dtype=torch.float64)
        cov = [A @ A.T / K + 0.1 * torch.eye(K, dtype=torch.float64)] * V
    # samples S ~ q, row by row
    S = torch.stack([torch.distributions.MultivariateNormal(m[i], cov[i]).sample((n,)) for i in range(V)], dim=1)
    Sk = S @ k
    if likelihood == "regression":
        loss = (beta / 2 * (v - Sk) ** 2).sum(-1)
    else:
        loss = -(beta * v * Sk).sum(-1)
        if likelihood == "dot_diag":
            loss = loss + (beta[:, None] / 2 * k ** 2 * S ** 2).sum((-1, -2))
    cov_sym = lambda i: sympy.Matrix(cov[i].tolist())  # noqa: E731
    expr = expected_loss(likelihood, posterior, m_sym, cov_sym, k_sym, v_sym, beta_sym[:, None], beta_sym[:, None])
    values = {**_numbers(m_sym, m), **_numbers(k_sym, k), **_numbers(v_sym, v), **_numbers(beta_sym, beta)}
    exact = float(expr.subs(values))
    stderr = float(loss.std() / n ** 0.5)
    assert abs(float(loss.mean()) - exact) < 5 * stderr, (float(loss.mean()), exact, stderr)


def test_kl_matches_torch_distributions():
    V, K = 2, 3
    gen = torch.Generator().manual_seed(1)
    m_sym, p_sym = matrix("m", V, K), matrix("p", V, K)
    m = torch.randn(V, K, generator=gen, dtype=torch.float64)
    mp = torch.randn(V, K, generator=gen, dtype=torch.float64)
    A, B = (torch.randn(K, K, generator=gen, dtype=torch.float64) for _ in range(2))
    C = A @ A.T + 0.5 * torch.eye(K, dtype=torch.float64)
    P = B @ B.T + 0.5 * torch.eye(K, dtype=torch.float64)
    expr = kl_gaussian_rows(m_sym, lambda i: sympy.Matrix(C.tolist()), p_sym, lambda i: sympy.Matrix(P.tolist()))
    value = float(expr.subs({**_numbers(m_sym, m), **_numbers(p_sym, mp)}))
    ref = sum(float(torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(m[i], C),
        torch.distributions.MultivariateNormal(mp[i], precision_matrix=P))) for i in range(V))
    assert value == pytest.approx(ref, rel=1e-10)


def test_derivation_solves_for_the_precision():
    """Stationarity in the precision (not a typed formula): I_t = I⁻ + b k² and P_t = P⁻ + β k kᵀ."""
    d = derive(registry["palimpsa"].objective)
    sy = d.symbols
    for i in range(sy.V):
        for j in range(sy.K):
            assert sympy.simplify(d.update["I"][i, j] - sy.prior_state["I"][i, j]
                                  - sy.b[i, 0] * sy.k[j] ** 2) == 0
    d = derive(registry["mesanet"].objective)
    sy = d.symbols
    for a in range(sy.K):
        for c in range(sy.K):
            assert sympy.simplify(d.update["H"][a, c] - sy.prior_state["H"][a, c]
                                  - sy.beta[0, 0] * sy.k[a] * sy.k[c]) == 0


def _valid_objectives():
    import itertools

    from metaplastic.objective import FORGETTINGS, LIKELIHOODS, POSTERIORS, SOLVERS, TRANSITIONS, Objective
    out = []
    for combo in itertools.product(LIKELIHOODS, POSTERIORS, SOLVERS, TRANSITIONS, FORGETTINGS):
        try:
            out.append(Objective(*combo))
        except ValueError:
            continue
    return out


@pytest.mark.parametrize("objective", [pytest.param(o, id=o.describe().replace(", ", "/"))
                                       for o in _valid_objectives()])
def test_any_objective_is_derived(objective):
    """Beyond the registry: every valid combination of settings derives to its closed form and its scan."""
    from metaplastic.derivations.numeric import numeric_error

    d = derive(objective)
    result = compare(d)
    assert result.holds, result.mismatches
    assert numeric_error(d, scale=0.7) < 1e-10
