"""Token data for ``metaplastic finetune``: load, pack into fixed-length sequences, shard deterministically.

A data file becomes one flat array of token ids (``.npy``: any integer array; ``.bin``: raw ids of
``--data-dtype``, nanoGPT's convention; any other file: UTF-8 text tokenised with the tokenizer saved beside
the model). The array is cut into ``n = len // seq_len`` non-overlapping sequences of ``seq_len`` tokens
(the tail is dropped). Each epoch visits them in the order of a permutation seeded by ``(seed, epoch)``.

Sharding rule. The sample stream is the concatenation of the epochs' orders; optimizer step ``s`` (0-based)
consumes stream positions ``[s·G, (s+1)·G)`` with ``G`` the global batch. Of those ``G`` sequences, rank
``r`` of ``W`` takes the contiguous slice ``[r·G/W, (r+1)·G/W)``, and its micro-step ``a`` the slice
``[a·m, (a+1)·m)`` of that (``m`` the micro-batch). So every step sees the same ``G`` sequences whatever
``W`` and ``m`` are, and the data position is a function of the step alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

DTYPES = ("uint16", "uint32", "int32", "int64")


class DataError(ValueError):
    """A data file that cannot be trained on (empty, too short, ids out of range, no tokenizer)."""


def load_tokens(path: Path, *, dtype: str = "uint16", tokenizer_dir: Optional[Path] = None) -> np.ndarray:
    """The token ids of ``path`` as a 1-D integer array (memory-mapped for ``.npy`` / ``.bin``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"data file {path} holds {tokens.dtype} values, not integer token ids")
        return tokens.reshape(-1)
    if suffix == ".bin":
        if dtype not in DTYPES:
            raise DataError(f"--data-dtype must be one of {DTYPES}, got {dtype!r}")
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        if path.stat().st_size % np.dtype(dtype).itemsize:
            raise DataError(f"data file {path} has {path.stat().st_size} bytes, not a whole number of {dtype}")
        return np.memmap(path, dtype=dtype, mode="r")
    return _tokenize_text(path, tokenizer_dir)


def _tokenize_text(path: Path, tokenizer_dir: Optional[Path]) -> np.ndarray:
    text = path.read_text(encoding="utf-8")
    if not text:
        return np.zeros(0, dtype=np.int64)
    if tokenizer_dir is None:
        raise DataError(f"{path} is a text file and no tokenizer directory was given")
    try:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is a text file, but no tokenizer could be loaded from {tokenizer_dir} "
                        f"(save one beside the model, or give a .npy/.bin of token ids): "
                        f"{str(exc).splitlines()[0]}") from None
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


class PackedSequences:
    """``tokens`` cut into ``len(tokens) // seq_len`` sequences of ``seq_len`` tokens, shuffled per epoch.

    ``batch(step, rank, world, micro_batch)`` yields the ``[micro_batch, seq_len]`` int64 tensors of that
    rank's micro-steps of optimizer step ``step``; see the module docstring for the rule.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, *, seed: int = 0,
                 vocab_size: Optional[int] = None, name: str = "data") -> None:
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2 (one next-token target), got {seq_len}")
        if len(tokens) == 0:
            raise DataError(f"data file {name} is empty")
        self.tokens, self.seq_len, self.global_batch, self.seed = tokens, seq_len, global_batch, seed
        self.num_sequences = len(tokens) // seq_len
        if self.num_sequences < global_batch:
            raise DataError(f"data file {name} is too short: {len(tokens)} tokens make {self.num_sequences} "
                            f"sequences of {seq_len}, fewer than one global batch of {global_batch}")
        if vocab_size is not None:
            hi, lo = int(tokens.max()), int(tokens.min())
            if lo < 0 or hi >= vocab_size:
                raise DataError(f"data file {name} has token ids in [{lo}, {hi}], outside the model's "
                                f"vocabulary [0, {vocab_size})")
        self._orders: dict = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # G <= n, so one step spans at most two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._orders[epoch]

    def sequence_ids(self, step: int) -> np.ndarray:
        """The ``global_batch`` sequence indices of optimizer step ``step`` (0-based), in stream order."""
        start = step * self.global_batch
        out = np.empty(self.global_batch, dtype=np.int64)
        for i, pos in enumerate(range(start, start + self.global_batch)):
            epoch, within = divmod(pos, self.num_sequences)
            out[i] = self._order(epoch)[within]
        return out

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (fractional)."""
        return step * self.global_batch / self.num_sequences

    def batch(self, step: int, rank: int, world: int, micro_batch: int) -> Iterator[torch.Tensor]:
        """This rank's micro-batches of step ``step``: ``G / (W·m)`` tensors ``[m, seq_len]`` (int64)."""
        per_rank = self.global_batch // world
        ids = self.sequence_ids(step)[rank * per_rank:(rank + 1) * per_rank]
        L = self.seq_len
        for a in range(per_rank // micro_batch):
            rows = [np.asarray(self.tokens[i * L:(i + 1) * L], dtype=np.int64)
                    for i in ids[a * micro_batch:(a + 1) * micro_batch]]
            yield torch.from_numpy(np.stack(rows))
