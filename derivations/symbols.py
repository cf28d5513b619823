"""Symbols of one step at explicit small sizes: a symbol for every gate, key, value, state entry and precision.

Arrays are numpy object arrays of sympy expressions, unbatched and value-first: states ``[V, K]`` (``H``:
``[K, K]``, symmetric), ``q, k [K]``, ``v [V]``. Gates follow ``closed_forms``' broadcasting: ``alpha``
``[1, 1]`` (scalar forgetting; the constant 1 for ``forgetting='none'``) or ``[1, K]`` (vector); ``beta`` and
``b`` ``[1, 1]`` or ``[V, 1]``; ``Ip`` ``[1, 1]``; ``lam`` ``[K]``.

:meth:`StepSymbols.batched` adds the leading batch axis of size 1 under which ``closed_forms`` is called
(its reductions ``.sum(-1)[..., None]`` need an array, not a scalar, after the sum).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import sympy

from metaplastic.closed_forms import Gates
from metaplastic.objective import Objective

Array = np.ndarray
_LATEX = {"mu": r"\mu", "alpha": r"\alpha", "beta": r"\beta", "lam": r"\lambda"}


def _name(base: str, idx: str, minus: bool) -> str:
    head = _LATEX.get(base, base)
    return f"{head}^{{-}}_{{{idx}}}" if minus else (f"{head}_{{{idx}}}" if idx else head)


def matrix(base: str, rows: int, cols: int, minus: bool = False, **assumptions) -> Array:
    """``[rows, cols]`` symbols ``base_{ij}`` (1-based), e.g. ``\\mu_{12}``."""
    out = np.empty((rows, cols), dtype=object)
    for i in range(rows):
        for j in range(cols):
            out[i, j] = sympy.Symbol(_name(base, f"{i + 1}{j + 1}", minus), **assumptions)
    return out


def symmetric(base: str, n: int, minus: bool = False, **assumptions) -> Array:
    """``[n, n]`` symmetric matrix of symbols (``base_{ij} = base_{ji}``)."""
    out = np.empty((n, n), dtype=object)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = sympy.Symbol(_name(base, f"{i + 1}{j + 1}", minus), **assumptions)
    return out


def vector(base: str, n: int, **assumptions) -> Array:
    """``[n]`` symbols ``base_{i}``."""
    return np.array([sympy.Symbol(_name(base, str(i + 1), False), **assumptions) for i in range(n)], dtype=object)


def scalar(base: str, **assumptions) -> sympy.Symbol:
    return sympy.Symbol(_name(base, "", False), **assumptions)


def state_symbols(posterior: str, V: int, K: int, minus: bool = False) -> Dict[str, Array]:
    """The state dictionary of ``posterior`` as symbols; ``minus`` names the prior ``p_t`` (``\\mu^-`` ...)."""
    if posterior == "point":
        return {"S": matrix("S", V, K, minus)}
    if posterior == "diagonal":
        return {"mu": matrix("mu", V, K, minus), "I": matrix("I", V, K, minus, positive=True)}
    return {"G": matrix("G", V, K, minus), "H": symmetric("H", K, minus)}


@dataclass
class StepSymbols:
    """Everything one step of ``objective`` reads, as symbols (see the module docstring for shapes)."""

    objective: Objective
    K: int
    V: int
    state: Dict[str, Array]        # the posterior q_{t-1} (or any posterior to read out)
    prior_state: Dict[str, Array]  # the prior p_t, the input of the update stage
    q: Array
    k: Array
    v: Array
    alpha: Array
    beta: Array
    b: Array
    Ip: Array
    lam: Optional[Array]
    scale: sympy.Symbol

    def gates(self) -> Gates:
        """Unbatched gates for ``closed_forms``."""
        return Gates(alpha=self.alpha, beta=self.beta, b=self.b, Ip=self.Ip, lam=self.lam)

    def batched_gates(self) -> Gates:
        """Gates with the leading batch axis of size 1."""
        return Gates(alpha=self.alpha[None], beta=self.beta[None], b=self.b[None], Ip=self.Ip[None],
                     lam=None if self.lam is None else self.lam[None])


def step_symbols(objective: Objective, K: int = 2, V: int = 2, beta_per_value: bool = True,
                 b_per_value: bool = True) -> StepSymbols:
    """Symbols for one step of ``objective`` at key size ``K`` and value size ``V``.

    ``beta_per_value`` gives every value row its own write rate ``β_i`` (not allowed for ``full``);
    ``b_per_value`` does the same for the importance rate of a diagonal posterior.
    """
    post = objective.posterior
    if post == "full":
        beta_per_value = False
    one = np.array([[sympy.Integer(1)]], dtype=object)
    if objective.forgetting == "none":
        alpha = one
    elif objective.forgetting == "scalar":
        alpha = np.array([[scalar("alpha", positive=True)]], dtype=object)
    else:
        alpha = vector("alpha", K, positive=True)[None, :]
    beta = (vector("beta", V, positive=True)[:, None] if beta_per_value
            else np.array([[scalar("beta", positive=True)]], dtype=object))
    if post == "diagonal":
        b = (vector("b", V, positive=True)[:, None] if b_per_value
             else np.array([[scalar("b", positive=True)]], dtype=object))
    else:
        b = np.array([[sympy.Integer(0)]], dtype=object)
    Ip = np.array([[sympy.Symbol("I_{p}", positive=True)]], dtype=object)
    lam = vector("lam", K, positive=True) if post == "full" else None
    return StepSymbols(objective=objective, K=K, V=V, state=state_symbols(post, V, K),
                       prior_state=state_symbols(post, V, K, minus=True), q=vector("q", K), k=vector("k", K),
                       v=vector("v", V), alpha=alpha, beta=beta, b=b, Ip=Ip, lam=lam,
                       scale=scalar("scale", positive=True))
