"""The model card ``README.md`` that ``metaplastic convert`` writes into DST: the conversion's provenance.

The card opens with the YAML front matter the Hugging Face Hub reads (``library_name``, ``pipeline_tag``,
``tags``, and ``base_model`` where the source's Hub id is known), so ``push_to_hub`` of DST uploads a
described model. Its body records what ``conversion.json`` records (source, format, init, dtype, importance
rank) plus the architecture, the importance groups, and, when ``--verify`` ran, the compared quantities, the
differences, the bounds and the verdict, with the figures formatted as ``--verify`` prints them.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

from metaplastic.safe_io import atomic_write

CARD = "README.md"
# A source read from the Hugging Face cache: ``.../models--ORG--NAME/snapshots/REVISION``.
_HUB_CACHE = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")
_TAGS = {"Mamba2": "mamba2", "Gated DeltaNet": "gated-deltanet", "GLA": "gla", "Palimpsa": "palimpsa",
         "MetaMamba2": "meta-mamba2"}


class VerifySummary(NamedTuple):
    """What ``--verify`` concluded: random tokens per sequence, the verdict (True OK, False FAILED, None no verdict)
    and its printed line, and the bounds of an identity conversion (absolute, relative to max |source logit|)."""

    tokens: int
    passed: Optional[bool]
    line: str
    abs_bound: float
    rel_bound: float


def hub_id(source: Path) -> Optional[str]:
    """``ORG/NAME`` when ``source`` is a snapshot in the Hugging Face cache, else None (a local directory's Hub
    origin is not recorded anywhere the converter can read)."""
    parts = Path(source).parts
    if len(parts) >= 3 and parts[-2] == "snapshots":
        match = _HUB_CACHE.match(parts[-3])
        if match:
            return f"{match[1]}/{match[2]}"
    return None


def front_matter(architecture: str, base_model: Optional[str]) -> str:
    """The YAML metadata block (between ``---`` lines) of the card."""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- metaplastic",
             "- linear-attention", f"- {_TAGS.get(architecture, 'converted')}"]
    if base_model is not None:
        lines.append(f"base_model: {base_model}")
    return "\n".join(lines + ["---"]) + "\n"


def verify_section(result: Any, init: str, verify: Optional[VerifySummary]) -> List[str]:
    """The ``--verify`` figures of ``result`` (a ``ConversionResult``); ``verify`` None: verify did not run."""
    if verify is None:
        return ["`--verify` was not run for this conversion."]
    rows = [("source vs converted (in memory)", result.max_abs_diff),
            ("source vs the reloaded directory", result.max_abs_diff_reloaded)]
    if result.dtype != "float32":
        rows += [(f"source with its weights rounded to {result.dtype} vs the reloaded directory",
                  result.max_abs_diff_rounded),
                 (f"source vs source with its weights rounded to {result.dtype} (the rounding itself)",
                  result.rounding_effect)]
    verdict = {True: "OK", False: "FAILED", None: "no verdict"}[verify.passed]
    lines = [f"`metaplastic convert --verify` ran the source and this model on {verify.tokens} random tokens x 2 "
             f"sequences; the source was run by the {result.reference}.", "",
             "| compared | max \\|logit difference\\| |", "|---|---|"]
    lines += [f"| {what} | {value:.3e} |" for what, value in rows]
    lines += ["", f"- relative to the largest \\|source logit\\|: {result.max_rel_diff:.2e}"]
    if init == "identity":
        lines.append(f"- bounds (identity init, float32 arithmetic): <= {verify.abs_bound:g} and "
                     f"<= {verify.rel_bound:g} relative")
    lines += [f"- verdict: **{verdict}**", "", f"`{verify.line}`"]
    return lines


def model_card(marker: Dict[str, Any], result: Any, groups: Optional[int], verify: Optional[VerifySummary]) -> str:
    """The card's text. ``marker``: the content of ``conversion.json``; ``result``: the ``ConversionResult``;
    ``groups``: ``--importance-groups`` (None: one rate per value channel); ``verify``: None when verify did not
    run."""
    base = hub_id(Path(marker["source"]))
    rows = [("source", f"`{marker['source']}`" + (f" (Hub: `{base}`)" if base else "")),
            ("source architecture, format", f"{result.architecture}, `{marker['format']}`"),
            ("`--init`", f"`{marker['init']}`"), ("`--dtype`", f"`{marker['dtype']}`"),
            ("importance rank", str(marker["importance_rank"])),
            ("importance groups", "one per value channel" if groups is None else str(groups)),
            ("tensors, bytes", f"{result.num_tensors}, {result.bytes_written}")]
    lines = [f"# {Path(result.dst).name}", "",
             f"A `MetaplasticForCausalLM` converted by `{marker['written_by']}` from a {result.architecture} "
             "checkpoint: every layer's memory is the metaplastic twin of the source's (a diagonal posterior with "
             "an importance path). With `--init identity` its outputs equal the source's.", "",
             "```python", "import metaplastic  # registers the model classes with transformers' Auto classes",
             "from transformers import AutoModelForCausalLM",
             "model = AutoModelForCausalLM.from_pretrained(PATH_OR_HUB_ID)", "```", "",
             "## Conversion", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {value} |" for what, value in rows]
    lines += ["", "## Verification", ""] + verify_section(result, marker["init"], verify)
    return front_matter(result.architecture, base) + "\n" + "\n".join(lines) + "\n"


def write_model_card(dst: Path, marker: Dict[str, Any], result: Any, groups: Optional[int] = None,
                     verify: Optional[VerifySummary] = None) -> Path:
    """Write :func:`model_card` as ``README.md`` in ``dst`` (beside its place, then renamed in). ``dst`` is the
    directory this conversion has just created, under its lock; a ``README.md`` found there was not written by
    this command and is kept (``ValueError``)."""
    path = Path(dst) / CARD
    if path.exists():
        raise ValueError(f"{path} appeared during the conversion; the model card was not written over it")
    return atomic_write(path, model_card(marker, result, groups, verify))
