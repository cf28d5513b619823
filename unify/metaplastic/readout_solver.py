"""How the full posterior reads out: the solve of ``(H_t + diag λ) x = q_t`` behind ``o_t = G_t x``.

The objective (docs/theory.md#closed-forms) defines the read-out through the exact solution. MesaNet's published kernels
(fla's ``chunk_mesa_net`` and ``mesa_net_decoding_one_step``) replace it by a fixed number of
conjugate-gradient steps; :class:`ReadoutSolver` names that computation so it can be reproduced:

- ``method="exact"`` (default): a direct solve (the reference scan; the Triton recurrent kernel runs ``K``
  warm-started CG steps, exact in exact arithmetic);
- ``method="cg"``: ``cg_steps`` conjugate-gradient steps from the starting guess ``cg_start``:
  ``"zero"`` (``x_0 = 0`` for every token: fla's chunked forward and ``naive_mesa_net_CG``),
  ``"previous"`` (the previous token's solution; 0 at the first token of each sequence and of each call),
  ``"diagonal"`` (``x_0 = q / (diag(H) + λ + cg_eps)``: fla's one-token decoding step).

``cg_eps`` is added to both CG denominators (``α = r·r / (p·Ap + ε)``, ``β = r'·r' / (r·r + ε)``). Plain CG
has ``ε = 0`` (a zero denominator, reached only at exact convergence, then gives a zero step). fla's kernels
use ``ε = 1e-5``, which is not negligible: once ``r·r`` falls to about ``ε`` the steps shrink, so fla's
read-out stalls at a residual of order ``√ε ≈ 3e-3`` (for unit-norm ``q``) whatever the number of steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

METHODS = ("exact", "cg")
CG_STARTS = ("zero", "previous", "diagonal")


@dataclass(frozen=True)
class ReadoutSolver:
    """The read-out solve of the full posterior (see the module docstring). Invalid settings raise
    ``ValueError`` naming the field."""

    method: str = "exact"
    cg_steps: Optional[int] = None
    cg_start: str = "zero"
    cg_eps: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"readout method={self.method!r} is not one of {METHODS}")
        if self.method == "exact":
            if self.cg_steps is not None or self.cg_start != "zero" or self.cg_eps != 0.0:
                raise ValueError("cg_steps, cg_start and cg_eps apply to the read-out method 'cg' only, "
                                 f"not {self.method!r}")
            return
        steps = self.cg_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"cg_steps must be a non-negative int for the read-out method 'cg', got {steps!r}")
        if self.cg_start not in CG_STARTS:
            raise ValueError(f"cg_start={self.cg_start!r} is not one of {CG_STARTS}")
        eps = self.cg_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"cg_eps must be a finite number ≥ 0, got {eps!r}")

    @property
    def is_exact(self) -> bool:
        return self.method == "exact"

    def describe(self) -> str:
        if self.is_exact:
            return "exact"
        return f"cg (steps={self.cg_steps}, start={self.cg_start}, eps={self.cg_eps:g})"


EXACT = ReadoutSolver()


def readout_solver(readout: str = "exact", cg_steps: Optional[int] = None, cg_start: str = "zero",
                   cg_eps: float = 0.0) -> ReadoutSolver:
    """A :class:`ReadoutSolver` from the flat options a mixer stores (``readout``, ``cg_steps``, ...)."""
    return ReadoutSolver(readout, cg_steps, cg_start, float(cg_eps) if readout == "cg" else cg_eps)
