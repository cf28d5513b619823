"""A checkpoint -> ``MetaplasticForCausalLM`` with metaplastic mixers (docs/theory.md#converting-a-checkpoint), and the command
``metaplastic convert SRC DST``.

One mechanism for every source format: :func:`open_checkpoint` reads ``config.json``, finds the row of the
table of source formats (:data:`FORMATS`) that recognises it, and describes the source as a
:class:`SourceCheckpoint`, a point-posterior ``MetaplasticForCausalLM`` config plus a key map (our state-dict
key -> the checkpoint's key); :func:`convert_checkpoint` copies every tensor and passes each layer's mixer
through :func:`to_metaplastic`.

| module | its job |
|---|---|
| :mod:`.formats` | the table of source formats, :func:`open_checkpoint` |
| :mod:`.source_mamba2`, :mod:`.source_gated_deltanet`, :mod:`.source_gla` | one format each: recognise, read config, map keys |
| :mod:`.source_authors`, :mod:`.authors_config` | the paper authors' format, their config fields |
| :mod:`.reading` | :class:`SourceFormat`, :class:`SourceCheckpoint`, the checks on keys, layers and values |
| :mod:`.conversion` | the twin config, one layer's twin tensors, the converted model's tensors in writing order |
| :mod:`.writing` | destination safety, the lock, DST written beside its place and renamed in |
| :mod:`.verification` | ``--verify``: the logit comparisons and the verdict |
| :mod:`.model_card` | the model card ``README.md`` written into DST |
| :mod:`.pipeline` | :func:`convert_checkpoint`: the steps in order |
| :mod:`.command` | the command ``metaplastic convert`` |

Mamba2 -> ``meta_mamba2`` mixers; Gated DeltaNet -> ``meta_gated_deltanet`` and GLA -> ``meta_gla`` mixers,
each with the source's SwiGLU MLPs. With ``init="identity"`` (γ = 0) the converted model's logits equal the
source's; ``init="paper"`` initialises the plasticity path by the paper's surgery law (γ = 1,
W_b1 ~ N(0, 0.02²), W_b2 ~ U(±rank^{-1/2}), b_scale = 1), ``"paper-finetuning"`` with b_scale ~ U(0.1, 1): not
output-preserving. The authors' own
checkpoints are already metaplastic: they keep every weight (identity) or go through their surgery
(:mod:`.source_authors`).

Tensors move one at a time (memory-mapped source, streaming safetensors writer), and the result is
written to a temporary directory beside ``dst`` that is renamed at the end, so a failure leaves no ``dst``.

Safety (docs/safety.md): every source tensor must be floating-point and finite, and fit the requested
``--dtype``; ``dst`` is locked against a second writer (``.DST.lock``); ``--force`` replaces only an earlier
output of this command (recognised by its ``config.json`` and the marker ``conversion.json``), never SRC, a
directory containing SRC or one inside it; ``--verify`` fails on any non-finite logit difference, and for an
identity conversion compares DST with the source run with its weights rounded to ``--dtype``
(:func:`verify_conversion` says why that reference, and what the bound is).
"""
from ..twins import to_metaplastic
from .command import add_arguments, run
from .conversion import DTYPES, SEED, ConversionResult, convert_layer, lm_shapes, twin_config
from .formats import FORMATS, open_checkpoint
from .model_card import VerifySummary, write_model_card
from .pipeline import convert_checkpoint, convert_mamba2
from .reading import (SOURCE_DTYPES, ConversionError, SourceCheckpoint, SourceFormat, check_keys, check_layer_count,
                      check_values)
from .verification import (UNIT_ROUNDOFF, VERIFY_ABS, VERIFY_REL, converted_model, load_source_model, point_model,
                           relative, round_weights_, verify_conversion, verify_verdict)
from .writing import (MARKER, TOKENIZER_FILES, WRITTEN_BY, check_destination, check_free_space,
                      is_conversion_output)

__all__ = ["DTYPES", "FORMATS", "MARKER", "SEED", "SOURCE_DTYPES", "TOKENIZER_FILES", "UNIT_ROUNDOFF", "VERIFY_ABS",
           "VERIFY_REL", "WRITTEN_BY", "ConversionError", "ConversionResult", "SourceCheckpoint", "SourceFormat",
           "VerifySummary", "add_arguments", "check_destination", "check_free_space", "check_keys",
           "check_layer_count", "check_values", "convert_checkpoint", "convert_layer", "convert_mamba2",
           "converted_model", "is_conversion_output", "lm_shapes", "load_source_model", "open_checkpoint",
           "point_model", "relative", "round_weights_", "run", "to_metaplastic", "twin_config", "verify_conversion",
           "verify_verdict", "write_model_card"]
