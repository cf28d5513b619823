"""``metaplastic registry [--json]``: the models and their objective settings."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from .registry import registry

COLUMNS = ("likelihood", "posterior", "solver", "transition", "forgetting")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list of records")


def records() -> list:
    return [{"name": spec.name, **asdict(spec.objective), "scale": spec.scale, "citation": spec.citation,
             "relation": spec.relation, "gates": spec.gates} for spec in registry.values()]


def run(args: argparse.Namespace) -> int:
    rows = records()
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    header = ("model",) + COLUMNS + ("scale",)
    table = [header] + [(r["name"],) + tuple(r[c] for c in COLUMNS) + (str(r["scale"]),) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0
