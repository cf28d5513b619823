"""Symbolic derivations: every closed form out of the free energy, the limits between models, Table 1.

>>> from metaplastic.derivations import run_all
>>> [r.name for r in run_all() if not r.holds]
[]

- :func:`derive` builds ``F_t`` of THEORY.md §1 for any :class:`~metaplastic.Objective` at explicit small
  sizes and returns the prior, update and readout it implies (:class:`Derivation`);
- :func:`compare` checks a derivation against ``metaplastic.closed_forms`` entry by entry;
- :func:`theorems` lists the theorems (the seven limits of THEORY.md §3 and ``derive_<model>`` for every
  registry entry), :func:`run_all` runs them and returns :class:`TheoremRecord` s.
"""
from .check import compare, is_zero
from .derive import Derivation, derive
from .record import TheoremRecord
from .proofs import LIMITS, run_all, theorem_names, theorems

__all__ = ["derive", "Derivation", "compare", "is_zero", "theorems", "theorem_names", "run_all", "TheoremRecord",
           "LIMITS"]
