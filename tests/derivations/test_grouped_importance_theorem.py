"""The theorem of docs/theory.md#limit-8-grouped-importance (grouped importance): it holds, it is listed by ``verify --symbolic``, and a
wrong closed form makes it fail. The planted errors edit one line of the *source* of ``metaplastic.closed_forms``."""
import inspect
import types

import pytest

from metaplastic import closed_forms
from metaplastic.derivations.proofs import run_all, theorem_names
from metaplastic.verify import symbolic_checks

NAME = "grouped_importance_is_gla"


def test_the_theorem_holds_and_verify_symbolic_lists_it():
    assert NAME in theorem_names()
    (record,) = symbolic_checks([NAME])
    assert record.name == NAME and record.holds, record.details
    assert len(record.checks) >= 5 and all(record.checks.values())


def _mutated_closed_forms(old: str, new: str) -> types.ModuleType:
    source = inspect.getsource(closed_forms)
    assert source.count(old) == 1, f"fragment not found once in closed_forms.py: {old!r}"
    module = types.ModuleType("planted_closed_forms")
    module.__package__ = "metaplastic"
    exec(compile(source.replace(old, new), "planted_closed_forms.py", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize("old,new", [
    ("I_new = I_prior + b * k2[..., None, :]", "I_new = I_prior + b * k[..., None, :]"),  # b k instead of b k²
    ("(I_prior * mu + beta * outer(v, k)) / I_new", "(I_prior * mu + beta * outer(v, k)) / I_prior"),
    ("I_prior = alpha * state[\"I\"] + (1 - alpha) * gates.Ip", "I_prior = alpha * state[\"I\"] + gates.Ip"),
], ids=["precision gains b k", "mean divided by the prior precision", "prior precision not relaxed"])
def test_a_wrong_closed_form_makes_it_fail(old, new):
    (record,) = run_all([NAME], closed_form=_mutated_closed_forms(old, new))
    assert not record.holds
    assert record.details
