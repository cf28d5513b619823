"""The chunked torch path (kernels/chunk.py) against the reference scan, fla's naive functions and gradcheck.

Every registry entry with likelihood ``dot`` or ``dot_diag`` runs through ``chunk_scan`` in float64 and must
match :func:`metaplastic.scan` (outputs, final states, variances) and autograd through it (every gradient)
to rounding error. The hand-written backwards are also checked by ``torch.autograd.gradcheck``.
"""
import pytest
import torch

import metaplastic
from metaplastic.kernels.chunk import ChunkDot, DiagonalScan, chunk_scan
from metaplastic.kernels.chunk_grouped import GroupedDiagonal
from metaplastic.kernels.chunk_per_value import PerValueScan
from metaplastic.kernels import cpu_per_value
from metaplastic.oracles import ORACLES, scan_kwargs

from helpers import assert_close, check_against_reference, scan_inputs, scan_leaves

CHUNK_MODELS = [name for name, spec in metaplastic.registry.items()
                if spec.objective.likelihood in ("dot", "dot_diag")]
TOL = 1e-10  # float64 against float64: rounding only

# (B, T, H, K, V, chunk_size): T = 1, T not a multiple of the chunk, K = 5, V = 3, H > 1, T < chunk
SHAPES = [(2, 1, 2, 5, 3, 4), (1, 13, 3, 5, 3, 4), (2, 9, 2, 4, 6, 16)]


INPUTS = dict(keys=1.0)  # keys N(0, 1), not normalised (b head-shared unless b_per_value=True)


def _compare(obj, x, *, cu_seqlens=None, chunk_size=4, initial_precision_grad=True):
    # with T = 1 and a zero initial state the decay multiplies nothing: its gradient is truly 0
    decay_dead = x["q"].shape[1] == 1 and "initial_state" not in x
    check_against_reference(obj, x, lambda o, **kw: chunk_scan(o, **kw, chunk_size=chunk_size), rtol=TOL,
                            cu_seqlens=cu_seqlens, grad_initial_precision=initial_precision_grad,
                            may_vanish=("log_decay",) if decay_dead else (), scale=0.7)


def _cases():
    for name in CHUNK_MODELS:
        diagonal = metaplastic.registry[name].objective.posterior == "diagonal"
        for shape in SHAPES:
            for b_per_value in ((False, True) if diagonal else (False,)):
                # "shared": I_0 constant over value rows, without a gradient (the limit-7 fast path with
                # b [B,T,H]); "shared+grad": the same I_0 requiring a per-row gradient (general path)
                inits = (None, "shared", "shared+grad", "random") if diagonal else (None, "random")
                for init in inits:
                    yield pytest.param(name, shape, b_per_value, init,
                                       id=f"{name}-{shape}-b{'V' if b_per_value else 'H'}-init{init}")


@pytest.mark.parametrize("name,shape,b_per_value,init", list(_cases()))
def test_chunk_matches_reference_scan(name, shape, b_per_value, init):
    B, T, H, K, V, C = shape
    obj, x = scan_inputs(name, B, T, H, K, V, b_per_value=b_per_value, init=init and init.split("+")[0],
                         seed=T + K, **INPUTS)
    _compare(obj, x, chunk_size=C, initial_precision_grad=init != "shared")


@pytest.mark.parametrize("name", CHUNK_MODELS)
@pytest.mark.parametrize("b_per_value", [False, True])
def test_chunk_varlen(name, b_per_value):
    if b_per_value and metaplastic.registry[name].objective.posterior != "diagonal":
        pytest.skip("b only exists for the diagonal posterior")
    cu = torch.tensor([0, 5, 5, 12, 13])  # includes an empty sequence and one of length 1
    obj, x = scan_inputs(name, 1, 13, 2, 5, 3, b_per_value=b_per_value, init="random", N=4, seed=3, **INPUTS)
    _compare(obj, x, cu_seqlens=cu, chunk_size=4)


@pytest.mark.parametrize("name", [n for n in CHUNK_MODELS if metaplastic.registry[n].objective.posterior == "point"])
def test_chunk_matches_independent_reference(name):
    """The chunked path against fla's / transformers' own implementations (float32 oracles: 1e-6)."""
    oracles = [o for o in ORACLES if o.model == name and o.available()]
    if not oracles:
        pytest.skip(f"no independent reference importable for {name}")
    spec = metaplastic.registry[name]
    for oracle in oracles:
        x = oracle.inputs(2, 11, 2, 6, 6, seed=5, initial_state=True)
        ref_out, ref_state = oracle.reference(x)
        res = chunk_scan(spec.objective, **scan_kwargs(x), scale=spec.scale_for(6), output_final_state=True,
                         chunk_size=4)
        assert_close(res.output, ref_out, rtol=1e-6)
        for key, val in ref_state.items():
            assert_close(res.final_state[key], val, rtol=1e-6)


@pytest.mark.parametrize("vector", [False, True])
def test_gradcheck_chunk_dot(vector):
    gen = torch.Generator().manual_seed(0)
    B, H, T, K, V, C = 1, 2, 7, 3, 2, 3
    d = dict(dtype=torch.float64, generator=gen)
    q, k, v = torch.randn(B, H, T, K, **d), torch.randn(B, H, T, K, **d), torch.randn(B, H, T, V, **d)
    g = torch.log(0.5 + 0.5 * torch.rand(B, H, T, K if vector else 1, **d))
    S0 = torch.randn(B, H, V, K, **d)
    args = [t.requires_grad_(True) for t in (q, k, v, g, S0)]
    assert torch.autograd.gradcheck(lambda *a: ChunkDot.apply(*a, 0.8, C), args)


@pytest.mark.parametrize("b_per_value", [False, True])
def test_gradcheck_palimpsa(b_per_value):
    obj, x = scan_inputs("palimpsa", 1, 5, 2, 3, 2, b_per_value=b_per_value, init="shared", seed=7, **INPUTS)
    names = [key for key in x if key != "initial_state"]
    # head-shared b: the fast path (I_0 without grad)
    _, leaves = scan_leaves(x, grad_initial_precision=b_per_value)
    leaves = list(leaves.values())
    I0 = x["initial_state"]["I"]

    def f(*args):
        kw = dict(zip(names, args[:len(names)]))
        kw["initial_state"] = {"mu": args[len(names)], "I": args[len(names) + 1] if b_per_value else I0}
        res = chunk_scan(obj, **kw, scale=0.6, output_final_state=True, output_variance=True, chunk_size=2)
        return res.output, res.variance, res.final_state["mu"], res.final_state["I"]

    assert torch.autograd.gradcheck(f, leaves)


def test_chunk_float32_and_bfloat16_inputs():
    obj, x = scan_inputs("palimpsa", 2, 20, 2, 8, 8, seed=11, b_per_value=False, **INPUTS)
    ref = metaplastic.scan(obj, **x, scale=0.5, output_variance=True)
    x32 = {key: val.float() for key, val in x.items()}
    got = chunk_scan(obj, **x32, scale=0.5, output_variance=True, chunk_size=8)
    assert got.output.dtype == torch.float32
    assert_close(got.output, ref.output, rtol=1e-4)
    assert_close(got.variance, ref.variance, rtol=1e-4)
    xb = dict(x32, q=x32["q"].bfloat16(), k=x32["k"].bfloat16(), v=x32["v"].bfloat16())
    ref_b = metaplastic.scan(obj, **xb, scale=0.5)
    got_b = chunk_scan(obj, **xb, scale=0.5, chunk_size=8)
    assert got_b.output.dtype == torch.bfloat16
    assert_close(got_b.output.float(), ref_b.output.float(), rtol=1e-2)


def test_chunk_strong_decay_is_finite():
    """Cumulative log-decays far below float32's exp range inside one chunk: exponents stay ≤ 0."""
    obj, x = scan_inputs("gla", 1, 64, 1, 4, 4, seed=2, b_per_value=False, **INPUTS)
    x["log_decay"] = x["log_decay"] * 0 - 30.0
    x32 = {key: val.float() for key, val in x.items()}
    got = chunk_scan(obj, **x32, chunk_size=64)
    ref = metaplastic.scan(obj, **x)
    assert torch.isfinite(got.output).all()
    assert_close(got.output, ref.output, rtol=1e-5)


@pytest.mark.parametrize("name,message", [("deltanet", "regression"), ("mesanet", "regression")])
def test_chunk_rejects_other_likelihoods(name, message):
    obj, x = scan_inputs("simple_gla", 1, 3, 1, 2, 2, b_per_value=False, **INPUTS)
    with pytest.raises(ValueError, match=message):
        chunk_scan(metaplastic.registry[name].objective, x["q"], x["k"], x["v"])


def test_chunk_rejects_bad_arguments():
    obj, x = scan_inputs("simple_gla", 1, 3, 1, 2, 2, b_per_value=False, **INPUTS)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_scan(obj, **x, chunk_size=0)
    with pytest.raises(ValueError, match="log_decay"):
        chunk_scan(obj, x["q"], x["k"], x["v"])
    with pytest.raises(ValueError, match="variance"):
        chunk_scan(obj, **x, output_variance=True)


@pytest.mark.parametrize("name,b_per_value,init,expected", [
    ("palimpsa", False, None, {"GroupedDiagonal"}),
    ("palimpsa", False, "shared", {"GroupedDiagonal"}),
    ("palimpsa", True, None, {"per-value"}), ("palimpsa", False, "random", {"per-value"}),
    ("meta_gla", True, None, {"per-value"})])
def test_chunk_takes_the_limit7_fast_path(monkeypatch, name, b_per_value, init, expected):
    """Head-shared b with a row-constant I_0: the precision is a K-vector, read as simple GLA with q ⊘ I
    (docs/theory.md#limit-7-head-shared-importance, the grouped path with G = 1); otherwise the per-value path materialises I chunk by
    chunk (a token-by-token block scan: kernels/chunk_per_value.py). The torch routing, with the fused C
    kernel off (on, it takes these small shapes whatever b's groups: tests/kernels/test_grouped_importance.py)."""
    monkeypatch.setenv("METAPLASTIC_CPU_KERNEL", "0")
    expected = {"DiagonalScan" if e == "per-value" else e for e in expected}
    used = set()

    def spy(cls, label):
        apply = cls.apply

        def wrapped(*args):
            used.add(label(args))
            return apply(*args)
        monkeypatch.setattr(cls, "apply", wrapped)

    spy(ChunkDot, lambda a: "ChunkDot")
    spy(DiagonalScan, lambda a: "DiagonalScan")
    spy(PerValueScan, lambda a: "PerValueScan")
    spy(GroupedDiagonal, lambda a: "GroupedDiagonal")
    native = cpu_per_value.native_per_value_scan
    monkeypatch.setattr(cpu_per_value, "native_per_value_scan", lambda *a, **kw: used.add("native") or native(*a, **kw))
    obj, x = scan_inputs(name, 1, 6, 1, 2, 3, b_per_value=b_per_value, init=init, **INPUTS)
    chunk_scan(obj, **x)
    assert used == expected


# ----------------------------------------------------------------------------- the chunked Triton forward
TRITON_CHUNK_MODELS = [name for name in CHUNK_MODELS if metaplastic.registry[name].objective.forgetting != "vector"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (tests/conftest.py)


def _to_device32(x):
    out = {key: val.float().to(DEVICE) for key, val in x.items() if key != "initial_state"}
    if "initial_state" in x:
        out["initial_state"] = {key: val.float().to(DEVICE) for key, val in x["initial_state"].items()}
    return out


def _triton_cases():
    # (B, T, H, K, V, chunk): T < chunk, T not a multiple of the chunk, K = 5, V = 3
    for name in TRITON_CHUNK_MODELS:
        diagonal = metaplastic.registry[name].objective.posterior == "diagonal"
        yield pytest.param(name, (2, 21, 2, 5, 3, 16), None, id=f"{name}-T21")
        yield pytest.param(name, (1, 1, 1, 4, 4, 16), "shared" if diagonal else "random", id=f"{name}-T1-init")


@pytest.mark.parametrize("name,shape,init", list(_triton_cases()))
def test_triton_chunk_matches_reference(name, shape, init):
    """The Triton forward in float32 against the float64 reference (≤ 1e-4), and the gradients through it."""
    from metaplastic.kernels.chunk_triton import chunk_triton_scan
    B, T, H, K, V, C = shape
    obj, x = scan_inputs(name, B, T, H, K, V, init=init, seed=T, b_per_value=False, **INPUTS)
    check_against_reference(obj, x, lambda o, **kw: chunk_triton_scan(o, **kw, chunk_size=C), rtol=1e-4,
                            dtype=torch.float32, device=DEVICE, grad_initial_precision=False, scale=0.7)


def test_triton_chunk_varlen():
    from metaplastic.kernels.chunk_triton import chunk_triton_scan
    obj, x = scan_inputs("palimpsa", 1, 20, 2, 5, 3, init="shared", N=3, seed=4, b_per_value=False, **INPUTS)
    cu = torch.tensor([0, 3, 20, 20])
    kw = dict(scale=0.5, output_final_state=True, output_variance=True, cu_seqlens=cu)
    ref = metaplastic.scan(obj, **x, **kw)
    got = chunk_triton_scan(obj, **_to_device32(x), **dict(kw, cu_seqlens=cu.to(DEVICE)), chunk_size=16)
    assert_close(got.output.cpu(), ref.output, rtol=1e-4)
    assert_close(got.variance.cpu(), ref.variance, rtol=1e-4)
    for key in ref.final_state:
        assert_close(got.final_state[key].cpu(), ref.final_state[key], rtol=1e-4)


@pytest.mark.parametrize("name,b_per_value,message", [("gla", False, "vector"), ("palimpsa", True, "per value"),
                                                      ("deltanet", False, "regression")])
def test_triton_chunk_rejects_uncovered_settings(name, b_per_value, message):
    from metaplastic.kernels.chunk_triton import chunk_triton_scan
    obj, x = scan_inputs(name, 1, 3, 1, 2, 2, b_per_value=b_per_value, **INPUTS)
    with pytest.raises(ValueError, match=message):
        chunk_triton_scan(obj, **_to_device32(x))


def test_triton_chunk_kernel_tiles():
    """Several key and value tiles (K = 40, V = 35 in tiles of 16) and T not a multiple of the chunk."""
    from metaplastic.kernels.chunk_triton import chunk_dot_triton_forward
    obj, x = scan_inputs("simple_gla", 1, 37, 2, 40, 35, init="random", seed=9, b_per_value=False, **INPUTS)
    ref = metaplastic.scan(obj, x["q"], x["k"], x["v"], log_decay=x["log_decay"], scale=0.3,
                           initial_state=x["initial_state"], output_final_state=True)
    heads_first = {key: x[key].float().transpose(1, 2).to(DEVICE) for key in ("q", "k", "v", "log_decay")}
    o, states = chunk_dot_triton_forward(heads_first["q"], heads_first["k"], heads_first["v"],
                                         heads_first["log_decay"][..., None],
                                         x["initial_state"]["S"].float().to(DEVICE),
                                         0.3, 16, block_k=16, block_v=16)
    assert_close(o.transpose(1, 2).cpu(), ref.output, rtol=1e-4)
    assert_close(states[:, :, -1].cpu(), ref.final_state["S"], rtol=1e-4)
