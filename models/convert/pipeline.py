""":func:`convert_checkpoint`: the conversion's steps in order. Check the arguments and DST, open SRC (its
format from :data:`~.formats.FORMATS`), build the converted config and layout, check the free space, then under
DST's lock write DST (:mod:`.writing`), verify it (:mod:`.verification`) and write its model card
(:mod:`.model_card`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checkpoint_io import nbytes
from ..importance import INITS
from .conversion import DTYPES, ConversionResult, check_tied_head, dst_layout, dst_tensors
from .formats import open_checkpoint
from .model_card import VerifySummary, write_model_card
from .reading import ConversionError, check_values
from .verification import VERIFY_ABS, VERIFY_REL, verify_conversion, verify_verdict
from .writing import WRITTEN_BY, check_destination, check_free_space, locked_destination, write_destination


def convert_checkpoint(src, dst, *, init: str = "identity", dtype: str = "float32", force: bool = False,
                       verify: bool = False, importance_rank: Optional[int] = None, progress: bool = True,
                       verify_tokens: int = 16, log=print, importance_groups: Optional[int] = None) -> ConversionResult:
    """Convert the checkpoint directory ``src`` (Mamba2 in the Hugging Face or mamba_ssm format, Gated DeltaNet
    or GLA in fla's, or the paper authors' Palimpsa / MetaMamba2) into a metaplastic model directory ``dst``.

    ``importance_groups``: importance groups per head of the twins (None: one rate per value channel; an
    int must divide the head's value width). Raises :class:`ConversionError` / :class:`CheckpointError` (both
    ``ValueError``) for bad input; ``dst`` then does not exist (or, with ``force``, still holds what it held before).
    """
    if init not in INITS:
        raise ConversionError(f"--init must be one of {INITS}, got {init!r}")
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if importance_rank is not None and importance_rank < 1:
        raise ConversionError(f"--rank must be positive, got {importance_rank}")
    if importance_groups is not None and (isinstance(importance_groups, bool) or not isinstance(importance_groups, int)
                                          or importance_groups < 1):
        raise ConversionError(f"--importance-groups must be a positive integer, got {importance_groups!r}")
    torch_dtype = DTYPES[dtype]
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, force)
    ckpt = open_checkpoint(src)
    check_tied_head(ckpt)
    config = ckpt.target_config(torch_dtype, init, importance_rank, importance_groups)
    rank = config.mixer_kwargs_for(0)["importance_rank"]
    try:
        layout = dst_layout(config, torch_dtype)
    except ValueError as exc:
        if importance_groups is None or "importance_groups" not in str(exc):
            raise
        raise ConversionError(f"--importance-groups {importance_groups}: {str(exc).splitlines()[0]}") from None
    total = sum(nbytes(shape, dt) for _, shape, dt in layout)
    check_free_space(dst, total)
    marker = {"written_by": WRITTEN_BY, "source": str(src.resolve()), "format": ckpt.format, "init": init,
              "dtype": dtype, "importance_rank": rank}
    with locked_destination(src, dst, force):  # SIGTERM, like SIGINT, removes the partial DST and the lock
        write_destination(src, dst, layout, dst_tensors(ckpt, config, layout, init, rank, importance_groups), config,
                          marker, lambda name, tensor: check_values(ckpt.source_key(name) or name, tensor, torch_dtype),
                          total, progress)
        result = ConversionResult(dst, ckpt.format, len(layout), total, architecture=ckpt.architecture, dtype=dtype)
        if verify:
            verify_conversion(ckpt, dst, init, rank, result, tokens=verify_tokens, log=log,
                              groups=importance_groups, dtype=torch_dtype)
        write_model_card(dst, marker, result, importance_groups, VerifySummary(
            verify_tokens, *verify_verdict(result, init), VERIFY_ABS, VERIFY_REL) if verify else None)
    return result


convert_mamba2 = convert_checkpoint  # the name of the first converter (it reads every supported format)
