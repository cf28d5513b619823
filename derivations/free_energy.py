"""The one-step free energy ``F_t[q] = E_q[l_t(S)] + KL(q || p_t)`` of docs/theory.md#the-free-energy-of-one-step, written from the theory.

Nothing here is a model's update: this module only writes down Gaussian densities, expected losses and
KL divergences. :mod:`metaplastic.derivations.derive` minimises them.

The posterior ``q`` is Gaussian with mean ``m [V, K]`` and, per value row ``i``, a key covariance
``C_i [K, K]``:

- ``point``:    ``C_i = I / Ip`` (fixed: the precision is not a state);
- ``diagonal``: ``C_i = diag(s_i)``, one variance ``s_ij = 1 / I_ij`` per synapse (mean-field);
- ``full``:     ``C_i = Σ`` for every row (matrix normal, key precision ``P = Σ^{-1}``).

Expected losses (``E_q[S_ij S_ij'] = m_ij m_ij' + C_i[j, j']``):

- ``dot``:        ``-Σ_i β_i v_i (m_i · k)``
- ``dot_diag``:   ``dot + Σ_i (b_i / 2) Σ_j k_j² (m_ij² + C_i[j, j])``
- ``regression``: ``Σ_i (β_i / 2) (v_i - m_i · k)² + (c_i / 2) kᵀ C_i k`` with curvature weight ``c_i = β_i``,
  except for the diagonal posterior, where ``c_i = b_i``: docs/theory.md#closed-forms keeps the importance rate ``b`` free
  ("a free b is an architecture choice"; ``b = β`` is the pure Bayesian free energy).
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import sympy

Array = np.ndarray
Cov = Callable[[int], sympy.Matrix]  # value row i -> its K×K covariance


def row(m: Array, i: int) -> sympy.Matrix:
    """Row ``i`` of a ``[V, K]`` array as a ``1×K`` sympy matrix."""
    return sympy.Matrix([list(m[i])])


def col(x: Array) -> sympy.Matrix:
    """A ``[K]`` array as a ``K×1`` sympy matrix."""
    return sympy.Matrix(list(x))


def expected_loss(likelihood: str, posterior: str, m: Array, cov: Cov, k: Array, v: Array, beta: Array,
                  b: Array) -> sympy.Expr:
    """``E_q[l_t(S)]`` for a Gaussian ``q`` with mean ``m [V, K]`` and row covariances ``cov(i)``.

    ``beta`` and ``b`` are ``[1, 1]`` or ``[V, 1]`` (per value row).
    """
    V, K = m.shape
    kc = col(k)
    total = sympy.Integer(0)
    for i in range(V):
        beta_i = beta[min(i, beta.shape[0] - 1), 0]
        b_i = b[min(i, b.shape[0] - 1), 0]
        score = (row(m, i) * kc)[0, 0]
        C = cov(i)
        if likelihood in ("dot", "dot_diag"):
            total += -beta_i * v[i] * score
            if likelihood == "dot_diag":
                total += b_i / 2 * sum(k[j] ** 2 * (m[i, j] ** 2 + C[j, j]) for j in range(K))
        else:
            curvature = b_i if posterior == "diagonal" else beta_i
            total += beta_i / 2 * (v[i] - score) ** 2 + curvature / 2 * (kc.T * C * kc)[0, 0]
    return total


def kl_gaussian_rows(m: Array, cov: Cov, prior_mean: Optional[Array], prior_precision: Callable[[int], sympy.Matrix],
                     prior_natural: Optional[Array] = None) -> sympy.Expr:
    """``KL(q || p)`` for independent value rows, ``q_i = N(m_i, C_i)``, ``p_i = N(μ⁻_i, P⁻_i^{-1})``:

    ``Σ_i ½ [tr(P⁻_i C_i) + (m_i - μ⁻_i) P⁻_i (m_i - μ⁻_i)ᵀ - K - log det(P⁻_i C_i)]``.

    Given ``prior_natural`` ``η_i = μ⁻_i P⁻_i`` instead of ``prior_mean``, the mean term is written
    ``m_i P⁻_i m_iᵀ - 2 m_i η_iᵀ``: the same KL up to ``μ⁻_i P⁻_i μ⁻_iᵀ``, a constant of ``q`` (no inverse of
    ``P⁻`` is formed, which keeps the full posterior's algebra small).
    """
    V, K = m.shape
    total = sympy.Integer(0)
    for i in range(V):
        P, C = prior_precision(i), cov(i)
        if prior_natural is None:
            d = row(m, i) - row(prior_mean, i)
            mean_term = (d * P * d.T)[0, 0]
        else:
            mi = row(m, i)
            mean_term = (mi * P * mi.T)[0, 0] - 2 * (mi * row(prior_natural, i).T)[0, 0]
        total += sympy.Rational(1, 2) * ((P * C).trace() + mean_term - K - sympy.log((P * C).det()))
    return total


def free_energy(likelihood: str, posterior: str, m: Array, cov: Cov, prior_mean: Optional[Array],
                prior_precision: Callable[[int], sympy.Matrix], k: Array, v: Array, beta: Array,
                b: Array, loss: Optional[Callable[..., sympy.Expr]] = None,
                prior_natural: Optional[Array] = None) -> sympy.Expr:
    """``F_t = E_q[l_t] + KL(q || p_t)`` (up to a constant of ``q``); ``loss`` replaces :func:`expected_loss`
    (same signature); ``prior_natural`` as in :func:`kl_gaussian_rows`."""
    loss = loss or expected_loss
    return (loss(likelihood, posterior, m, cov, k, v, beta, b)
            + kl_gaussian_rows(m, cov, prior_mean, prior_precision, prior_natural))


def log_forgetting_prior(x: Array, mean: Optional[Array], precision: Callable[[int], sympy.Matrix], alpha: Array,
                         prior0_precision: Callable[[int], sympy.Matrix], per_synapse: bool,
                         natural: Optional[Array] = None) -> sympy.Expr:
    """``log p_t(x) = α log q_{t-1}(x) + (1-α) log p_0(x)`` up to a constant (stabilised forgetting).

    ``q_{t-1} = N(mean_i, precision(i)^{-1})`` per value row, ``p_0 = N(0, prior0_precision(i)^{-1})``.
    With ``per_synapse`` (point and diagonal posteriors, whose densities factorise over synapses) ``α`` may
    differ per key channel (``alpha [1, K]``) and weights each synapse's factor; otherwise ``α`` is a scalar
    and ``q_{t-1}`` may be given by its natural parameter ``natural`` (``η_i = mean_i precision(i)``) instead.
    """
    V, K = x.shape
    total = sympy.Integer(0)
    for i in range(V):
        P, P0 = precision(i), prior0_precision(i)
        xi = row(x, i)
        if per_synapse:
            d = xi - row(mean, i)
            for j in range(K):
                a = alpha[0, min(j, alpha.shape[1] - 1)]
                total += -a / 2 * P[j, j] * d[j] ** 2 - (1 - a) / 2 * P0[j, j] * xi[j] ** 2
        else:
            a = alpha[0, 0]
            if natural is None:
                d = xi - row(mean, i)
                log_q = -(d * P * d.T)[0, 0] / 2
            else:  # the same up to a constant of x
                log_q = -(xi * P * xi.T)[0, 0] / 2 + (xi * row(natural, i).T)[0, 0]
            total += a * log_q - (1 - a) / 2 * (xi * P0 * xi.T)[0, 0]
    return total
