"""Settings, the registry, and input validation: every invalid combination and shape raises clearly."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import metaplastic
from metaplastic import Objective, registry, scan
from metaplastic.objective import FORGETTINGS, LIKELIHOODS, POSTERIORS, SOLVERS, TRANSITIONS

from helpers import random_inputs


def test_every_combination_is_valid_or_named():
    valid = 0
    for combo in itertools.product(LIKELIHOODS, POSTERIORS, SOLVERS, TRANSITIONS, FORGETTINGS):
        try:
            Objective(*combo)
            valid += 1
        except ValueError as exc:
            msg = str(exc)
            assert any(word in msg for word in ("likelihood", "posterior", "solver", "transition", "forgetting"))
    # every registry objective is among the valid ones, and some combinations are rejected
    assert 0 < valid < len(LIKELIHOODS) * len(POSTERIORS) * len(SOLVERS) * len(TRANSITIONS) * len(FORGETTINGS)


@pytest.mark.parametrize("kwargs,word", [
    ({"likelihood": "hebbian"}, "likelihood"),
    ({"likelihood": "dot", "posterior": "diagonal"}, "curvature"),
    ({"likelihood": "dot_diag", "posterior": "point"}, "dot_diag"),
    ({"likelihood": "dot", "solver": "gradient"}, "gradient"),
    ({"likelihood": "regression", "posterior": "full", "solver": "gradient"}, "full"),
    ({"likelihood": "regression", "posterior": "full", "forgetting": "vector"}, "vector"),
    ({"likelihood": "regression", "solver": "gradient", "transition": "diagonal"}, "transition"),
    ({"forgetting": "sometimes"}, "forgetting"),
])
def test_invalid_objectives_name_the_constraint(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Objective(**kwargs)


def test_metaplastic_counterparts():
    for spec in registry.point_entries():
        twin = metaplastic.metaplastic(spec.objective)
        assert twin.posterior == "diagonal"
        assert twin.likelihood == ("dot_diag" if spec.objective.likelihood == "dot" else spec.objective.likelihood)
        assert (twin.solver, twin.transition, twin.forgetting) == (
            spec.objective.solver, spec.objective.transition, spec.objective.forgetting)
    assert metaplastic.metaplastic(registry["mamba2"].objective) == registry["palimpsa"].objective
    assert metaplastic.metaplastic(registry["gated_deltanet"].objective) == registry["meta_gated_deltanet"].objective
    with pytest.raises(ValueError, match="full"):
        metaplastic.metaplastic(registry["mesanet"].objective)


def test_registry_contents_and_unknown_names():
    for name in ("linear_attention", "simple_gla", "mamba2", "gla", "deltanet", "gated_deltanet", "longhorn",
                 "mesanet", "palimpsa", "meta_mamba2", "meta_gated_deltanet"):
        spec = registry[name]
        assert spec.name == name and spec.citation and isinstance(spec.objective, Objective)
    with pytest.raises(KeyError, match="known: linear_attention"):
        registry["mamba3"]


def _inputs(B=1, T=3, H=2, K=4, V=3):
    x = random_inputs("linear_attention", B, T, H, K, V, dtype=torch.float32)
    return x["q"], x["k"], x["v"]


@pytest.mark.parametrize("name,kwargs,word", [
    ("mamba2", {}, "log_decay is required"),
    ("linear_attention", {"log_decay": torch.zeros(1, 3, 2)}, "forgetting == 'none'"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2, 4)}, "log_decay must be"),
    ("gla", {"log_decay": torch.zeros(1, 3, 2)}, "log_decay must be"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2), "b": torch.zeros(1, 3, 2)}, "b \\(importance rate\\)"),
    ("palimpsa", {"log_decay": torch.zeros(1, 3, 2), "b": torch.zeros(1, 3, 5)}, "b must be"),
    ("palimpsa", {"log_decay": torch.zeros(1, 3, 2), "beta": torch.zeros(1, 2, 2)}, "beta must be"),
    ("mesanet", {"log_decay": torch.zeros(1, 3, 2)}, "lam"),
    ("mesanet", {"log_decay": torch.zeros(1, 3, 2), "lam": torch.ones(2, 4), "beta": torch.ones(1, 3, 2, 3)},
     "per value channel"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2), "lam": torch.ones(2, 4)}, "lam is only used"),
    ("palimpsa", {"log_decay": torch.zeros(1, 3, 2), "prior_precision": -1.0}, "positive"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2), "initial_state": {"mu": torch.zeros(1, 2, 3, 4)}}, "missing 'S'"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2), "initial_state": {"S": torch.zeros(1, 2, 4, 3)}},
     "initial_state\\['S'\\] must be"),
    ("mamba2", {"log_decay": torch.zeros(1, 3, 2), "cu_seqlens": torch.tensor([0, 2])}, "cu_seqlens"),
])
def test_bad_inputs_raise_named_errors(name, kwargs, word):
    q, k, v = _inputs()
    with pytest.raises(ValueError, match=word):
        scan(registry[name].objective, q, k, v, **kwargs)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 4), H=st.integers(1, 3), K=st.integers(1, 5), V=st.integers(1, 5),
       dk=st.integers(-1, 1), dv=st.integers(-1, 1), which=st.sampled_from(["k", "v"]))
def test_shape_mismatches_are_rejected(B, T, H, K, V, dk, dv, which):
    """Any q/k/v whose shapes disagree raises ValueError; consistent shapes run."""
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    bad = (dk != 0 and which == "k" and K + dk >= 1) or (dv != 0 and which == "v" and T + dv >= 1)
    if which == "k" and dk != 0 and K + dk >= 1:
        k = torch.randn(B, T, H, K + dk)
    if which == "v" and dv != 0 and T + dv >= 1:
        v = torch.randn(B, T + dv, H, V)
    obj = registry["mamba2"].objective
    g = torch.zeros(B, T, H)
    if bad:
        with pytest.raises(ValueError):
            scan(obj, q, k, v, log_decay=g)
    else:
        assert scan(obj, q, k, v, log_decay=g).output.shape == (B, T, H, V)


def test_non_tensor_and_wrong_rank_inputs():
    obj = registry["linear_attention"].objective
    with pytest.raises(ValueError, match="4-d"):
        scan(obj, torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="Objective"):
        scan("mamba2", *_inputs())
