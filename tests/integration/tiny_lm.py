"""Shared pieces of the integration tests: a word-level tokenizer over the tiny task's words, the three tiny
sources (transformers' Mamba2, fla's Gated DeltaNet and GLA) written with that tokenizer, their converted
directories at ``--init identity``, and the reference logits of the fla sources (the oracles of
tests/models/test_convert_gdn.py and test_convert_gla.py: fla's naive recurrences and pure-torch norms).

Imported as ``from tiny_lm import ...`` (pytest puts this folder on ``sys.path`` for its test files).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from transformers.utils import ModelOutput

TESTS = Path(__file__).resolve().parents[1]
TASK_DIR = Path(__file__).resolve().parent / "tiny_choice"  # tiny_choice.yaml + tiny_choice.jsonl
WORDS = ("the a cat dog bird fish sat ran flew swam on in under over mat tree sky sea red blue green big small "
         "and then it is was yes no one two three what where").split()
VOCAB = 37  # <unk>, <eos> and the 35 words: the tiny models' vocabulary size
ARCHITECTURES = ("mamba2", "gated_deltanet", "gla")


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast``: ``<unk>`` = 0, ``<eos>`` = 1, then :data:`WORDS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *WORDS])}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def oracle_module(name: str) -> ModuleType:
    """The test module ``tests/models/{name}.py`` (the one pytest imported, or loaded from its file)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS / "models" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def source_model(arch: str, seed: int = 0, **overrides):
    """A tiny source model of ``arch`` with every weight moved off its initial value (tests/helpers.py);
    ``overrides``: config fields (e.g. ``num_hidden_layers``)."""
    import helpers
    if arch == "mamba2":
        return helpers.tiny_mamba2(seed, **overrides)
    if arch == "gated_deltanet":
        return helpers.tiny_gated_deltanet(seed, tie=False, num_v_heads=4, **overrides)
    return helpers.tiny_gla(seed, tie=False, num_heads=4, num_kv_heads=2, expand_k=1.0, use_short_conv=True,
                            feature_map="relu", **overrides)


def write_source(arch: str, path: Path, seed: int = 0, **overrides):
    """``path``: the source's ``save_pretrained`` plus the tokenizer; returns the source model."""
    model = source_model(arch, seed, **overrides)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return model


def reference_logits(arch: str, source, ids: torch.Tensor) -> torch.Tensor:
    """The source's logits ``[B, T, VOCAB]`` by code nobody here wrote: transformers' Mamba2 itself, or the
    reference built from fla's naive recurrence and norms (GDN, GLA; fla's own model runs on GPUs only)."""
    if arch == "mamba2":
        with torch.no_grad():
            return source(ids).logits.float()
    module = oracle_module("test_convert_gdn" if arch == "gated_deltanet" else "test_convert_gla")
    return module.reference_logits(source, ids)


class ReferenceLM(nn.Module):
    """An fla source run by its reference (:func:`reference_logits`), shaped as lm-eval's ``HFLM`` calls a
    transformers model: ``model(ids).logits``, ``.config``, ``.device``."""

    def __init__(self, arch: str, source) -> None:
        super().__init__()
        self.arch, self.source, self.config = arch, source, source.config

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def tie_weights(self) -> None:  # HFLM ties a model's weights; the reference reads the state dict as it is
        pass

    def forward(self, input_ids: torch.Tensor, **kwargs) -> ModelOutput:
        return ModelOutput(logits=reference_logits(self.arch, self.source, input_ids))


def convert_sources(root: Path) -> dict:
    """Every architecture of :data:`ARCHITECTURES` written as a tiny source under ``root/ARCH/src`` and converted
    at ``--init identity`` into ``root/ARCH/dst``: ``{arch: (source model, source dir, converted dir)}``."""
    from metaplastic import convert_checkpoint
    out = {}
    for arch in ARCHITECTURES:
        src, dst = root / arch / "src", root / arch / "dst"
        source = write_source(arch, src)
        convert_checkpoint(src, dst, progress=False)
        out[arch] = (source, src, dst)
    return out
