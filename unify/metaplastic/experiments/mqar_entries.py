"""MQAR model entries: ``NAME``, ``NAME@floats``, ``NAME@shape`` and the ``b ≡ 0`` controls ``not_NAME[@...]``.

A leaf of the MQAR harness: :mod:`.mqar` (training) and :mod:`.mqar_compare` (the decision rule) both read
entries through :func:`parse_entry`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


def _uses_importance(name: str) -> bool:
    from metaplastic.registry import registry
    return bool(registry[name].objective.uses_importance_rate)


def _posterior(name: str) -> str:
    from metaplastic.registry import registry
    return registry[name].objective.posterior


def split_name(entry: str) -> Tuple[str, str]:
    """``"meta_mamba2@shape"`` -> ``("meta_mamba2", "shape")``; ``"mamba2"`` -> ``("mamba2", "")``."""
    name, _, accounting = entry.partition("@")
    return name, accounting


@dataclass(frozen=True)
class Entry:
    """A parsed model entry: ``mixer`` (a ``MIXERS`` name), ``accounting`` ("floats", "shape", or "" for a
    point posterior) and ``b_zero`` (a ``not_`` control: the metaplastic layer with b ≡ 0)."""

    text: str
    mixer: str
    accounting: str
    b_zero: bool

    @property
    def metaplastic(self) -> bool:
        """An importance path that is on (not a ``b ≡ 0`` control)."""
        return _uses_importance(self.mixer) and not self.b_zero

    @property
    def baseline(self) -> bool:
        """A point posterior or a ``b ≡ 0`` control."""
        return self.b_zero or self.accounting == ""


def parse_entry(entry: str) -> Entry:
    """Parse ``NAME``, ``NAME@floats``, ``NAME@shape`` (``@width``: the same) or ``not_NAME[@...]``
    (``ValueError`` naming the entry when it is not one)."""
    from metaplastic.models.mixers import MIXERS
    name, accounting = split_name(entry)
    b_zero = name.startswith("not_") and name not in MIXERS
    mixer = name[4:] if b_zero else name
    if mixer not in MIXERS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MIXERS)}, and not_NAME for a metaplastic NAME")
    if accounting not in ("", "floats", "shape", "width"):
        raise ValueError(f"{entry!r} has an unknown accounting @{accounting}; use @floats or @shape")
    if _posterior(mixer) == "point":
        if b_zero:
            raise ValueError(f"{entry!r}: {mixer!r} has no importance path; it is its own b ≡ 0 model")
        if accounting:
            raise ValueError(f"{entry!r}: a point-posterior model has no precision, @{accounting} equals {mixer!r}")
        return Entry(entry, mixer, "", False)
    if b_zero and not _uses_importance(mixer):
        raise ValueError(f"{entry!r}: {mixer!r} has no importance rate b to hold at 0")
    accounting = {"": "shape" if b_zero else "floats", "width": "shape"}.get(accounting, accounting)
    return Entry(entry, mixer, accounting, b_zero)
