"""The MQAR decision rule: per-seed paired differences between two models at every setting, and a verdict.

For a pair ``(a, b)`` and a setting (sequence length, pairs, filler), the differences are ``acc_a − acc_b``
of the runs with the same seed (the same training data and order, the same test split). With ``n`` seeds,
mean ``m`` and sample standard deviation ``s``, the standard error is ``se = s / √n``. The verdict is
``"a>b"`` when every difference is positive and ``|m| > 2·se``, ``"b>a"`` when every difference is negative
and ``|m| > 2·se``, otherwise ``"undecided"`` (always with fewer than two seeds).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .mqar_entries import parse_entry

VERDICTS = ("a>b", "b>a", "undecided")


def verdict(differences: Sequence[float]) -> Tuple[float, Optional[float], str]:
    """``(mean, se, verdict)`` of paired differences (see the module docstring); ``se`` is None below two."""
    d = list(differences)
    mean = statistics.fmean(d)
    if len(d) < 2:
        return mean, None, "undecided"
    se = statistics.stdev(d) / math.sqrt(len(d))
    if abs(mean) > 2 * se:
        if all(x > 0 for x in d):
            return mean, se, "a>b"
        if all(x < 0 for x in d):
            return mean, se, "b>a"
    return mean, se, "undecided"


def automatic_pairs(models: Sequence[str]) -> List[Tuple[str, str]]:
    """Every metaplastic entry (importance path on) against every baseline entry (a point posterior or a
    ``b ≡ 0`` control) of ``models``, in the order of ``models``."""
    entries = [parse_entry(m) for m in models]
    return [(a.text, b.text) for a in entries if a.metaplastic for b in entries if b.baseline]


def _key(setting: Dict[str, Any]) -> Tuple[int, int, Optional[str]]:
    return setting["seq_len"], setting["pairs"], setting.get("filler")


def comparisons(result: Dict[str, Any], pairs: Optional[Sequence[Sequence[str]]] = None) -> List[Dict[str, Any]]:
    """The ``comparisons`` of ``mqar.json``: for each pair (default: the config's ``comparisons``, else
    :func:`automatic_pairs`) and each setting, ``{"a", "b", "setting": [T, pairs], "filler", "trained",
    "seeds", "differences", "mean", "se", "verdict"}`` (differences rounded to 4 decimals, as the accuracies)."""
    cfg = result["config"]
    if pairs is None:
        pairs = cfg.get("comparisons")
    if pairs is None:
        pairs = automatic_pairs(list(result["results"]))
    out = []
    for a, b in pairs:
        ra, rb = result["results"][a], result["results"][b]
        by_key = {_key(s): s for s in rb["settings"]}
        for sa in ra["settings"]:
            sb = by_key.get(_key(sa))
            if sb is None:
                continue
            seeds_a = sa.get("seeds") or list(cfg["seeds"])
            seeds_b = sb.get("seeds") or list(cfg["seeds"])
            acc_b = dict(zip(seeds_b, sb["accuracy"]))
            seeds = [s for s in seeds_a if s in acc_b]
            if not seeds:
                continue
            acc_a = dict(zip(seeds_a, sa["accuracy"]))
            diffs = [round(acc_a[s] - acc_b[s], 4) for s in seeds]
            mean, se, v = verdict(diffs)
            out.append({"a": a, "b": b, "setting": [sa["seq_len"], sa["pairs"]], "filler": sa.get("filler", cfg["filler"]),
                        "trained": sa.get("trained", True), "seeds": seeds, "differences": diffs,
                        "mean": round(mean, 4), "se": None if se is None else round(se, 4), "verdict": v})
    return out


def comparison_table(result: Dict[str, Any]) -> str:
    """A markdown table of ``result["comparisons"]``: one row per pair and setting."""
    rows = result.get("comparisons") or []
    if not rows:
        return ""
    lines = ["| a | b | setting | filler | differences a − b (per seed) | mean | se | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in rows:
        T, P = c["setting"]
        where = f"T={T}, {P} pairs" + ("" if c.get("trained", True) else " †")
        diffs = ", ".join(f"{d:+.3f}" for d in c["differences"])
        se = "—" if c["se"] is None else f"{c['se']:.3f}"
        v = "undecided" if c["verdict"] == "undecided" else f"**{c['verdict']}**"
        lines.append(f"| {c['a']} | {c['b']} | {where} | {c['filler']} | {diffs} | {c['mean']:+.3f} | {se} | {v} |")
    lines.append("\nverdict a>b (b>a): the difference has the same sign on every seed and |mean| > 2 se; "
                 "otherwise undecided. † tested only, beyond training.")
    return "\n".join(lines)
