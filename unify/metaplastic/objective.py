"""The one free-energy objective (docs/theory.md#the-free-energy-of-one-step) and its settings.

A memory model is five settings of

    F_t[q] = E_q[ l_t(S) ] + KL(q || p_t),   p_t ∝ q_{t-1}^{α_t} · p_0^{1-α_t}

- ``likelihood``: the loss l_t a token brings: ``dot`` (-β vᵀSk), ``dot_diag`` (dot plus the diagonal
  of the regression curvature, weighted by the importance rate b), ``regression`` ((β/2)||v - Sk||²);
- ``posterior``: the family of q(S): ``point`` (precision fixed at Ip), ``diagonal`` (one precision per
  synapse, mean-field), ``full`` (a K×K key precision shared by all value rows);
- ``solver``: ``exact`` (stationary point of F_t) or ``gradient`` (one preconditioned gradient step);
- ``transition``: ``exact`` or ``diagonal`` (replace the matrix that multiplies the old state by its
  diagonal, as LongHorn does);
- ``forgetting``: ``none`` (α ≡ 1), ``scalar`` (one α per head and token) or ``vector`` (one per key channel).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

LIKELIHOODS = ("dot", "dot_diag", "regression")
POSTERIORS = ("point", "diagonal", "full")
SOLVERS = ("exact", "gradient")
TRANSITIONS = ("exact", "diagonal")
FORGETTINGS = ("none", "scalar", "vector")


@dataclass(frozen=True)
class Objective:
    """Settings of the free energy. Invalid combinations raise ``ValueError`` naming the constraint."""

    likelihood: str = "dot"
    posterior: str = "point"
    solver: str = "exact"
    transition: str = "exact"
    forgetting: str = "scalar"

    def __post_init__(self) -> None:
        for field, allowed in (
            ("likelihood", LIKELIHOODS),
            ("posterior", POSTERIORS),
            ("solver", SOLVERS),
            ("transition", TRANSITIONS),
            ("forgetting", FORGETTINGS),
        ):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field}={value!r} is not one of {allowed}")
        lik, post, solver = self.likelihood, self.posterior, self.solver
        if lik == "dot" and post != "point":
            raise ValueError(
                f"likelihood='dot' has no curvature, so posterior={post!r} would never accumulate precision: "
                "use likelihood='dot_diag' or 'regression' (metaplastic() does this)")
        if lik == "dot_diag" and post != "diagonal":
            raise ValueError(
                f"likelihood='dot_diag' carries a per-synapse curvature and needs posterior='diagonal', not {post!r}")
        if lik != "regression" and solver == "gradient":
            raise ValueError(
                f"solver='gradient' is defined for likelihood='regression' only (for {lik!r} the exact step is "
                "already the preconditioned gradient step): use solver='exact'")
        if post == "full" and solver != "exact":
            raise ValueError("posterior='full' is defined with solver='exact' only (MesaNet's recursive least squares)")
        if post == "full" and self.forgetting == "vector":
            raise ValueError("posterior='full' needs forgetting='none' or 'scalar', not 'vector': a per-channel decay of a K×K "
                             "key precision is not defined by the theory")
        if self.transition == "diagonal" and not (lik == "regression" and solver == "exact" and post != "full"):
            raise ValueError("transition='diagonal' applies to the exact regression step with a point or diagonal "
                             "posterior only (LongHorn and its metaplastic twin)")

    @property
    def uses_importance_rate(self) -> bool:
        """True when the importance rate ``b`` enters the update (the diagonal posterior)."""
        return self.posterior == "diagonal"

    def describe(self) -> str:
        return (f"likelihood={self.likelihood}, posterior={self.posterior}, solver={self.solver}, "
                f"transition={self.transition}, forgetting={self.forgetting}")


def metaplastic(objective: Objective) -> Objective:
    """The metaplastic counterpart of ``objective`` (docs/theory.md#limit-2-metaplastic-twins).

    The posterior becomes ``diagonal`` and a ``dot`` likelihood becomes ``dot_diag`` (a ``dot`` loss has no
    curvature, so without the diagonal term no precision would accumulate); everything else is kept.
    A diagonal objective is returned unchanged; a full posterior has no metaplastic counterpart.
    """
    if objective.posterior == "diagonal":
        return objective
    if objective.posterior == "full":
        raise ValueError("posterior='full' already keeps a precision; its diagonal restriction is limit 6, "
                         "not metaplastic()")
    likelihood = "dot_diag" if objective.likelihood == "dot" else objective.likelihood
    return replace(objective, likelihood=likelihood, posterior="diagonal")
