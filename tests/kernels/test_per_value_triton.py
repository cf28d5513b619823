"""The per-value Palimpsa Triton kernels (``b [B,T,H,V]``), forward and backward, against autograd through
the reference scan. Float64 through the Triton interpreter on CPU (tests/conftest.py), float32 on a GPU."""
import pytest
import torch

import metaplastic
from helpers import assert_close, check_against_reference, scan_inputs, scan_leaves
from metaplastic.kernels.dispatch import scan as dispatch_scan
from metaplastic.kernels.entry import prepare

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float32 if ON_GPU else torch.float64
TOL = 1e-5 if ON_GPU else 1e-10


# unit-norm keys, decays in (0.5, 1), β in (0.5, 1.5) per head, b per value row unless b_per_value=False, the
# prior precision 1; init="random": a random initial state
INPUTS = dict(beta_min=0.5, beta_per_value=False, prior_precision=False)


def _check(name, x, cu_seqlens=None, run=None, tol=TOL, dtype=DTYPE, **kw):
    """``run`` (default: ``backend='triton_per_value'``) against the reference scan, with every gradient."""
    def under_test(obj, **inputs):
        if run is None:
            return dispatch_scan(obj, **inputs, backend="triton_per_value")
        return run(prepare(obj, **inputs))
    check_against_reference(metaplastic.registry[name].objective, x, under_test, rtol=tol, dtype=dtype,
                            device=DEVICE, cu_seqlens=cu_seqlens, **kw)


def _run(segment, block_v=None):
    from metaplastic.kernels.per_value import per_value_run
    return lambda call: per_value_run(call, segment=segment, block_v=block_v)


@pytest.mark.parametrize("name,per_value,init", [("palimpsa", True, True), ("meta_mamba2", True, False),
                                                 ("palimpsa", False, False)])
def test_per_value_matches_reference(name, per_value, init):
    """Three segments of 16 tokens, the last one partly past T = 37; two value rows per backward program
    of V = 3 (the second program half masked)."""
    obj, x = scan_inputs(name, 1, 37, 2, 5, 3, b_per_value=per_value, init="random" if init else None, seed=7,
                         **INPUTS)
    _check(name, x, run=_run(16, 2), scale=0.7)


def test_per_value_beta_per_value_row_without_decay():
    """β per value row (``[B,T,H,V]``: dv = β d(βv) and dβ = v d(βv) stored per row by the backward) and
    Palimpsa without forgetting (no log-decay: every decay 1), two segments of 16 tokens; T = 23."""
    from dataclasses import replace
    obj, x = scan_inputs("palimpsa", 1, 23, 2, 4, 3, init="random", seed=17, **dict(INPUTS, beta_per_value=True))
    del x["log_decay"]
    run = _run(16, 2)
    check_against_reference(replace(obj, forgetting="none"), x, lambda o, **inputs: run(prepare(o, **inputs)),
                            rtol=TOL, dtype=DTYPE, device=DEVICE, scale=0.4)


def test_per_value_varlen():
    cu = torch.tensor([0, 4, 4, 21])
    obj, x = scan_inputs("palimpsa", 1, 21, 1, 4, 3, init="random", N=3, seed=3, **INPUTS)
    _check("palimpsa", x, cu_seqlens=cu, run=_run(8), scale=0.5)


def test_per_value_through_dispatch():
    """backend='triton' routes b [B,T,H,V] to the per-value kernel (default segment 64)."""
    from metaplastic.kernels.dispatch import select_backend
    obj, x = scan_inputs("palimpsa", 2, 9, 1, 3, 2, seed=5, **INPUTS)
    assert select_backend(obj, DEVICE if ON_GPU else "cuda", "triton", b=x["b"], V=2) == "triton_per_value"
    _check("palimpsa", x, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_value_low_precision_inputs(dtype):
    """fp32 / bf16 / fp16 inputs are computed in float32 and the output and gradients rounded to the input's
    dtype: against the float64 reference on the rounded inputs, to that dtype's resolution."""
    obj, x = scan_inputs("palimpsa", 1, 18, 1, 4, 3, seed=11, **INPUTS)
    x = {key: val.to(dtype).double() for key, val in x.items()}
    _check("palimpsa", x, run=_run(16), tol=max(1e-5, torch.finfo(dtype).eps), dtype=dtype, scale=0.6)


@pytest.mark.slow
def test_per_value_tiles():
    """Several value tiles in the backward (V = 21 in tiles of 8) at K = 40, two segments of 32 tokens."""
    obj, x = scan_inputs("palimpsa", 1, 40, 1, 40, 21, init="random", seed=9, **INPUTS)
    _check("palimpsa", x, run=_run(32, block_v=8), scale=0.3)


def test_per_value_saved_state_bytes():
    """What autograd keeps beyond the inputs (which the kernels read in place): the states every 64 tokens,
    2·V·K·4/64 bytes per token and head (2 KB at K = V = 128), and the final state (2·V·K·4 bytes per
    sequence and head); measured at K = V = 8 on 128 tokens."""
    obj, x = scan_inputs("palimpsa", 1, 128, 1, 8, 8, seed=1, **INPUTS)
    leaves, _ = scan_leaves(x, torch.float32, DEVICE)
    exclude = {t.untyped_storage().data_ptr() for t in leaves.values()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in exclude:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    from metaplastic.kernels.per_value import per_value_run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        per_value_run(prepare(obj, **leaves))
    states = 2 * 8 * 8 * 4 * 3  # (M, J) at the start of each of the two 64-token segments and the final, fp32
    assert states <= sum(seen.values()) <= states + 8  # and the prior precision [H]


def test_per_value_unused_outputs_and_strong_decay():
    """A loss on the output alone (the final state's and variance's cotangents are None: the backward reads
    neither) with decays down to 0.01 per token, across five segments of 8 tokens: gradients against the
    reference."""
    from metaplastic.kernels.per_value import per_value_run
    obj, x = scan_inputs("palimpsa", 1, 40, 2, 4, 3, init="random", seed=13, **INPUTS)
    x["log_decay"] = torch.log(0.01 + 0.99 * torch.rand(x["log_decay"].shape, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(2)))
    weights = torch.randn(1, 40, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for run in (None, lambda c: per_value_run(c, segment=8)):
        leaves, flat = scan_leaves(x, torch.float64 if run is None else DTYPE, "cpu" if run is None else DEVICE)
        flat = list(flat.values())
        kw = dict(scale=0.6, output_variance=True, output_final_state=True)
        res = metaplastic.scan(obj, **leaves, **kw) if run is None else run(prepare(obj, **leaves, **kw))
        grads.append(torch.autograd.grad((res.output.double().cpu() * weights).sum(), flat))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        assert_close(b.double().cpu(), a, rtol=TOL)
