"""Multi-Query Associative Recall data, laid out as the Zoology benchmark lays it out.

One example of length ``seq_len`` with ``P`` pairs and vocabulary ``vocab_size``::

    position  0    1    2    3   ...  2P-2  2P-1 | 2P ... seq_len-1
    input     k_1  v_1  k_2  v_2 ...  k_P   v_P  | r .. k_i .. r .. k_j .. r     (every key queried once)
    label     -100 ...                            | -100 .. v_i .. -100 .. v_j ..

- keys are drawn *without replacement* from ``[1, vocab_size // 2)`` and values without replacement from
  ``[vocab_size // 2, vocab_size)`` (disjoint halves);
- query ``i`` (the key ``k_i``) sits at position ``2P + 2·g_i``, where the gaps ``g_i`` are distinct draws
  from ``{0, …, (seq_len − 2P) // 2 − 1}`` with probability ``∝ (g + 1)^(a − 1)`` (Zoology's power law,
  ``a = 0.01``: queries tend to come soon after the context);
- the label *at the query position* is the value that followed that key (next-token prediction: the model
  reads ``k_i`` and must emit ``v_i``); every other label is ``-100`` (ignored by the loss and the accuracy).

- every position after the context that holds no query holds the filler ``r``: with ``filler="random"``
  (the default, Zoology's ``random_non_queries=True``) a token drawn uniformly from ``[0, vocab_size)``,
  independently per position (so a filler can repeat a key or a value of the example, unlabelled); with
  ``filler="zero"`` the token 0, which a model can learn to skip.

``layout="zoology"`` (the default) queries every key once, as above. ``layout="dense"`` makes *every* even
slot after the context a query (the layout of the Palimpsa authors' MQAR runs, whose settings all have
``seq_len = 4P``): the P queries above are placed first, from the same random draws, and every even slot
still free holds a further query of a key drawn uniformly from the example's P keys, labelled with its
value. At ``seq_len = 4P`` every even slot is already a query and the two layouts give the same examples.

Requires ``seq_len ≥ 4P`` and ``P < vocab_size // 2``.
"""
from __future__ import annotations

from typing import Tuple

import torch

IGNORE = -100
FILLERS = ("random", "zero")
LAYOUTS = ("zoology", "dense")


def check_setting(seq_len: int, num_pairs: int, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the constraint a (seq_len, pairs, vocab) setting breaks."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be positive, got {num_pairs}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len={seq_len} is too short for {num_pairs} pairs: MQAR needs seq_len >= 4·pairs "
                         f"(2·pairs of context, then one query slot every other position)")
    if num_pairs > vocab_size // 2 - 1 or num_pairs > vocab_size - vocab_size // 2:
        raise ValueError(f"vocab_size={vocab_size} has {vocab_size // 2 - 1} keys, fewer than num_pairs={num_pairs}")


def mqar(num_examples: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator,
         power_a: float = 0.01, filler: str = "random", layout: str = "zoology") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``, both ``[num_examples, seq_len]`` int64 (see the module docstring)."""
    check_setting(seq_len, num_pairs, vocab_size)
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n, P = num_examples, num_pairs
    half = vocab_size // 2
    # sampling without replacement: the first P of a random permutation (argsort of uniform noise)
    keys = torch.rand(n, half - 1, generator=generator).argsort(-1)[:, :P] + 1
    values = torch.rand(n, vocab_size - half, generator=generator).argsort(-1)[:, :P] + half
    space = (seq_len - 2 * P) // 2
    p = (power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)).expand(n, space)
    gaps = torch.multinomial(p, P, replacement=False, generator=generator)  # [n, P], distinct per row
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values
    query_pos = 2 * P + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    labels.scatter_(1, query_pos, values)
    if layout == "dense" and space > P:  # the even slots still free: queries of keys drawn uniformly
        free = torch.ones(n, space, dtype=torch.bool)
        free.scatter_(1, gaps, False)
        slots = free.nonzero()  # [m, 2]: (example, slot), every free slot once
        which = torch.randint(P, (len(slots),), generator=generator)
        rows, pos = slots[:, 0], 2 * P + 2 * slots[:, 1]
        inputs[rows, pos] = keys[rows, which]
        labels[rows, pos] = values[rows, which]
    if filler == "random":
        noise = torch.randint(vocab_size, (n, seq_len), generator=generator)
        fill = labels == IGNORE
        fill[:, :2 * P] = False  # the context holds the pairs
        inputs = torch.where(fill, noise, inputs)
    return inputs, labels
