"""``metaplastic demo [--out DIR]``: the tour, on an embedded default (what ``make demo`` runs).

Steps, each writing into DIR and linked from ``DIR/summary.md``:

1. ``metaplastic verify``: the sympy theorems and the numeric checks against independent references;
2. ``metaplastic table1``: the paper's Table 1, computed from the registry;
3. a tiny Mamba2 checkpoint built with transformers (``Mamba2ForCausalLM``, fixed seed 0);
4. ``metaplastic convert`` of that checkpoint into MetaMamba2 with ``--verify`` (logits must match);
5. ``metaplastic capacity --quick``: recall against N for every model, with its plot.

A step that fails (or whose module is missing from this installation) is reported as FAILED in the
summary and on stderr, the other steps still run, and the command exits with 1. Nothing is faked.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

# The tiny checkpoint of step 3 (transformers' Mamba2Config arguments).
TINY_MAMBA2 = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, expand=2,
                   state_size=16, n_groups=1, conv_kernel=4, chunk_size=16, tie_word_embeddings=True)


class StepResult(NamedTuple):
    name: str
    ok: bool
    seconds: float
    outputs: List[str]  # file names relative to DIR
    note: str


class _Tee(io.TextIOBase):
    """Write to several text streams at once (the terminal and a log file)."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


def _cli(argv: Sequence[str], log: Optional[Path] = None) -> int:
    """Run ``metaplastic ARGV`` in this process, echoing its stdout to ``log`` as well."""
    from .cli import main
    if log is None:
        return main(list(argv))
    with open(log, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(_Tee(sys.stdout, fh)):
        return main(list(argv))


def build_tiny_mamba2(path: Path, seed: int = 0) -> Path:
    """Save a randomly initialised ``Mamba2ForCausalLM`` (``TINY_MAMBA2``, ``torch.manual_seed(seed)``) at ``path``."""
    import torch
    from transformers import Mamba2Config, Mamba2ForCausalLM
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(Mamba2Config(**TINY_MAMBA2)).eval()
    model.save_pretrained(path)
    return path


def _steps(out: Path) -> List[tuple]:
    def verify() -> tuple:
        rc = _cli(["verify"], out / "verify.txt")
        return rc == 0, ["verify.txt"], "" if rc == 0 else f"exit code {rc}"

    def table1() -> tuple:
        rc = _cli(["table1", "--out", str(out / "table1.md")], out / "table1.log")
        return rc == 0, ["table1.md"], "" if rc == 0 else f"exit code {rc}"

    def checkpoint() -> tuple:
        build_tiny_mamba2(out / "mamba2_tiny")
        return True, ["mamba2_tiny/"], ", ".join(f"{k}={v}" for k, v in TINY_MAMBA2.items())

    def convert() -> tuple:
        rc = _cli(["convert", str(out / "mamba2_tiny"), str(out / "meta_mamba2_tiny"), "--verify", "--force",
                   "--no-progress"], out / "convert.txt")
        return rc == 0, ["convert.txt", "meta_mamba2_tiny/"], "" if rc == 0 else f"exit code {rc}"

    def capacity() -> tuple:
        rc = _cli(["capacity", "--quick", "--out", str(out / "capacity")], out / "capacity.txt")
        return rc == 0, ["capacity/capacity.png", "capacity/capacity.json", "capacity.txt"], \
            "" if rc == 0 else f"exit code {rc}"

    return [("symbolic and numeric verification", verify), ("Table 1", table1),
            ("tiny Mamba2 checkpoint (transformers, seed 0)", checkpoint),
            ("conversion to MetaMamba2 with --verify", convert), ("memory capacity (--quick)", capacity)]


def run_demo(out: Path, steps: Optional[Sequence[str]] = None) -> List[StepResult]:
    """Run the tour into ``out``; ``steps`` restricts it to those step names (default: all)."""
    out.mkdir(parents=True, exist_ok=True)
    results: List[StepResult] = []
    for name, fn in _steps(out):
        if steps is not None and name not in steps:
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            ok, outputs, note = fn()
        except OSError as exc:  # a write that failed (disk full, read-only): one line, the tour goes on
            from .safe_io import describe
            ok, outputs, note = False, [], f"cannot write: {describe(exc)}"
        except Exception as exc:  # a failing step is reported, the tour goes on
            traceback.print_exc()
            ok, outputs, note = False, [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results.append(StepResult(name, ok, round(time.perf_counter() - started, 1), outputs, note))
        if not ok:
            print(f"metaplastic demo: step '{name}' FAILED: {note}", file=sys.stderr, flush=True)
    write_summary(out, results)
    return results


def write_summary(out: Path, results: Sequence[StepResult]) -> Path:
    """``summary.md``: one line per step (status, time, links), then the capacity table and plot."""
    lines = ["# metaplastic demo", "", f"{sum(r.ok for r in results)}/{len(results)} steps passed, "
             f"{sum(r.seconds for r in results):.0f} s in all.", "",
             "| step | status | seconds | outputs | note |", "|---|---|---|---|---|"]
    for r in results:
        links = ", ".join(f"[{o}]({o})" for o in r.outputs if (out / o).exists())
        lines.append(f"| {r.name} | {'ok' if r.ok else 'FAILED'} | {r.seconds} | {links} | {r.note} |")
    table1 = out / "table1.md"
    if table1.exists():
        lines += ["", "## Table 1", "", table1.read_text(encoding="utf-8").strip()]
    cap = out / "capacity" / "capacity.json"
    if cap.exists():
        from .experiments.capacity import summary_table
        result = json.loads(cap.read_text())
        lines += ["", "## Memory capacity without training", "",
                  f"K = V = {result['config']['K']}, {result['config']['trials']} trials, recall ≥ "
                  f"{result['config']['threshold']} (anisotropic keys: s = {result['config']['power_s']:g}).", "",
                  summary_table(result), "", "![capacity](capacity/capacity.png)"]
    from .safe_io import atomic_write
    return atomic_write(out / "summary.md", "\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")


def run(args: argparse.Namespace) -> int:
    from .safe_io import check_output_location
    out = check_output_location(args.out, what="--out", kind="dir")
    started = time.perf_counter()
    results = run_demo(out)
    failed = [r.name for r in results if not r.ok]
    print(f"\nwrote {out / 'summary.md'} ({time.perf_counter() - started:.0f} s)")
    if failed:
        print(f"metaplastic demo: {len(failed)} step(s) FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
