"""MQAR data against Zoology's definition (HazyResearch/zoology ``multiquery_ar``), restated here.

Zoology's definition, written out independently of the generator:

- context: positions ``0 .. 2P-1`` hold ``k_1 v_1 … k_P v_P``; keys are P distinct draws from
  ``{1, …, V//2 - 1}``, values P distinct draws from ``{V//2, …, V-1}``;
- query slots: positions ``2P + 2j`` for ``j = 0 … (T - 2P)//2 - 1``; P distinct slots are chosen with
  probability ``∝ a · (j+1)^(a-1)``, ``a = 0.01``; slot i holds key ``k_i`` and its label is ``v_i``;
- every other label is -100; with ``random_non_queries`` every other position after the context holds a
  token uniform on ``{0, …, V-1}``, otherwise 0.
"""
import math

import pytest
import torch

from metaplastic.experiments.mqar_data import IGNORE, check_setting, mqar


def _check_example(x, y, T, P, V, filler):
    half = V // 2
    keys, values = x[0:2 * P:2], x[1:2 * P:2]
    assert len(set(keys)) == P and all(1 <= k <= half - 1 for k in keys)
    assert len(set(values)) == P and all(half <= v <= V - 1 for v in values)
    answer = dict(zip(keys, values))
    assert all(lab == IGNORE for lab in y[:2 * P])
    labelled = [t for t in range(T) if y[t] != IGNORE]
    assert len(labelled) == P
    assert all(t >= 2 * P and (t - 2 * P) % 2 == 0 for t in labelled)  # on the query slots
    assert sorted(x[t] for t in labelled) == sorted(keys)  # every key queried exactly once
    assert all(y[t] == answer[x[t]] for t in labelled)  # the label at a query is its value
    others = [x[t] for t in range(2 * P, T) if y[t] == IGNORE]
    if filler == "zero":
        assert all(tok == 0 for tok in others)
    else:
        assert all(0 <= tok < V for tok in others)
    return others


@pytest.mark.parametrize("filler", ["random", "zero"])
@pytest.mark.parametrize("T,P,V", [(16, 4, 32), (64, 8, 64), (66, 16, 40), (32, 1, 8)])
def test_examples_follow_zoology(T, P, V, filler):
    inputs, labels = mqar(40, T, P, V, torch.Generator().manual_seed(1), filler=filler)
    assert inputs.shape == labels.shape == (40, T) and inputs.dtype == labels.dtype == torch.int64
    for x, y in zip(inputs.tolist(), labels.tolist()):
        _check_example(x, y, T, P, V, filler)


def test_random_filler_is_uniform_over_the_vocabulary():
    """The non-query tokens after the context: counts per token within 6 binomial standard deviations."""
    T, P, V, n = 64, 4, 32, 800
    inputs, labels = mqar(n, T, P, V, torch.Generator().manual_seed(2))
    tokens = [tok for x, y in zip(inputs.tolist(), labels.tolist()) for tok in _check_example(x, y, T, P, V, "random")]
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    expected = len(tokens) / V
    sd = math.sqrt(len(tokens) * (1 / V) * (1 - 1 / V))
    assert float((counts - expected).abs().max()) < 6 * sd, counts


def test_query_slot_follows_the_power_law():
    """With one pair the query slot j has probability a (j+1)^(a-1) / Σ: compare frequencies (Monte Carlo)."""
    T, V, n, a = 24, 16, 20000, 0.01
    inputs, labels = mqar(n, T, 1, V, torch.Generator().manual_seed(3), filler="zero")
    slots = ((labels != IGNORE).float().argmax(-1) - 2) // 2
    space = (T - 2) // 2
    p = torch.tensor([a * (j + 1) ** (a - 1) for j in range(space)], dtype=torch.float64)
    p = p / p.sum()
    freq = torch.bincount(slots, minlength=space).double() / n
    sd = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() < 5 * sd + 1e-9).all()), (freq, p)


def test_splits_are_reproducible_and_differ_by_seed():
    a = mqar(8, 32, 4, 32, torch.Generator().manual_seed(3))
    b = mqar(8, 32, 4, 32, torch.Generator().manual_seed(3))
    c = mqar(8, 32, 4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("T,P,V,match", [(15, 4, 32, "seq_len=15 is too short"), (64, 16, 32, "vocab_size=32 has 15 keys"),
                                         (64, 0, 32, "num_pairs must be positive")])
def test_bad_settings(T, P, V, match):
    with pytest.raises(ValueError, match=match):
        check_setting(T, P, V)


def test_bad_filler():
    with pytest.raises(ValueError, match="filler"):
        mqar(2, 16, 2, 16, torch.Generator(), filler="ones")


@pytest.mark.parametrize("filler", ["random", "zero"])
@pytest.mark.parametrize("T,P,V", [(48, 6, 48), (64, 8, 64), (18, 4, 16)])
def test_dense_layout_makes_every_even_slot_after_the_context_a_query(T, P, V, filler):
    """The authors' layout: every key is queried at least once, every even slot after the context holds a
    query of a key of the example labelled with its value, the odd slots hold the filler."""
    inputs, labels = mqar(40, T, P, V, torch.Generator().manual_seed(5), filler=filler, layout="dense")
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:2 * P:2], x[1:2 * P:2]
        answer = dict(zip(keys, values))
        even = range(2 * P, T - (T - 2 * P) % 2, 2)
        assert [t for t in range(T) if y[t] != IGNORE] == list(even)
        assert all(x[t] in answer and y[t] == answer[x[t]] for t in even)
        assert set(x[t] for t in even) == set(keys)
        odd = [x[t] for t in range(2 * P + 1, T, 2)]
        assert all(tok == 0 for tok in odd) if filler == "zero" else all(0 <= tok < V for tok in odd)


def test_dense_and_zoology_layouts_agree_at_four_tokens_per_pair():
    """At seq_len = 4P (every setting the authors ran) every even slot is already a query: the same examples."""
    for filler in ("random", "zero"):
        a = mqar(20, 32, 8, 64, torch.Generator().manual_seed(6), filler=filler)
        b = mqar(20, 32, 8, 64, torch.Generator().manual_seed(6), filler=filler, layout="dense")
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_dense_extra_queries_draw_keys_uniformly():
    """The further queries (beyond each key's first) pick the P keys uniformly: counts per context position
    within 6 binomial standard deviations."""
    T, P, V, n = 64, 4, 32, 400
    inputs, labels = mqar(n, T, P, V, torch.Generator().manual_seed(7), filler="zero", layout="dense")
    counts = torch.zeros(P)
    for x in inputs.tolist():
        keys = x[0:2 * P:2]
        for t in range(2 * P, T, 2):
            counts[keys.index(x[t])] += 1
    counts -= n  # each key's first query
    total = float(counts.sum())
    sd = math.sqrt(total * (1 / P) * (1 - 1 / P))
    assert float((counts - total / P).abs().max()) < 6 * sd, counts


def test_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        mqar(2, 16, 2, 16, torch.Generator(), layout="sparse")
