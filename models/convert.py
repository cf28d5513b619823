"""``metaplastic convert SRC DST``: a Mamba2 or Gated DeltaNet checkpoint becomes a metaplastic model directory.

The format is detected from SRC's ``config.json``: Mamba2 (Hugging Face or mamba_ssm) -> ``meta_mamba2``
mixers; Gated DeltaNet (fla) -> ``meta_gated_deltanet`` mixers with the source's SwiGLU MLPs.
"""
from __future__ import annotations

import argparse

from .converter import DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint directory: Mamba2 (Hugging Face or mamba_ssm format) or Gated DeltaNet (fla format)")
    parser.add_argument("dst", metavar="DST", help="output directory (Hugging Face format, MetaplasticForCausalLM with the metaplastic twin mixers)")
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
    from metaplastic.errors import UserError

    from .converter import convert_checkpoint
    if args.rank is not None and args.rank < 1:
        raise UserError(f"--rank must be positive, got {args.rank}")
    try:
        result = convert_checkpoint(args.src, args.dst, init=args.init, dtype=args.dtype, force=args.force,
                                    verify=args.verify, importance_rank=args.rank, progress=not args.no_progress)
    except ValueError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    print(f"converted {args.src} ({result.architecture}, {result.source_format} format) -> {result.dst}: "
          f"{result.num_tensors} tensors, {result.bytes_written / 1e6:.1f} MB, init={args.init}, dtype={args.dtype}")
    if args.verify and args.init == "identity" and args.dtype == "float32":
        worst = max(result.max_abs_diff, result.max_abs_diff_reloaded)
        if worst > 1e-4:
            print(f"verify: FAILED, max |logit difference| {worst:.3e} > 1e-4")
            return 1
        print(f"verify: OK (identity init: logits equal those of the {result.reference} to <= 1e-4)")
    return 0
