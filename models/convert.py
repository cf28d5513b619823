"""``metaplastic convert SRC DST``: a Mamba2 checkpoint becomes a metaplastic model directory."""
from __future__ import annotations

import argparse

from .converter import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="Mamba2 checkpoint directory (Hugging Face or mamba_ssm format)")
    parser.add_argument("dst", metavar="DST", help="output directory (Hugging Face format, MetaMamba2 mixers)")
    parser.add_argument("--init", choices=("identity", "paper"), default="identity",
                        help="identity: γ = 0, output-identical to SRC (default); paper: the paper's surgery "
                             "(γ = 1, fresh plasticity path), not output-preserving")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of DST's weights")
    parser.add_argument("--rank", type=int, default=None, help="rank of the importance path (default min(64, d_model))")
    parser.add_argument("--verify", action="store_true",
                        help="compare logits of SRC and DST on random tokens (also after reloading DST)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from metaplastic.cli import UserError

    from .converter import convert_mamba2
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be positive, got {args.rank}")
    try:
        result = convert_mamba2(args.src, args.dst, init=args.init, dtype=args.dtype, force=args.force,
                                verify=args.verify, importance_rank=args.rank, progress=not args.no_progress)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(f"converted {args.src} ({result.source_format} format) -> {result.dst}: {result.num_tensors} tensors, "
          f"{result.bytes_written / 1e6:.1f} MB, init={args.init}, dtype={args.dtype}")
    if args.verify and args.init == "identity" and args.dtype == "float32":
        worst = max(result.max_abs_diff, result.max_abs_diff_reloaded)
        if worst > 1e-4:
            print(f"verify: FAILED, max |logit difference| {worst:.3e} > 1e-4")
            return 1
        print("verify: OK (identity init: logits equal the source's to <= 1e-4)")
    return 0
