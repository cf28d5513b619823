"""Which backend covers which settings: the coverage rules of the backends, without Triton.

Two levels. The reasons (``chunk_reason``, ``per_value_reason``, ``triton_chunk_reason``) return why a path
cannot run some settings (a one-line reason), or None when it can; the paths themselves ask them too. The
coverage rules (:data:`COVERAGE`, one per concrete backend) take the backend's name and the :class:`Settings`
of a call and return the whole refusal message (``backend='chunk' cannot run ...: reason``, or
``backend='triton_chunk': <why Triton cannot run on this device>``), or None when the backend covers them.
The dispatcher (:mod:`metaplastic.kernels.dispatch`) pairs each rule with its run, so no path imports the
dispatcher and importing the rules never imports Triton.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from metaplastic.objective import Objective

from .entry import rows_constant_in_groups, triton_unavailable_reason

Tensor = torch.Tensor


def chunk_reason(objective: Objective) -> Optional[str]:
    """Why the chunked path (``chunk``) cannot run ``objective`` (None when it can)."""
    if objective.likelihood in ("dot", "dot_diag"):
        return None
    return (f"the chunked path covers likelihood 'dot' and 'dot_diag' only, not {objective.likelihood!r} "
            f"(posterior={objective.posterior!r}): use backend='triton' or 'reference'")


def per_value_reason(objective: Objective) -> Optional[str]:
    """Why the per-value Palimpsa kernel (``triton_per_value``) cannot run ``objective`` (None when it can)."""
    if not (objective.likelihood == "dot_diag" and objective.posterior == "diagonal"):
        return ("the per-value kernel runs likelihood 'dot_diag' with posterior 'diagonal', not "
                f"{objective.describe()}")
    if objective.forgetting == "vector":
        return "the per-value kernel supports forgetting 'none' or 'scalar', not 'vector'"
    return None


def triton_chunk_reason(objective: Objective, b: Optional[Tensor], initial_state: Optional[Dict[str, Tensor]],
                        check_values: Optional[bool] = None, V: Optional[int] = None) -> Optional[str]:
    """Why the chunked Triton path (``triton_chunk``) cannot run these settings (None when it can). ``V``: the
    value width (None: a 4-d ``b`` counts as per value channel)."""
    reason = chunk_reason(objective)
    if reason is not None:
        return reason.replace("the chunked path", "the chunked Triton path")
    if objective.forgetting == "vector":
        return "the chunked Triton path supports forgetting 'none' or 'scalar', not 'vector' (GLA)"
    if objective.likelihood == "dot_diag":
        groups = 1 if b is None or b.dim() == 3 else b.shape[-1]
        if b is not None and b.dim() == 4 and (V is None or (groups == V and V > 1) or V % groups):
            return ("the chunked Triton path needs a head-shared importance rate b [B,T,H] "
                    "(docs/theory.md#limit-7-head-shared-importance) or one per group of value rows [B,T,H,G] "
                    "(limit 8); b is per value channel [B,T,H,V]")
        I0 = None if initial_state is None else initial_state.get("I")
        if isinstance(I0, Tensor) and I0.dim() == 4:
            if I0.shape[2] % groups or not rows_constant_in_groups(I0, groups, check_values):
                return ("the chunked Triton path needs an initial precision I that is constant over the value "
                        "rows of each importance group")
    return None


# --- the coverage rule of each concrete backend -------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """What a coverage rule looks at: the objective, the tensors' device, the importance rate ``b``
    (``[B,T,H]``, ``[B,T,H,G]`` or ``[B,T,H,V]``; None), the initial state, ``check_values`` and the value
    width ``V`` (None: a 4-d ``b`` counts as per value channel)."""

    objective: Objective
    device: torch.device
    b: Optional[Tensor] = None
    initial_state: Optional[Dict[str, Tensor]] = None
    check_values: Optional[bool] = None
    V: Optional[int] = None


#: ``rule(backend name, settings)``: the refusal message, or None when the backend covers the settings.
Rule = Callable[[str, Settings], Optional[str]]


def covers_all(name: str, settings: Settings) -> Optional[str]:
    """The rule of a backend that runs every objective on every device."""
    return None


def by_settings(reason: Callable[[Settings], Optional[str]]) -> Rule:
    """The rule refusing what ``reason`` names: ``backend=NAME cannot run <objective>: <reason>``."""
    def rule(name: str, settings: Settings) -> Optional[str]:
        why = reason(settings)
        return None if why is None else f"backend={name!r} cannot run {settings.objective.describe()}: {why}"
    return rule


def on_triton(rule: Rule) -> Rule:
    """``rule`` behind the Triton check: ``backend=NAME: <why Triton cannot run on the device>`` first."""
    def checked(name: str, settings: Settings) -> Optional[str]:
        why = triton_unavailable_reason(settings.device)
        return f"backend={name!r}: {why}" if why is not None else rule(name, settings)
    return checked


#: The coverage rule of every concrete backend (the dispatcher's table pairs each with its run).
COVERAGE: Dict[str, Rule] = {
    "reference": covers_all,
    "chunk": by_settings(lambda s: chunk_reason(s.objective)),
    "triton_chunk": on_triton(by_settings(lambda s: triton_chunk_reason(s.objective, s.b, s.initial_state,
                                                                        s.check_values, s.V))),
    "triton_per_value": on_triton(by_settings(lambda s: per_value_reason(s.objective))),
    "triton_recurrent": on_triton(covers_all),
}
