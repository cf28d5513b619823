"""The entry layer of the fast paths (``metaplastic.kernels.entry``): one validation, dtype, varlen split."""
import pytest
import torch

import metaplastic
from helpers import assert_close
from metaplastic.kernels.dispatch import scan as dispatch_scan
from metaplastic.kernels.entry import (by_sequence, compute_dtype, prepare, rows_constant,
                                       triton_unavailable_reason)


def _palimpsa(B=1, T=7, H=2, K=3, V=4, G=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = dict(dtype=dtype, generator=gen)
    x = {"q": torch.randn(B, T, H, K, **d), "k": torch.randn(B, T, H, K, **d), "v": torch.randn(B, T, H, V, **d),
         "log_decay": torch.log(0.5 + 0.5 * torch.rand(B, T, H, **d)), "beta": torch.rand(B, T, H, **d),
         "b": torch.rand(*((B, T, H) if G is None else (B, T, H, G)), **d)}
    return metaplastic.registry["palimpsa"].objective, x


def test_prepare_validates_once_and_normalises():
    obj, x = _palimpsa(G=2)
    call = prepare(obj, **x, scale=0.5)
    assert call.b_groups == 2 and call.dtype == torch.float64 and call.shape == (1, 7, 2, 3, 4)
    assert call.with_b_per_value().b.shape == (1, 7, 2, 4)
    one = prepare(obj, **dict(x, b=x["b"][..., :1]))
    assert one.b.shape == (1, 7, 2) and one.b_groups == 1  # one group is head-shared
    with pytest.raises(ValueError, match="G must divide the value width V = 4"):
        prepare(obj, **dict(x, b=torch.rand(1, 7, 2, 3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="log_decay"):
        prepare(obj, **dict(x, log_decay=None))
    with pytest.raises(ValueError, match="prior_precision must be > 0"):
        prepare(obj, **x, prior_precision=torch.tensor(-1.0))
    assert compute_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert compute_dtype(torch.zeros(1), torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_rows_constant_and_triton_reason(monkeypatch):
    I = torch.ones(1, 2, 4, 3)
    assert rows_constant(I)
    I[0, 1, 2, 0] = 2.0
    assert not rows_constant(I)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "CUDA" in triton_unavailable_reason(torch.device("cpu"))
    assert triton_unavailable_reason(torch.device("cuda")) is None


def test_grouped_b_through_the_torch_path_and_varlen():
    """b [B,T,H,G] through backend='chunk' with packed sequences equals the reference with b expanded per
    value row (docs/theory.md#limit-8-grouped-importance), outputs and final states."""
    obj, x = _palimpsa(T=9, G=2, seed=3)
    cu = torch.tensor([0, 2, 2, 9])
    kw = dict(scale=0.7, output_final_state=True, output_variance=True, cu_seqlens=cu)
    ref = metaplastic.scan(obj, **dict(x, b=x["b"].repeat_interleave(2, -1)), **kw)
    got = dispatch_scan(obj, **x, **kw, backend="chunk", chunk_size=4)
    assert_close(got.output, ref.output, rtol=1e-12)
    assert_close(got.variance, ref.variance, rtol=1e-12)
    for key in ref.final_state:
        assert_close(got.final_state[key], ref.final_state[key], rtol=1e-12)


def test_by_sequence_keeps_the_initial_state_of_an_empty_sequence():
    obj, x = _palimpsa(T=3)
    init = {"mu": torch.randn(2, 2, 4, 3, dtype=torch.float64), "I": 1 + torch.rand(2, 2, 4, 3, dtype=torch.float64)}
    call = prepare(obj, **x, initial_state=init, output_final_state=True, cu_seqlens=torch.tensor([0, 0, 3]))
    seen = []

    def run_dense(c):
        seen.append(c.shape)
        return metaplastic.scan(c.objective, c.q, c.k, c.v, **dict(c.kwargs(), output_final_state=True))
    res = by_sequence(call, run_dense)
    assert seen == [(1, 3, 2, 3, 4)]
    assert torch.equal(res.final_state["mu"][0], init["mu"][0])
