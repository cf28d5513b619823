"""The closed-form one-step updates of docs/theory.md#closed-forms, written once.

This module is the single source of truth for every model's update. It is written with array
operations only (``+ - * / @``, indexing with ``None``, ``.sum(-1)``), so the *same* functions run on

- torch tensors, batched ``[..., V, K]`` (the reference scan ``metaplastic.scan`` calls them), and
- numpy object arrays of sympy symbols with one leading batch axis, ``[1, V, K]``
  (``metaplastic.derivations`` evaluates them symbolically and proves they equal the stationary point of
  the free energy; the batch axis keeps ``.sum(-1)`` an array rather than a bare sympy expression).

A step is three stages, each selected by the objective's settings:

1. :func:`prior`    – stabilised forgetting ``p_t ∝ q_{t-1}^α p_0^{1-α}`` (posterior, forgetting);
2. :func:`update`   – the evidence of the token, minimised by the solver (likelihood, posterior, solver,
                      transition);
3. :func:`readout`  – ``o = scale · E[S] q`` and its predictive variance; the full posterior's
                      ``E[S] q = G (H + diag λ)^{-1} q`` solves exactly or, as a
                      :class:`~metaplastic.readout_solver.ReadoutSolver` asks, by conjugate gradients
                      (:func:`key_solution`; torch only).

Shapes. State tensors are value-first ``[..., V, K]`` (full posterior: ``G [..., V, K]``,
``H [..., K, K]``). ``q, k [..., K]``, ``v [..., V]``. Gates are already broadcast against ``[..., V, K]``:
``alpha`` is ``[..., 1, 1]`` (scalar forgetting) or ``[..., 1, K]`` (vector); ``beta`` and ``b`` are
``[..., 1, 1]`` (per head) or ``[..., V, 1]`` (per value row); ``Ip`` is ``[..., 1, 1]``; ``lam`` is
``[..., K]`` (the full posterior's prior key precision ``diag(λ)``).

State dictionaries, by posterior:

- ``point``:    ``{"S"}``        the memory matrix (its precision is the constant ``Ip``);
- ``diagonal``: ``{"mu", "I"}``  posterior mean and per-synapse precision (``M = I ∘ mu``);
- ``full``:     ``{"G", "H"}``   ``G = mu P`` and the data precision ``H``; ``P = H + diag(λ)``.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

from .objective import Objective
from .readout_solver import ReadoutSolver

State = Dict[str, Any]


class Gates(NamedTuple):
    """Per-step gates, broadcastable against ``[..., V, K]`` (see the module docstring)."""

    alpha: Any  # decay exp(g); 1 when forgetting == "none"
    beta: Any   # write rate
    b: Any      # importance rate (diagonal posterior only; 0 elsewhere)
    Ip: Any     # prior precision of p_0 (point and diagonal posteriors)
    lam: Any = None  # prior key precision λ (full posterior), [..., K]


def outer(v: Any, k: Any) -> Any:
    """``v ⊗ k``: ``[..., V] × [..., K] -> [..., V, K]``."""
    return v[..., :, None] * k[..., None, :]


def matvec(S: Any, k: Any) -> Any:
    """``S k``: ``[..., V, K] × [..., K] -> [..., V]``."""
    return (S * k[..., None, :]).sum(-1)


def _eye_like(H: Any) -> Any:
    try:
        import torch
        if isinstance(H, torch.Tensor):
            return torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    except ImportError:  # pragma: no cover
        pass
    import numpy as np
    return np.eye(H.shape[-1], dtype=object)


def solve(P: Any, q: Any) -> Any:
    """``P^{-1} q`` for a symmetric positive-definite ``P [..., K, K]`` and ``q [..., K]``."""
    try:
        import torch
        if isinstance(P, torch.Tensor):
            return torch.linalg.solve(P, q.unsqueeze(-1)).squeeze(-1)
    except ImportError:  # pragma: no cover
        pass
    import numpy as np
    import sympy
    x = sympy.Matrix(P).LUsolve(sympy.Matrix(list(q)))
    return np.array(list(x), dtype=object)


def prior(objective: Objective, state: State, gates: Gates) -> State:
    """Stabilised forgetting: the prior ``p_t`` as a state dictionary.

    precision ``Λ⁻ = α Λ + (1-α) Λ_0`` and precision-weighted mean ``Λ⁻ μ⁻ = α Λ μ``.
    """
    alpha = gates.alpha
    if objective.posterior == "point":
        # Λ = Λ_0 = Ip throughout, so Λ⁻ = Ip and μ⁻ = α S.
        return {"S": alpha * state["S"]}
    if objective.posterior == "diagonal":
        I_prior = alpha * state["I"] + (1 - alpha) * gates.Ip
        mu_prior = alpha * state["I"] * state["mu"] / I_prior
        return {"mu": mu_prior, "I": I_prior}
    # full: Λ = H + diag λ, so Λ⁻ = α H + diag λ; G = Λ μ scales by α.
    return {"G": alpha * state["G"], "H": alpha * state["H"]}


def update(objective: Objective, prior_state: State, k: Any, v: Any, gates: Gates) -> State:
    """The posterior after the token's evidence, as the solver reaches it (docs/theory.md#closed-forms)."""
    lik, post, solver, transition = (objective.likelihood, objective.posterior, objective.solver,
                                     objective.transition)
    beta, b, Ip = gates.beta, gates.b, gates.Ip
    k2 = k * k
    if post == "point":
        S = prior_state["S"]
        if lik == "dot":  # -β vᵀSk + (Ip/2)||S - S⁻||²  ->  S = S⁻ + (β/Ip) v⊗k
            return {"S": S + (beta / Ip) * outer(v, k)}
        residual = v - matvec(S, k)  # v - S⁻ k, [..., V]
        if solver == "gradient":  # one step of size 1/Ip on (β/2)||v - Sk||² from S⁻
            return {"S": S + (beta / Ip) * outer(residual, k)}
        # exact proximal step, Sherman–Morrison: ε = β / (Ip + β||k||²)
        eps = beta / (Ip + beta * k2.sum(-1)[..., None, None])
        if transition == "exact":
            return {"S": S + eps * outer(residual, k)}
        # diagonal transition: (I - ε k kᵀ) -> diag(1 - ε k²)
        return {"S": (1 - eps * k2[..., None, :]) * S + eps * outer(v, k)}

    if post == "diagonal":
        mu, I_prior = prior_state["mu"], prior_state["I"]
        I_new = I_prior + b * k2[..., None, :]
        if lik == "dot_diag":  # M = I⁻μ⁻ + β v⊗k ; μ = M / I
            return {"mu": (I_prior * mu + beta * outer(v, k)) / I_new, "I": I_new}
        residual = v - matvec(mu, k)  # v - μ⁻ k, row by row
        if solver == "gradient":  # preconditioned step with the posterior precision
            return {"mu": mu + (beta / I_new) * outer(residual, k), "I": I_new}
        # exact mean-field step per value row, Sherman–Morrison with D = diag(I⁻_i)
        k_over_D = k[..., None, :] / I_prior  # D_i^{-1} k, [..., V, K]
        c = beta / (1 + beta * (k_over_D * k[..., None, :]).sum(-1)[..., None])  # [..., V, 1]
        if transition == "exact":
            return {"mu": mu + c * residual[..., None] * k_over_D, "I": I_new}
        return {"mu": (1 - c * k[..., None, :] * k_over_D) * mu + c * v[..., :, None] * k_over_D, "I": I_new}

    # full posterior, regression, exact (recursive least squares)
    return {"G": prior_state["G"] + beta * outer(v, k), "H": prior_state["H"] + beta * outer(k, k)}


def _nonzero(d: Any) -> Any:
    """``d`` with exact zeros replaced by 1 (plain CG divides by ``p·Ap`` and ``r·r``; both are 0 only once the
    residual is exactly 0, where the step they scale is 0 anyway)."""
    import torch
    return torch.where(d == 0, torch.ones_like(d), d)


def conjugate_gradient(P: Any, q: Any, x: Any, steps: int, eps: float = 0.0) -> Any:
    """``steps`` conjugate-gradient steps on ``P x = q`` (``P [..., K, K]`` symmetric positive definite,
    ``q, x [..., K]``) from the guess ``x``; ``eps`` is added to both denominators (torch tensors)."""
    r = q - matvec(P, x)
    p = r
    rr = (r * r).sum(-1)[..., None]
    for _ in range(steps):
        Ap = matvec(P, p)
        pAp = (p * Ap).sum(-1)[..., None]
        alpha = rr / (pAp + eps if eps else _nonzero(pAp))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = (r * r).sum(-1)[..., None]
        p = r + (rr_new / (rr + eps if eps else _nonzero(rr))) * p
        rr = rr_new
    return x


def key_solution(objective: Objective, state: State, q: Any, gates: Gates, solver: Optional[ReadoutSolver] = None,
                 guess: Any = None) -> Any:
    """The full posterior's ``x = (H + diag λ)^{-1} q`` ``[..., K]`` as ``solver`` computes it (None: exact);
    ``guess`` is the previous token's ``x`` (``cg_start='previous'``; None: zeros). None for the other
    posteriors (their read-out needs no solve)."""
    if objective.posterior != "full":
        return None
    H = state["H"]
    P = H + _eye_like(H) * gates.lam[..., None, :]
    if solver is None or solver.is_exact:
        return solve(P, q)
    if solver.cg_start == "diagonal":
        x0 = q / ((P * _eye_like(H)).sum(-1) + solver.cg_eps)
    elif solver.cg_start == "previous" and guess is not None:
        x0 = guess
    else:
        x0 = 0 * q
    return conjugate_gradient(P, q, x0, solver.cg_steps, solver.cg_eps)


def readout(objective: Objective, state: State, q: Any, gates: Gates, scale: Any,
            output_variance: bool = False, solution: Any = None) -> Tuple[Any, Optional[Any]]:
    """``o = scale · E[S] q`` ``[..., V]`` and, if asked, ``Var[o]`` ``[..., V]`` (docs/theory.md#closed-forms). For the full
    posterior ``solution`` is ``(H + diag λ)^{-1} q`` as :func:`key_solution` gives it (None: solved exactly)."""
    post = objective.posterior
    if post == "point":
        if output_variance:
            raise ValueError("posterior='point' has no predictive variance (the memory is a point estimate)")
        return scale * matvec(state["S"], q), None
    if post == "diagonal":
        out = scale * matvec(state["mu"], q)
        var = scale * scale * matvec(1 / state["I"], q * q) if output_variance else None
        return out, var
    x = key_solution(objective, state, q, gates) if solution is None else solution
    out = scale * matvec(state["G"], x)
    var = None
    if output_variance:
        qPq = (q * x).sum(-1)[..., None]
        var = scale * scale * qPq + 0 * out
    return out, var


def step(objective: Objective, state: State, q: Any, k: Any, v: Any, gates: Gates, scale: Any,
         output_variance: bool = False, solver: Optional[ReadoutSolver] = None,
         guess: Any = None) -> Tuple[State, Any, Optional[Any], Any]:
    """One token: prior, update, then read out with the state *after* the token's own update. Returns the new
    state, the output, the variance (or None) and the full posterior's key solution (None otherwise), the
    ``guess`` of the next token under ``cg_start='previous'``."""
    new_state = update(objective, prior(objective, state, gates), k, v, gates)
    x = key_solution(objective, new_state, q, gates, solver, guess)
    out, var = readout(objective, new_state, q, gates, scale, output_variance, solution=x)
    return new_state, out, var, x
