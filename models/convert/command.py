"""The command ``metaplastic convert SRC DST`` (docs/conversion.md): its arguments, and :func:`run`, which calls
:func:`~.pipeline.convert_checkpoint` and prints the summary and the ``--verify`` verdict. Exit codes: 0, 1 when
``--verify`` fails, 2 for a user error (one line on stderr).
"""
from __future__ import annotations

import argparse

from metaplastic.errors import UserError

from ..importance import INITS
from .conversion import DTYPES
from .pipeline import convert_checkpoint
from .verification import verify_verdict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory: Mamba2 (Hugging Face or mamba_ssm format), "
                        "Gated DeltaNet or GLA (fla format), or the paper authors' Palimpsa / MetaMamba2")
    parser.add_argument("dst", metavar="DST", help="output directory (Hugging Face format, MetaplasticForCausalLM with the metaplastic twin mixers)")
    parser.add_argument("--init", choices=INITS, default="identity",
                        help="identity: output-identical to SRC (γ = 0; the authors' checkpoints keep every weight; "
                             "default); paper: the paper's surgery law (fresh plasticity path, b_scale = 1), not "
                             "output-preserving; paper-finetuning: the same with b_scale ~ U(0.1, 1)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of DST's weights")
    parser.add_argument("--rank", type=int, default=None,
                        help="rank of the importance path (default min(64, d_model); the authors' checkpoints: "
                             "theirs, changed only with --init paper*)")
    parser.add_argument("--importance-groups", type=int, default=None, metavar="G",
                        help="share each importance rate within G contiguous groups of a head's value rows (G must "
                             "divide the head's value width; G = 1: one rate per head). Default: one per value channel")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits of SRC and DST on random tokens (also after reloading DST); with "
                             "--init identity, print OK or FAILED (exit 1): DST must match SRC with its weights "
                             "rounded to --dtype up to float32 arithmetic")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be positive, got {args.rank}")
    if args.importance_groups is not None and args.importance_groups < 1:
        raise UserError(f"--importance-groups must be positive, got {args.importance_groups}")
    try:
        result = convert_checkpoint(args.src, args.dst, init=args.init, dtype=args.dtype, force=args.force,
                                    verify=args.verify, importance_rank=args.rank, progress=not args.no_progress,
                                    importance_groups=args.importance_groups)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(f"converted {args.src} ({result.architecture}, {result.source_format} format) -> {result.dst}: "
          f"{result.num_tensors} tensors, {result.bytes_written / 1e6:.1f} MB, init={args.init}, dtype={args.dtype}")
    if args.verify:
        passed, line = verify_verdict(result, args.init)
        print(line)
        if passed is False:
            return 1
    return 0
