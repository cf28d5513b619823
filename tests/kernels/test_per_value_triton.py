"""The per-value Palimpsa Triton kernels (``b [B,T,H,V]``), forward and backward, against autograd through
the reference scan. Float64 through the Triton interpreter on CPU (tests/conftest.py), float32 on a GPU."""
import pytest
import torch

import metaplastic
from helpers import assert_close
from metaplastic.kernels.dispatch import scan as dispatch_scan
from metaplastic.kernels.entry import prepare

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float32 if ON_GPU else torch.float64
TOL = 1e-5 if ON_GPU else 1e-10


def _inputs(name, B, T, H, K, V, per_value=True, init=False, N=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    obj = metaplastic.registry[name].objective
    d = dict(dtype=torch.float64, generator=gen)
    x = {"q": torch.randn(B, T, H, K, **d), "k": torch.nn.functional.normalize(torch.randn(B, T, H, K, **d), dim=-1),
         "v": torch.randn(B, T, H, V, **d), "beta": 0.5 + torch.rand(B, T, H, **d),
         "b": torch.rand(*((B, T, H, V) if per_value else (B, T, H)), **d)}
    if obj.forgetting != "none":
        x["log_decay"] = torch.log(0.5 + 0.5 * torch.rand(B, T, H, **d))
    if init:
        n = B if N is None else N
        x["initial_state"] = {"mu": torch.randn(n, H, V, K, **d), "I": 1 + torch.rand(n, H, V, K, **d)}
    return obj, x


def _leaves(x, dtype=torch.float64, device="cpu"):
    out, flat = {}, []
    for key, val in x.items():
        if key == "initial_state":
            out[key] = {s: t.detach().to(device, dtype).requires_grad_() for s, t in val.items()}
            flat += list(out[key].values())
        else:
            out[key] = val.detach().to(device, dtype).requires_grad_()
            flat.append(out[key])
    return out, flat


def _loss(res, weights):
    total = (res.output.double().cpu() * weights[0]).sum() + (res.variance.double().cpu() * weights[1]).sum()
    return total + sum((res.final_state[key].double().cpu() * w).sum() for key, w in zip(("I", "mu"), weights[2:]))


def _check(name, x, cu_seqlens=None, run=None, tol=TOL, dtype=DTYPE, **kw):
    obj = metaplastic.registry[name].objective
    kw = dict(kw, output_final_state=True, output_variance=True)
    ref_x, ref_flat = _leaves(x)
    ref = metaplastic.scan(obj, **ref_x, **kw, cu_seqlens=cu_seqlens)
    got_x, got_flat = _leaves(x, dtype, DEVICE)
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    if run is None:
        got = dispatch_scan(obj, **got_x, **kw, cu_seqlens=cu, backend="triton_per_value")
    else:
        got = run(prepare(obj, **got_x, **kw, cu_seqlens=cu))
    assert_close(got.output.double().cpu(), ref.output, rtol=tol)
    assert_close(got.variance.double().cpu(), ref.variance, rtol=tol)
    for key in ref.final_state:
        assert_close(got.final_state[key].double().cpu(), ref.final_state[key], rtol=tol, msg=str(key))
    gen = torch.Generator().manual_seed(1)
    shapes = [ref.output.shape, ref.variance.shape, ref.final_state["I"].shape, ref.final_state["mu"].shape]
    weights = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
    g_ref = torch.autograd.grad(_loss(ref, weights), ref_flat)
    g_got = torch.autograd.grad(_loss(got, weights), got_flat)
    for a, b in zip(g_ref, g_got):
        assert torch.isfinite(b).all()
        assert_close(b.double().cpu(), a, rtol=tol)


def _run(segment, sub_chunk, block_k=None, block_v=None):
    from metaplastic.kernels.per_value import per_value_run
    return lambda call: per_value_run(call, segment=segment, sub_chunk=sub_chunk, block_k=block_k, block_v=block_v)


@pytest.mark.parametrize("name,per_value,init", [("palimpsa", True, True), ("meta_mamba2", True, False),
                                                 ("palimpsa", False, False)])
def test_per_value_matches_reference(name, per_value, init):
    """Two segments of 32 tokens, each rebuilt as two sub-chunks of 16 in the backward; T = 37."""
    obj, x = _inputs(name, 1, 37, 2, 5, 3, per_value=per_value, init=init, seed=7)
    _check(name, x, run=_run(32, 16), scale=0.7)


def test_per_value_varlen():
    cu = torch.tensor([0, 4, 4, 21])
    obj, x = _inputs("palimpsa", 1, 21, 1, 4, 3, init=True, N=3, seed=3)
    _check("palimpsa", x, cu_seqlens=cu, run=_run(16, 16), scale=0.5)


def test_per_value_through_dispatch():
    """backend='triton' routes b [B,T,H,V] to the per-value kernel (default segment 64)."""
    from metaplastic.kernels.dispatch import select_backend
    obj, x = _inputs("palimpsa", 2, 9, 1, 3, 2, seed=5)
    assert select_backend(obj, DEVICE if ON_GPU else "cuda", "triton", b=x["b"], V=2) == "triton_per_value"
    _check("palimpsa", x, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_value_low_precision_inputs(dtype):
    """fp32 / bf16 / fp16 inputs are computed in float32 and the output and gradients rounded to the input's
    dtype: against the float64 reference on the rounded inputs, to that dtype's resolution."""
    obj, x = _inputs("palimpsa", 1, 18, 1, 4, 3, seed=11)
    x = {key: val.to(dtype).double() for key, val in x.items()}
    _check("palimpsa", x, run=_run(16, 16), tol=max(1e-5, torch.finfo(dtype).eps), dtype=dtype, scale=0.6)


@pytest.mark.slow
def test_per_value_tiles():
    """Several key and value tiles in the backward (K = 40 in tiles of 16, V = 21 in tiles of 8)."""
    obj, x = _inputs("palimpsa", 1, 40, 1, 40, 21, init=True, seed=9)
    _check("palimpsa", x, run=_run(32, 16, block_k=16, block_v=8), scale=0.3)


def test_per_value_saved_state_bytes():
    """What autograd keeps beyond the inputs (which the kernels read in place): the states every 64 tokens,
    2·V·K·4/64 bytes per token and head (2 KB at K = V = 128); measured at K = V = 8 on 128 tokens."""
    obj, x = _inputs("palimpsa", 1, 128, 1, 8, 8, seed=1)
    leaves, _ = _leaves(x, torch.float32, DEVICE)
    exclude = {t.untyped_storage().data_ptr() for t in leaves.values()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    from metaplastic.kernels.per_value import per_value_run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_value_run(prepare(obj, **leaves))
    states = 2 * 8 * 8 * 4 * 2  # (M, J) at the start of each of the two 64-token segments, fp32
    assert states <= sum(seen.values()) <= states + 8  # and the prior precision [H]
    assert 2 * 128 * 128 * 4 / 64 == 2048
