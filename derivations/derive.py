"""Derive one step of any :class:`~metaplastic.Objective` from the free energy, with sympy.

Three stages, as in ``closed_forms`` (which this module checks, never copies):

1. **prior** – stabilised forgetting: ``log p_t = α log q_{t-1} + (1-α) log p_0`` is a quadratic form;
   its Hessian is the prior precision and its stationary point the prior mean.
2. **update** – minimise ``F_t`` of :mod:`.free_energy` over the posterior family:

   - ``solver="exact"``: solve the stationarity conditions, in the precision first (diagonal: in each
     variance ``s_ij = 1/I_ij``; full: in the key covariance ``Σ = P^{-1}``), then in the mean;
   - ``solver="gradient"``: the precision as for ``exact``; the mean by one gradient step on ``F_t`` from the
     prior mean, preconditioned by the posterior precision ``Λ_t`` (at the prior mean the KL term has zero
     gradient, so this is a step on the loss alone). docs/theory.md#the-free-energy-of-one-step writes the step as ``Λ⁻^{-1}``; for the
     point posterior ``Λ_t = Λ⁻ = Ip`` and the two agree, and for the diagonal posterior docs/theory.md#closed-forms
     (metaplastic Gated DeltaNet) uses ``β / I_t``, the posterior precision, which is what is derived here;
   - ``transition="diagonal"``: the exact mean is affine in the prior mean, ``m_i = A_i μ⁻_i + c_i`` per value
     row; replace ``A_i`` (the matrix that multiplies the old state) by its diagonal.
3. **readout** – ``o = scale · E_q[S] q`` and ``Var[o]_i = scale² qᵀ C_i q``.

Every expression is explicit (a symbol per entry, :mod:`.symbols`), at small sizes ``K, V``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import sympy

from metaplastic.objective import Objective

from .free_energy import col, free_energy, log_forgetting_prior, row
from .symbols import Array, StepSymbols, matrix, step_symbols, symmetric


@dataclass
class Derivation:
    """One step of ``objective`` derived from the free energy.

    ``prior``: the prior state (keys as ``closed_forms``) as expressions in ``symbols.state``;
    ``update``: the posterior state as expressions in ``symbols.prior_state``;
    ``output`` ``[V]`` and ``variance`` ``[V]`` (None for ``point``): the readout of ``symbols.state``;
    ``invariants``: expressions that the theory requires to vanish (e.g. the point posterior's prior
    precision staying ``Ip``).
    """

    objective: Objective
    symbols: StepSymbols
    prior: Dict[str, Array]
    update: Dict[str, Array]
    output: Array
    variance: Optional[Array]
    invariants: List[sympy.Expr] = field(default_factory=list)


def _eye(K: int) -> sympy.Matrix:
    return sympy.eye(K)


def _diag(x) -> sympy.Matrix:
    return sympy.diag(*list(x))


def _to_array(m: sympy.Matrix) -> Array:
    out = np.empty(m.shape, dtype=object)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            out[i, j] = m[i, j]
    return out


def _solve_linear(eqs: List[sympy.Expr], unknowns: List[sympy.Symbol]) -> Dict[sympy.Symbol, sympy.Expr]:
    """Solve equations that are linear in ``unknowns`` (raise if there is no unique solution)."""
    A, rhs = sympy.linear_eq_to_matrix([sympy.expand(e) for e in eqs], unknowns)
    sol = A.LUsolve(rhs)
    return {u: sympy.cancel(x) for u, x in zip(unknowns, sol)}


# --- stage 1: the prior -------------------------------------------------------------------------------

def _posterior_gaussian(posterior: str, state: Dict[str, Array], sy: StepSymbols):
    """``(mean [V, K] or None, precision(i), p_0 precision(i), natural [V, K] or None)`` of a state dictionary.

    The full posterior is given by its natural parameter ``G = μ P`` (its mean needs ``P^{-1}``).
    """
    K = sy.K
    Ip = sy.Ip[0, 0]
    if posterior == "point":
        return state["S"], (lambda i: Ip * _eye(K)), (lambda i: Ip * _eye(K)), None
    if posterior == "diagonal":
        I = state["I"]
        return state["mu"], (lambda i: _diag(I[i])), (lambda i: Ip * _eye(K)), None
    P = sympy.Matrix(state["H"]) + _diag(sy.lam)
    return None, (lambda i: P), (lambda i: _diag(sy.lam)), state["G"]


def _mean(posterior: str, state: Dict[str, Array], sy: StepSymbols) -> Array:
    """``E_q[S]`` ``[V, K]`` of a state dictionary."""
    mean, prec, _, natural = _posterior_gaussian(posterior, state, sy)
    if mean is not None:
        return mean
    return _to_array(sympy.Matrix(natural) * prec(0).inv())


def derive_prior(sy: StepSymbols) -> Tuple[Dict[str, Array], List[sympy.Expr]]:
    """The prior ``p_t`` of stabilised forgetting from ``sy.state``, and the invariants it must satisfy."""
    post = sy.objective.posterior
    V, K = sy.V, sy.K
    mean, prec, prec0, natural = _posterior_gaussian(post, sy.state, sy)
    x = matrix("x", V, K)
    logp = log_forgetting_prior(x, mean, prec, sy.alpha, prec0, per_synapse=post != "full", natural=natural)
    means, precisions = [], []
    for i in range(V):
        xi = list(x[i])
        precisions.append(-sympy.hessian(logp, xi))
        sol = _solve_linear([sympy.diff(logp, xj) for xj in xi], xi)
        means.append([sol[xj] for xj in xi])
    mean_p = np.array(means, dtype=object)
    invariants: List[sympy.Expr] = []
    if post == "point":  # the point posterior's precision must stay at Ip
        invariants += [precisions[i][a, b_] - (sy.Ip[0, 0] if a == b_ else 0)
                       for i in range(V) for a in range(K) for b_ in range(K)]
        return {"S": mean_p}, invariants
    if post == "diagonal":  # mean-field: no cross-synapse precision
        invariants += [precisions[i][a, b_] for i in range(V) for a in range(K) for b_ in range(K) if a != b_]
        I_p = np.array([[precisions[i][j, j] for j in range(K)] for i in range(V)], dtype=object)
        return {"mu": mean_p, "I": I_p}, invariants
    P = precisions[0]  # matrix normal: one key precision for every value row
    invariants += [precisions[i][a, b_] - P[a, b_] for i in range(1, V) for a in range(K) for b_ in range(K)]
    G = sympy.Matrix(mean_p) * P
    return {"G": _to_array(G.applyfunc(sympy.cancel)), "H": _to_array(P - _diag(sy.lam))}, invariants


# --- stage 2: the update ------------------------------------------------------------------------------

def _stationary_precision(post: str, F: sympy.Expr, sy: StepSymbols, s: Optional[Array],
                          sigma: Optional[Array]) -> Array:
    """Solve ``∂F/∂(covariance) = 0`` for the posterior precision: ``I [V, K]`` or ``P [K, K]``."""
    V, K = sy.V, sy.K
    if post == "diagonal":
        J = matrix("J", V, K, positive=True)
        I_new = np.empty((V, K), dtype=object)
        for i in range(V):
            for j in range(K):
                eq = sympy.diff(F, s[i, j]).subs(s[i, j], 1 / J[i, j])
                (sol,) = sympy.solve(sympy.numer(sympy.together(eq)), J[i, j])
                I_new[i, j] = sympy.cancel(sol)
        return I_new
    # full: Σ = P^{-1}, where the stationarity conditions are linear in P
    Psym = symmetric("p", K)
    Pinv = sympy.Matrix(Psym).inv()
    subs = {sigma[a, b_]: Pinv[a, b_] for a in range(K) for b_ in range(a, K)}
    unknowns = [Psym[a, b_] for a in range(K) for b_ in range(a, K)]
    eqs = []
    for a in range(K):
        for b_ in range(a, K):
            eq = sympy.cancel(sympy.diff(F, sigma[a, b_]).subs(subs))
            # multiply by det(P)^n to clear the inverse; the equation becomes linear in P's entries
            eqs.append(sympy.numer(sympy.together(eq)))
    sols = sympy.solve(eqs, unknowns, dict=True)
    sols = [sl for sl in sols if sympy.Matrix(Psym).subs(sl).det() != 0]
    if len(sols) != 1:
        raise ValueError(f"expected one stationary precision, found {len(sols)}")
    return _to_array(sympy.Matrix(Psym).subs(sols[0]).applyfunc(sympy.cancel))


def derive_update(sy: StepSymbols, likelihood: Optional[str] = None,
                  loss: Optional[Callable[..., sympy.Expr]] = None) -> Dict[str, Array]:
    """The posterior state after the token, from ``sy.prior_state``, by the objective's solver.

    ``likelihood`` and ``loss`` override the objective's (used by limit 3 to minimise a modified loss).
    """
    obj = sy.objective
    post, solver = obj.posterior, obj.solver
    lik = likelihood or obj.likelihood
    V, K = sy.V, sy.K
    mean_p, prec_p, _, natural_p = _posterior_gaussian(post, sy.prior_state, sy)
    m = matrix("m", V, K)
    s = sigma = None
    if post == "point":
        Ip = sy.Ip[0, 0]
        cov = lambda i: _eye(K) / Ip  # noqa: E731
    elif post == "diagonal":
        s = matrix("s", V, K, positive=True)
        cov = lambda i: _diag(s[i])  # noqa: E731
    else:
        sigma = symmetric("sigma", K)
        cov = lambda i: sympy.Matrix(sigma)  # noqa: E731
    F = free_energy(lik, post, m, cov, mean_p, prec_p, sy.k, sy.v, sy.beta, sy.b, loss=loss, prior_natural=natural_p)

    precision = None if post == "point" else _stationary_precision(post, F, sy, s, sigma)
    grad = [[sympy.diff(F, m[i, j]) for j in range(K)] for i in range(V)]
    if solver == "gradient":
        at_prior = {m[i, j]: mean_p[i, j] for i in range(V) for j in range(K)}
        pre = (lambda i, j: sy.Ip[0, 0]) if post == "point" else (lambda i, j: precision[i, j])
        mean = np.array([[sympy.cancel(mean_p[i, j] - grad[i][j].subs(at_prior) / pre(i, j)) for j in range(K)]
                         for i in range(V)], dtype=object)
    else:
        if precision is not None:  # the mean conditions do not involve the covariance, but be explicit
            cov_subs = ({s[i, j]: 1 / precision[i, j] for i in range(V) for j in range(K)} if post == "diagonal"
                        else dict(zip([sigma[a, b_] for a in range(K) for b_ in range(a, K)],
                                      [sympy.Matrix(precision).inv()[a, b_] for a in range(K) for b_ in range(a, K)])))
            grad = [[g.subs(cov_subs) for g in gr] for gr in grad]
        mean = np.empty((V, K), dtype=object)
        for i in range(V):
            sol = _solve_linear(grad[i], list(m[i]))
            for j in range(K):
                mean[i, j] = sol[m[i, j]]
        if obj.transition == "diagonal":
            mean = diagonal_transition(mean, mean_p)

    if post == "point":
        return {"S": mean}
    if post == "diagonal":
        return {"mu": mean, "I": precision}
    P = sympy.Matrix(precision)
    G = (sympy.Matrix(mean) * P).applyfunc(sympy.cancel)
    return {"G": _to_array(G), "H": _to_array(P - _diag(sy.lam))}


def diagonal_transition(mean: Array, prior_mean: Array) -> Array:
    """``m_i = A_i μ⁻_i + c_i`` -> ``diag(A_i) ∘ μ⁻_i + c_i`` for every value row ``i``."""
    V, K = mean.shape
    out = np.empty((V, K), dtype=object)
    for i in range(V):
        mi, pi = sympy.Matrix(list(mean[i])), list(prior_mean[i])
        A = mi.jacobian(pi)
        c = (mi - A * sympy.Matrix(pi)).applyfunc(sympy.cancel)
        for j in range(K):
            out[i, j] = A[j, j] * pi[j] + c[j]
    return out


# --- stage 3: the readout -----------------------------------------------------------------------------

def derive_readout(sy: StepSymbols) -> Tuple[Array, Optional[Array]]:
    """``o = scale · E_q[S] q`` ``[V]`` and ``Var[o]`` ``[V]`` (None for ``point``) of ``sy.state``."""
    post = sy.objective.posterior
    mean, prec = _mean(post, sy.state, sy), _posterior_gaussian(post, sy.state, sy)[1]
    qc = col(sy.q)
    out = np.array([sympy.cancel(sy.scale * (row(mean, i) * qc)[0, 0]) for i in range(sy.V)], dtype=object)
    if post == "point":
        return out, None
    var = np.array([sympy.cancel(sy.scale ** 2 * (qc.T * prec(i).inv() * qc)[0, 0]) for i in range(sy.V)],
                   dtype=object)
    return out, var


@functools.lru_cache(maxsize=None)
def derive(objective: Objective, K: int = 2, V: int = 2, beta_per_value: bool = True,
           b_per_value: bool = True) -> Derivation:
    """Derive prior, update and readout of ``objective`` at sizes ``K, V`` (cached within a process)."""
    sy = step_symbols(objective, K, V, beta_per_value, b_per_value)
    prior_state, invariants = derive_prior(sy)
    update = derive_update(sy)
    out, var = derive_readout(sy)
    return Derivation(objective, sy, prior_state, update, out, var, invariants)
