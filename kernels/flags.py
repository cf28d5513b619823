"""The constexpr switches of the fused recurrent kernel, derived from an :class:`~metaplastic.Objective`.

The Triton kernels do not know model names: they are specialised by these integers only, so every
registry entry (and any other valid objective) runs through the same code.

- ``POSTERIOR``: 0 point (state ``S``; precision the constant ``Ip``), 1 diagonal (``mu``, ``I``), 2 full
  (``G``, ``H``; read out by conjugate gradients).
- ``UPDATE`` (point and diagonal posteriors), the row form of the update, with ``m`` the prior mean row,
  ``P⁻`` the prior precision row and ``P = P⁻ + b k²`` (point: ``P⁻ = P = Ip``):
    0 ``HEBBIAN``      dot / dot_diag:                     ``mu = (P⁻ m + β v k) / P``
    1 ``GRADIENT``     regression, gradient:              ``mu = m + (β / P) (v − m·k) k``
    2 ``EXACT``        regression, exact, exact transition: ``mu = m + c (v − m·k) d``
    3 ``EXACT_DIAG``   regression, exact, diagonal transition: ``mu = m + c d ∘ (v − k ∘ m)``
  with ``d = k / P⁻`` and ``c = β / (1 + β d·k)`` (Sherman–Morrison). The full posterior ignores it.
- ``FORGET``: 0 none, 1 scalar (one ``α`` per head and token), 2 vector (one per key channel).
"""
from __future__ import annotations

from typing import Dict

from metaplastic.objective import Objective

POINT, DIAGONAL, FULL = 0, 1, 2
HEBBIAN, GRADIENT, EXACT, EXACT_DIAG = 0, 1, 2, 3
FORGET_NONE, FORGET_SCALAR, FORGET_VECTOR = 0, 1, 2


def kernel_flags(objective: Objective) -> Dict[str, int]:
    """The objective's settings as the kernel's ``tl.constexpr`` switches ``POSTERIOR, UPDATE, FORGET``."""
    posterior = {"point": POINT, "diagonal": DIAGONAL, "full": FULL}[objective.posterior]
    if objective.likelihood in ("dot", "dot_diag"):
        update = HEBBIAN
    elif objective.solver == "gradient":
        update = GRADIENT
    else:
        update = EXACT if objective.transition == "exact" else EXACT_DIAG
    forget = {"none": FORGET_NONE, "scalar": FORGET_SCALAR, "vector": FORGET_VECTOR}[objective.forgetting]
    return {"POSTERIOR": posterior, "UPDATE": update, "FORGET": forget}
