"""The fused C kernel of per-value Palimpsa (kernels/cpu_per_value.py) against the reference scan.

Float64 against :func:`metaplastic.scan` (token by token, autograd): outputs, variance, final states and the
gradient of every input, for scalar (palimpsa) and per-key (meta_gla) decay, with and without an initial
state and the variance, chunks that do not divide T; float32 to float32 rounding; a log-decay at the floor
(a full reset); NaN inputs propagated as the reference propagates them. Also the build cache: reused, a
corrupted library rebuilt, concurrent builds, and the fallback to the torch path.
"""
import threading

import pytest
import torch

import metaplastic
from metaplastic.kernels import chunk_per_value
from metaplastic.kernels import cpu_per_value as cpv
from metaplastic.kernels.dispatch import scan as kernel_scan

from helpers import assert_close, check_against_reference, random_inputs

pytestmark = pytest.mark.skipif(cpv.compiler() is None, reason="no C compiler (sysconfig CC, cc, gcc)")
TOL = 1e-10


@pytest.fixture
def native(monkeypatch):
    """Force the kernel (a failed build fails the test) and count its calls."""
    assert cpv.native_unavailable_reason() is None, cpv.native_unavailable_reason()
    monkeypatch.setattr(chunk_per_value, "FORM", "native")
    calls = []
    original = cpv.native_per_value_scan

    def spy(*a, **kw):
        calls.append(a[0].dtype)
        return original(*a, **kw)
    monkeypatch.setattr(cpv, "native_per_value_scan", spy)
    return calls


def _compare(model, x, with_var, chunk_size, rtol, grad_rtol=None):
    """``backend='chunk'`` (in ``x``'s dtype) against the float64 reference scan, with every gradient."""
    def run(obj, **kw):
        return kernel_scan(obj, **kw, backend="chunk", chunk_size=chunk_size)
    check_against_reference(metaplastic.registry[model].objective, x, run, rtol=rtol, grad_rtol=grad_rtol,
                            output_variance=with_var, scale=0.6)


@pytest.mark.parametrize("model", ["palimpsa", "meta_gla"])  # scalar and per-key decay
@pytest.mark.parametrize("init", [None, "random"])
@pytest.mark.parametrize("with_var", [False, True])
def test_native_matches_reference_float64(native, model, init, with_var):
    x = random_inputs(model, B=2, T=11, H=2, K=5, V=3, seed=3, init=init, keys=1.0)
    _compare(model, x, with_var, chunk_size=4, rtol=TOL)  # chunks of 4 over 11 tokens
    assert native == [torch.float64]


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_native_chunk_sizes(native, chunk_size):
    x = random_inputs("palimpsa", B=1, T=37, H=2, K=4, V=4, seed=chunk_size, init="random", keys=1.0)
    _compare("palimpsa", x, True, chunk_size=chunk_size, rtol=TOL)


@pytest.mark.parametrize("model", ["palimpsa", "meta_gla"])
def test_native_float32(native, model):
    x = random_inputs(model, B=2, T=40, H=2, K=8, V=8, seed=5, init="random", keys=1.0, dtype=torch.float32)
    _compare(model, x, True, chunk_size=16, rtol=2e-5, grad_rtol=5e-5)
    assert native == [torch.float32]


def test_native_decay_at_the_floor_resets(native):
    """A log-decay at or below the floor (here -1e6 and -inf) forgets everything before it, as the reference."""
    x = random_inputs("palimpsa", B=1, T=9, H=2, K=3, V=4, seed=2, init="random", keys=1.0)
    x["log_decay"][0, 4, 0] = -1e6
    x["log_decay"][0, 6, 1] = -float("inf")
    _compare("palimpsa", x, True, chunk_size=4, rtol=TOL)


def _heads_first_call(x, obj_scale=0.6):
    """The kernel's arguments for ``random_inputs`` of palimpsa (``b`` per value row, an initial state)."""
    t = (lambda a: a.transpose(1, 2))
    q, k, v = t(x["q"]), t(x["k"]), t(x["v"])
    bv = t(x["beta"])[..., None] * v
    H = q.shape[1]
    Ip = x["prior_precision"].view(1, H, 1, 1, 1)
    I0, mu0 = x["initial_state"]["I"], x["initial_state"]["mu"]
    return (q, k, bv, t(x["b"]), t(x["log_decay"])[..., None], I0 * mu0, I0 - Ip.view(1, H, 1, 1), Ip, obj_scale)


@pytest.mark.parametrize("where", ["q", "k", "v", "b"])
def test_native_nan_propagates_like_the_reference(where):
    """The kernel itself, with no sanitising in front: a NaN entry makes exactly the outputs and final-state
    entries NaN that the reference scan makes NaN, and the rest equal."""
    assert cpv.native_unavailable_reason() is None, cpv.native_unavailable_reason()
    x = random_inputs("palimpsa", B=1, T=8, H=2, K=3, V=4, seed=9, init="random", keys=1.0)
    x[where][0, 3, 1, 1] = float("nan")
    ref = metaplastic.scan(metaplastic.registry["palimpsa"].objective, **x, scale=0.6, output_final_state=True,
                           output_variance=True)
    with torch.no_grad():
        o, var, M_T, J_T = cpv.native_per_value_scan(*_heads_first_call(x), chunk_size=3, with_var=True)
    Ip = x["prior_precision"].view(1, -1, 1, 1)
    assert torch.isnan(ref.output).any()
    assert_close(o.transpose(1, 2), ref.output, rtol=TOL, msg="output")
    assert_close(var.transpose(1, 2), ref.variance, rtol=TOL, msg="variance")
    assert_close(J_T + Ip, ref.final_state["I"], rtol=TOL, msg="I")
    assert_close(M_T / (J_T + Ip), ref.final_state["mu"], rtol=TOL, msg="mu")


def test_native_nan_through_the_entry_layer(native):
    """Through ``backend='chunk'`` (sanitised and marked by kernels/nonfinite.py): equal to the reference where
    it is finite, and finite with the clean values before the corrupted token."""
    obj = metaplastic.registry["palimpsa"].objective
    x = random_inputs("palimpsa", B=2, T=10, H=2, K=3, V=4, seed=4, dtype=torch.float32)
    kw = dict(scale=0.6, output_final_state=True, output_variance=True, backend="chunk", chunk_size=4)
    clean = kernel_scan(obj, **x, **kw)
    x["k"][1, 6, 0, 2] = float("nan")
    got = kernel_scan(obj, **x, **kw)
    ref = kernel_scan(obj, **x, **{**kw, "backend": "reference"})
    finite = torch.isfinite(ref.output)
    assert not finite.all()
    assert_close(got.output[finite], ref.output[finite], rtol=2e-5, msg="output")
    assert torch.equal(torch.isfinite(got.output), finite)
    assert_close(got.output[1, :6], clean.output[1, :6], rtol=1e-6, msg="before the corrupted token")
    assert_close(got.output[0], clean.output[0], rtol=1e-6, msg="the other sequence")
    assert native


def test_default_form_is_native_on_cpu():
    assert cpv.native_unavailable_reason() is None, cpv.native_unavailable_reason()
    x = torch.zeros(1, 1, 2, 2)
    assert chunk_per_value.default_form(x) == "native"
    assert chunk_per_value.default_form(x.to(torch.bfloat16)) == "scan"


# ------------------------------------------------------------------------------------------ the build
@pytest.fixture
def quick_build(monkeypatch, tmp_path):
    """Unoptimised builds (fast) into a temporary cache; counts the compiler runs."""
    monkeypatch.setattr(cpv, "FLAGS", ("-O0", "-fPIC", "-shared"))
    runs = []
    original = cpv._compile

    def counted(cc, out):
        runs.append(out)
        return original(cc, out)
    monkeypatch.setattr(cpv, "_compile", counted)
    return tmp_path, runs


def _forward_works(lib_path):
    lib = cpv._bind(__import__("ctypes").CDLL(str(lib_path)))
    return lib.pv_abi_version() == cpv.ABI_VERSION


def test_build_is_cached(quick_build):
    folder, runs = quick_build
    first = cpv.build(folder)
    second = cpv.build(folder)
    assert first == second and len(runs) == 1
    assert _forward_works(second)
    assert sorted(p.name for p in folder.iterdir()) == [first.name, first.name + ".sha256"]  # no leftovers


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_digest"])
def test_damaged_library_is_rebuilt_not_loaded(quick_build, damage):
    folder, runs = quick_build
    lib = cpv.build(folder)
    data = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        lib.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        lib.with_name(lib.name + ".sha256").unlink()
    assert not cpv._valid(lib)
    again = cpv.build(folder)
    assert again == lib and len(runs) == 2 and cpv._valid(again)
    assert _forward_works(again)


def test_concurrent_builds(quick_build):
    folder, runs = quick_build
    paths, errors = [], []

    def one():
        try:
            paths.append(cpv.build(folder))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert cpv._valid(paths[0]) and _forward_works(paths[0])


def test_falls_back_to_torch_without_a_compiler(monkeypatch):
    monkeypatch.setattr(cpv, "compiler", lambda: None)
    monkeypatch.setattr(cpv, "_TRIED", False)
    monkeypatch.setattr(cpv, "_LIB", None)
    monkeypatch.setattr(cpv, "_REASON", None)
    assert "no C compiler" in cpv.native_unavailable_reason()
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert chunk_per_value.default_form(x) == "scan"
    inputs = random_inputs("palimpsa", B=1, T=5, H=1, K=2, V=2, seed=0)
    obj = metaplastic.registry["palimpsa"].objective
    got = kernel_scan(obj, **inputs, backend="chunk")
    ref = metaplastic.scan(obj, **inputs)
    assert_close(got.output, ref.output, rtol=TOL)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpv.DISABLE_ENV, "0")
    assert cpv.DISABLE_ENV in cpv.native_unavailable_reason()
    assert chunk_per_value.default_form(torch.zeros(1, dtype=torch.float64)) == "scan"
