"""The ``metaplastic`` command line.

Each subcommand lives in the module that does its work; that module defines
``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when its command runs.
Exit codes: 0 success, 1 a check failed, 2 user error (bad input; one-line message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from metaplastic.errors import UserError
from metaplastic.safe_io import Terminated, sigterm_as_interrupt

# command -> (module, one-line help)
COMMANDS = {
    "registry": ("metaplastic.registry_cli", "list the models of the registry and their objective settings"),
    "verify": ("metaplastic.verify", "check the registry: symbolic derivations and numeric references"),
    "table1": ("metaplastic.derivations.table1", "print the paper's Table 1, computed from the registry"),
    "convert": ("metaplastic.models.convert",
                "convert a Mamba2, Gated DeltaNet, GLA or paper-authors checkpoint to a metaplastic one"),
    "capacity": ("metaplastic.experiments.capacity", "memory capacity without training (recall vs N)"),
    "mqar": ("metaplastic.experiments.mqar", "multi-query associative recall: train and evaluate"),
    "convert-finetune": ("metaplastic.experiments.convert_finetune",
                         "train a Mamba2 on recall, convert it (identity), fine-tune three ways, compare recall"),
    "demo": ("metaplastic.demo", "the tour: verification, Table 1, conversion, capacity"),
    "finetune": ("metaplastic.finetune", "fine-tune a metaplastic model (one process, --nproc-per-node N, or torchrun; FSDP2)"),
    "eval": ("metaplastic.evaluate", "evaluate with lm-evaluation-harness (its own arguments, our models registered)"),
}
# bench subcommands -> (module, help)
BENCHES = {
    "kernels": ("metaplastic.kernels.bench", "time forward and forward+backward of every backend"),
    "convert": ("metaplastic.models.bench", "time a conversion at mamba2-130m shapes against load+save"),
    "models": ("metaplastic.models.bench_models",
               "time transformers' Mamba2 LM, its metaplastic twin and its conversion (fwd, fwd+bwd)"),
    "compile": ("metaplastic.kernels.compile_report",
                "compile every Triton kernel for sm_90a / sm_80 without a GPU: registers, spills, shared memory"),
    "traffic": ("metaplastic.kernels.traffic", "modelled HBM bytes and FLOPs per token and head, against the floors"),
}


def _add_module_parser(subparsers, name: str, module: str, help_: str) -> None:
    parser = subparsers.add_parser(name, help=help_, description=help_)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            parser.set_defaults(_missing=f"'{name}' is not available in this installation ({exc.name} missing)")
            return
        raise
    mod.add_arguments(parser)
    parser.set_defaults(_run=mod.run)


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metaplastic", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Import only the module of the command being run (imports of torch/sympy/transformers are slow).
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_) in COMMANDS.items():
        if wanted in (None, name):
            _add_module_parser(sub, name, module, help_)
        else:
            sub.add_parser(name, help=help_)
    bench = sub.add_parser("bench", help="benchmarks: kernels, convert, models, compile, traffic")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH")
    for name, (module, help_) in BENCHES.items():
        if wanted == "bench" and (len(argv) < 2 or argv[1] == name):
            _add_module_parser(bench_sub, name, module, help_)
        else:
            bench_sub.add_parser(name, help=help_)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"metaplastic: {args._missing}", file=sys.stderr)
        return 2
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    try:
        with sigterm_as_interrupt():  # SIGTERM cleans up as SIGINT does: partial outputs removed, locks released
            return int(run(args) or 0)
    except UserError as exc:
        print(f"metaplastic {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a write that failed (disk full, read-only, permissions): one line, not a traceback
        from .safe_io import describe
        print(f"metaplastic {args.command}: error: {describe(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        return Terminated.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
