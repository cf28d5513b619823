"""``metaplastic verify [--symbolic] [--numeric] [--json]``.

- ``--numeric`` runs every registry entry through ``metaplastic.scan`` against the independent
  implementations installed (fla's naive functions, transformers' Mamba2 and Gated DeltaNet references;
  LongHorn through the GLA mapping of docs/references.md#the-longhorn-mapping) and prints the largest relative error of each. A
  metaplastic entry has no reference of its own: it is checked at ``b ≡ 0`` against its base model's
  reference (limit 2), which is what a reference can say about it. A missing reference is *skipped*,
  never passed.
- ``--symbolic`` runs the theorems of ``metaplastic.derivations`` (sympy).
- no flag: both. Exit code 1 when any check fails.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

from .oracles import ORACLES, Oracle, relative_error, scan_kwargs
from .registry import registry
from .scan import scan

# The fla references compute in float32: ~1e-7 relative error is what a correct float64 scan shows.
NUMERIC_TOLERANCE = 1e-6
# (B, T, H, K, V): T = 1, K != V, odd sizes, H > 1; square shapes for MesaNet (its reference needs V == K).
SHAPES = ((2, 7, 3, 5, 3), (1, 1, 2, 4, 4), (2, 12, 2, 6, 6))


@dataclass
class NumericCheck:
    model: str
    reference: str
    status: str  # "pass", "FAIL", "skipped"
    max_error: Optional[float]
    shapes: int
    seconds: float
    note: str = ""


def _oracle_for(model: str) -> List[Oracle]:
    return [o for o in ORACLES if o.model == model]


def check_model(model: str, oracle: Oracle, shapes: Sequence[tuple] = SHAPES) -> NumericCheck:
    """Scan ``model`` (its objective; at b ≡ 0 for a metaplastic entry) against ``oracle`` on random inputs."""
    start = time.perf_counter()
    spec = registry[model]
    via = "" if oracle.model == model else f" at b ≡ 0 (limit 2, base {oracle.model})"
    if not oracle.available():
        return NumericCheck(model, oracle.name + via, "skipped", None, 0, 0.0, f"{oracle.requires} not importable")
    worst, count = 0.0, 0
    for i, (B, T, H, K, V) in enumerate(shapes):
        if oracle.needs_square and K != V:
            continue
        for initial_state in (False, True):
            x = oracle.inputs(B, T, H, K, V, seed=100 + i, initial_state=initial_state)
            ref_out, ref_state = oracle.reference(x)
            kwargs = scan_kwargs(x)
            if spec.objective.posterior == "diagonal":  # metaplastic twin at b ≡ 0, Ip = 1
                kwargs["b"] = torch.zeros_like(kwargs["v"][..., 0])
                if "initial_state" in kwargs:
                    S = kwargs["initial_state"]["S"]
                    kwargs["initial_state"] = {"mu": S, "I": torch.ones_like(S)}
                ref_state = {"mu": ref_state["S"]}
            res = scan(spec.objective, **kwargs, scale=registry[oracle.model].scale_for(K), output_final_state=True)
            errors = [relative_error(res.output, ref_out)]
            errors += [relative_error(res.final_state[key], val) for key, val in ref_state.items()]
            worst = max(worst, *errors)
            count += 1
    status = "pass" if worst <= NUMERIC_TOLERANCE else "FAIL"
    return NumericCheck(model, oracle.name + via, status, worst, count, time.perf_counter() - start)


def numeric_checks() -> List[NumericCheck]:
    """One check per (registry entry, reference); entries with no reference at all are reported skipped."""
    checks: List[NumericCheck] = []
    for name, spec in registry.items():
        oracles = _oracle_for(name) or (_oracle_for(spec.base) if spec.base else [])
        if not oracles:
            checks.append(NumericCheck(name, "none", "skipped", None, 0, 0.0, "no independent reference"))
        for oracle in oracles:
            checks.append(check_model(name, oracle))
    return checks


def symbolic_checks(names: Optional[Sequence[str]] = None) -> list:
    from .derivations.proofs import run_all  # sympy; imported only when asked for
    return run_all(names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbolic", action="store_true", help="run the sympy theorems")
    parser.add_argument("--numeric", action="store_true", help="compare every entry with independent references")
    parser.add_argument("--json", action="store_true", help="print JSON records instead of a table")


def _print_table(header: Sequence[str], rows: List[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def run(args: argparse.Namespace) -> int:
    do_symbolic = args.symbolic or not args.numeric
    do_numeric = args.numeric or not args.symbolic
    failed = False
    output: dict = {}
    if do_symbolic:
        records = symbolic_checks()
        failed |= not all(r.holds for r in records)
        if args.json:
            output["symbolic"] = [r.to_json() for r in records]
        else:
            print(f"Symbolic theorems (sympy), {sum(r.holds for r in records)}/{len(records)} hold, "
                  f"{sum(r.seconds for r in records):.1f} s")
            _print_table(("theorem", "holds", "seconds"),
                         [(r.name, "yes" if r.holds else "NO", f"{r.seconds:.2f}") for r in records])
            print()
    if do_numeric:
        checks = numeric_checks()
        failed |= any(c.status == "FAIL" for c in checks)
        if args.json:
            output["numeric"] = [asdict(c) for c in checks]
        else:
            print(f"Numeric checks against independent references (float64 scan vs float32 references; "
                  f"tolerance {NUMERIC_TOLERANCE:g} relative to max |ref|)")
            _print_table(("model", "status", "max rel. error", "cases", "reference"),
                         [(c.model, c.status, "-" if c.max_error is None else f"{c.max_error:.2e}", c.shapes,
                           c.reference + (f" ({c.note})" if c.note else "")) for c in checks])
    if args.json:
        # --symbolic / --numeric alone print a plain list of records, as documented.
        if len(output) == 1:
            print(json.dumps(next(iter(output.values())), indent=2, ensure_ascii=False))
        else:
            print(json.dumps(output, indent=2, ensure_ascii=False))
    return 1 if failed else 0
