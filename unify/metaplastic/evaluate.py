"""``metaplastic eval``: EleutherAI's lm-evaluation-harness command line with the metaplastic classes registered.

Every argument after ``eval`` goes unchanged to lm-eval's own command line (``lm_eval.__main__.cli_evaluate``),
so ``--model hf --model_args pretrained=DIR`` loads a converted directory through transformers' Auto classes
(``import metaplastic`` registers ``MetaplasticConfig`` / ``MetaplasticForCausalLM`` with them), exactly as lm-eval
loads any transformers model. lm-eval and accelerate come with the optional extra ``metaplastic[eval]``;
without them the command exits 2 with the install line. docs/evaluation.md has the suite and the offline use.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import List

from metaplastic.errors import UserError

INSTALL = "pip install 'metaplastic[eval]'"
REQUIRED = {"lm_eval": "lm-eval", "accelerate": "accelerate"}  # module -> distribution


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One positional that takes every argument: this parser claims no option of its own (``-h`` included), so
    ``metaplastic eval -h`` prints lm-eval's help and ``--model``, ``--tasks``, ... reach lm-eval untouched."""
    parser.prefix_chars = ""  # no argument is an option of this parser: all of them are lm-eval's
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGS",
                        help="lm-eval's arguments, e.g. --model hf --model_args pretrained=DIR --tasks piqa")


def missing_requirements() -> List[str]:
    """Distributions of the ``eval`` extra that are not installed."""
    return [dist for module, dist in REQUIRED.items() if importlib.util.find_spec(module) is None]


def run_lm_eval(argv: List[str]) -> int:
    """Run lm-eval's command line on ``argv`` (its arguments, without a program name) in this process, with the
    metaplastic classes registered; returns its exit status."""
    missing = missing_requirements()
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed; install the evaluation extra: {INSTALL}")
    import metaplastic.models.register_auto  # noqa: F401  (AutoModelForCausalLM resolves model_type "metaplastic")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as exc:  # its parser's exits (--help, bad arguments) keep their status
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def run(args: argparse.Namespace) -> int:
    return run_lm_eval(list(args.lm_eval_args))
