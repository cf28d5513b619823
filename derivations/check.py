"""Compare a :class:`~.derive.Derivation` with the registry's closed forms, entry by entry.

The closed forms are obtained by *calling* ``metaplastic.closed_forms`` (or a stand-in passed as
``closed_form``, e.g. a deliberately wrong one in the tests) on numpy object arrays of the same symbols.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import sympy

from metaplastic import closed_forms

from .derive import Derivation
from .symbols import Array, StepSymbols


def is_zero(expr: Any) -> bool:
    """``simplify(expr) == 0``, with ``cancel`` first: for a rational function ``cancel`` is decisive."""
    expr = sympy.sympify(expr)
    if expr == 0:
        return True
    reduced = sympy.cancel(sympy.together(expr))
    if reduced == 0:
        return True
    if reduced.is_rational_function(*reduced.free_symbols):
        return False
    return sympy.simplify(reduced) == 0


def resolve(closed_form: Optional[Any]) -> Any:
    """The closed forms to check: ``metaplastic.closed_forms`` unless a stand-in is given."""
    return closed_forms if closed_form is None else closed_form


def _batched(state: Dict[str, Array]) -> Dict[str, Array]:
    return {key: x[None] for key, x in state.items()}


def closed_form_prior(sy: StepSymbols, closed_form: Any = None) -> Dict[str, Array]:
    """``closed_form.prior`` of ``sy.state`` (unbatched result)."""
    cf = resolve(closed_form)
    out = cf.prior(sy.objective, _batched(sy.state), sy.batched_gates())
    return {key: np.asarray(x, dtype=object)[0] for key, x in out.items()}


def closed_form_update(sy: StepSymbols, closed_form: Any = None, prior_state: Optional[Dict[str, Array]] = None,
                       gates=None) -> Dict[str, Array]:
    """``closed_form.update`` of ``prior_state`` (default ``sy.prior_state``) with ``sy``'s key and value."""
    cf = resolve(closed_form)
    prior_state = sy.prior_state if prior_state is None else prior_state
    gates = sy.batched_gates() if gates is None else gates
    out = cf.update(sy.objective, _batched(prior_state), sy.k[None], sy.v[None], gates)
    return {key: np.asarray(x, dtype=object)[0] for key, x in out.items()}


def closed_form_readout(sy: StepSymbols, closed_form: Any = None, state: Optional[Dict[str, Array]] = None
                        ) -> Tuple[Array, Optional[Array]]:
    """``closed_form.readout`` of ``state`` (default ``sy.state``): ``(output [V], variance [V] or None)``.

    The full posterior is read unbatched and without variance: its sympy solve takes one ``[K, K]`` matrix.
    """
    cf = resolve(closed_form)
    state = sy.state if state is None else state
    post = sy.objective.posterior
    if post == "full":
        out, _ = cf.readout(sy.objective, state, sy.q, sy.gates(), sy.scale, output_variance=False)
        return np.asarray(out, dtype=object), None
    out, var = cf.readout(sy.objective, _batched(state), sy.q[None], sy.batched_gates(), sy.scale,
                          output_variance=post != "point")
    return np.asarray(out, dtype=object)[0], (None if var is None else np.asarray(var, dtype=object)[0])


@dataclass
class Comparison:
    """Result of :func:`compare`: ``holds`` and, when it does not, which entries differ."""

    holds: bool
    mismatches: List[str] = field(default_factory=list)
    differences: Dict[str, sympy.Expr] = field(default_factory=dict)


def compare_arrays(label: str, derived: Array, expected: Array, result: Comparison) -> None:
    """Record every entry where ``derived - expected`` does not simplify to zero."""
    derived = np.asarray(derived, dtype=object)
    expected = np.broadcast_to(np.asarray(expected, dtype=object), derived.shape)
    for idx in np.ndindex(derived.shape):
        diff = sympy.sympify(derived[idx]) - sympy.sympify(expected[idx])
        if not is_zero(diff):
            name = f"{label}[{','.join(str(i + 1) for i in idx)}]"
            result.holds = False
            result.mismatches.append(name)
            result.differences[name] = sympy.cancel(diff)


def compare(derivation: Derivation, closed_form: Any = None) -> Comparison:
    """Derived prior, update and readout against the closed forms, entry by entry."""
    sy = derivation.symbols
    result = Comparison(True)
    for n, expr in enumerate(derivation.invariants):
        if not is_zero(expr):
            result.holds = False
            result.mismatches.append(f"invariant {n}")
    prior = closed_form_prior(sy, closed_form)
    for key, derived in derivation.prior.items():
        compare_arrays(f"prior {key}", derived, prior[key], result)
    update = closed_form_update(sy, closed_form)
    for key, derived in derivation.update.items():
        compare_arrays(f"update {key}", derived, update[key], result)
    out, var = closed_form_readout(sy, closed_form)
    compare_arrays("output", derivation.output, out, result)
    if var is not None:
        compare_arrays("variance", derivation.variance, var, result)
    return result


def closed_form_step(objective, state: Dict[str, Array], q: Array, k: Array, v: Array, gates,
                     scale: Any, closed_form: Any = None) -> Tuple[Dict[str, Array], Array, Optional[Array]]:
    """One token of ``objective`` by the closed forms (prior, update, readout), unbatched in and out.

    ``gates`` are unbatched (``closed_forms.Gates`` of arrays as in :mod:`.symbols`).
    """
    cf = resolve(closed_form)
    bgates = type(gates)(*[None if g is None else np.asarray(g, dtype=object)[None] for g in gates])
    prior = cf.prior(objective, _batched(state), bgates)
    new = cf.update(objective, prior, k[None], v[None], bgates)
    new = {key: np.asarray(x, dtype=object)[0] for key, x in new.items()}
    if objective.posterior == "full":
        out, _ = cf.readout(objective, new, q, gates, scale, output_variance=False)
        return new, np.asarray(out, dtype=object), None
    out, var = cf.readout(objective, _batched(new), q[None], bgates, scale,
                          output_variance=objective.posterior != "point")
    return new, np.asarray(out, dtype=object)[0], (None if var is None else np.asarray(var, dtype=object)[0])


def all_zero(arr: Any) -> bool:
    """Every entry of ``arr`` simplifies to zero."""
    return all(is_zero(x) for x in np.ravel(np.asarray(arr, dtype=object)))
