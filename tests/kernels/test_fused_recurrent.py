"""The fused recurrent Triton kernel against the reference scan (CPU: Triton's interpreter).

Every registry entry: outputs, final states, variances and the gradients of every input (random cotangents
on the output, the variance and the final state), in float64 (tight) and float32 (≤ 1e-4 against the
float64 reference), with T not a multiple of the checkpoint interval, K = 5, V = 3, H = 2, initial states;
varlen batches with an empty and a one-token sequence; several value blocks per head; fp16 / bf16 inputs;
``torch.autograd.gradcheck`` of the hand-written backward.
"""
from __future__ import annotations

import math

import pytest
import torch

import metaplastic
from metaplastic import Objective, registry
from metaplastic.kernels.flags import kernel_flags
from metaplastic.kernels.fused_recurrent import fused_recurrent_scan
from metaplastic.oracles import relative_error

from helpers import assert_close, random_inputs

# compiled Triton on a GPU machine, the interpreter (tests/conftest.py) on a CPU one
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = list(registry)
ROWWISE = [n for n in NAMES if registry[n].objective.posterior != "full"]
F64 = torch.float64


def make_inputs(objective: Objective, B: int, T: int, H: int, K: int, V: int, *, beta_per_v: bool = False,
                b_per_v: bool = True, init: bool = True, N: int = None, seed: int = 0, dtype=F64):
    """Random inputs for ``objective`` split as ``(q/k/v, gates, initial state)`` on DEVICE (decays in (0.37, 1),
    β and b in (0, 1), keys N(0, 1/4)); q, k, v and the gates in ``dtype``, ``lam`` and the state in float64."""
    x = random_inputs(objective, B, T, H, K, V, seed=seed, beta_per_value=beta_per_v, b_per_value=b_per_v,
                      prior_precision=False, keys=0.5, decay_min=math.exp(-1), init="random" if init else None, N=N)
    state = x.pop("initial_state", None)
    qkv = {key: x.pop(key).to(DEVICE, dtype) for key in ("q", "k", "v")}
    kw = {key: t.to(DEVICE, dtype if key != "lam" else F64) for key, t in x.items()}
    state = None if state is None else {key: t.to(DEVICE) for key, t in state.items()}
    return qkv, kw, state


def model_inputs(name: str, B=2, T=7, H=2, K=5, V=3, **kwargs):
    spec = registry[name]
    x, kw, state = make_inputs(spec.objective, B, T, H, K, V, beta_per_v=spec.beta_per_value, **kwargs)
    kw["scale"] = spec.scale_for(K)
    return spec.objective, x, kw, state


def uses_kernel_backward(output: torch.Tensor) -> bool:
    """True when ``output``'s autograd graph goes through the hand-written Function (not a fallback)."""
    node, seen = output.grad_fn, 0
    while node is not None and seen < 10:
        if type(node).__name__ == "FusedRecurrentFunctionBackward":
            return True
        node = node.next_functions[0][0] if node.next_functions else None
        seen += 1
    return False


def run_both(objective, x, kw, state, *, grad: bool, cu_seqlens=None, **kernel_kw):
    """(reference, kernel) results and, with ``grad``, the gradients of every leaf under one random loss.

    The reference runs in float64 on the same values the kernel gets (float32 / fp16 / bf16 inputs are
    upcast after rounding), so the comparison measures the kernel's own error."""
    variance = objective.posterior != "point"
    results, grads = [], []
    for fn in ("ref", "kernel"):
        def leaf(t, requires_grad=grad):
            t = t.detach().to(F64) if fn == "ref" else t.detach().clone()
            return t.requires_grad_(requires_grad)

        # no gradient for prior_precision: it would send the kernel to its reference fallback
        leaves = {key: leaf(t, grad and key != "prior_precision") for key, t in {**x, **kw}.items()
                  if isinstance(t, torch.Tensor)}
        init = None if state is None else {key: leaf(t) for key, t in state.items()}
        args = {key: leaves.get(key, val) for key, val in kw.items()}
        if fn == "ref":
            res = metaplastic.scan(objective, leaves["q"], leaves["k"], leaves["v"], **args, initial_state=init,
                                   output_final_state=True, output_variance=variance, cu_seqlens=cu_seqlens)
        else:
            res = fused_recurrent_scan(objective, leaves["q"], leaves["k"], leaves["v"], **args,
                                       initial_state=init, output_final_state=True, output_variance=variance,
                                       cu_seqlens=cu_seqlens, **kernel_kw)
        results.append(res)
        if grad and fn == "kernel" and objective.posterior != "full":
            assert uses_kernel_backward(res.output), "the kernel fell back to the reference"
        if grad:
            gen = torch.Generator().manual_seed(123)
            def cot(t):  # the same random cotangent for both runs
                return torch.randn(t.shape, generator=gen, dtype=F64).to(t.device)

            loss = (res.output.double() * cot(res.output)).sum()
            for key in sorted(res.final_state):
                loss = loss + (res.final_state[key].double() * cot(res.final_state[key])).sum()
            if variance:
                loss = loss + (res.variance.double() * cot(res.variance)).sum()
            names = sorted(leaves) + ([] if init is None else ["init." + key for key in sorted(init)])
            tensors = [leaves[n] for n in sorted(leaves)] + ([] if init is None else [init[k] for k in sorted(init)])
            tensors = [(n, t) for n, t in zip(names, tensors) if t.requires_grad]
            gs = torch.autograd.grad(loss, [t for _, t in tensors], allow_unused=True)
            grads.append({n: g for (n, _), g in zip(tensors, gs)})
    return results, grads


def assert_results_close(results, grads, tol: float, grad_tol: float = None):
    """Kernel (second) against reference (first): output, final states, variance and every gradient."""
    ref, ker = results
    assert_close(ker.output, ref.output, rtol=tol, msg="output")
    assert set(ker.final_state) == set(ref.final_state)
    for key in ref.final_state:
        assert_close(ker.final_state[key], ref.final_state[key], rtol=tol, msg=f"final_state {key}")
    if ref.variance is not None:
        assert_close(ker.variance, ref.variance, rtol=tol, msg="variance")
    if grads:
        g_ref, g_ker = grads
        assert set(g_ref) == set(g_ker)
        for name in g_ref:
            assert g_ker[name] is not None and g_ker[name].shape == g_ref[name].shape, name
            assert_close(g_ker[name], g_ref[name], rtol=grad_tol or tol, msg=f"grad {name}")


# --------------------------------------------------------------------------------------------------
# every registry entry
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_forward_float64(name):
    objective, x, kw, state = model_inputs(name)
    results, _ = run_both(objective, x, kw, state, grad=False, checkpoint_every=3)
    assert_results_close(results, None, 1e-10)


@pytest.mark.parametrize("name", ROWWISE)
def test_gradients_float64(name):
    """Hand-written backward vs autograd through the reference; T = 7 with checkpoints every 3 tokens."""
    objective, x, kw, state = model_inputs(name)
    results, grads = run_both(objective, x, kw, state, grad=True, checkpoint_every=3)
    assert_results_close(results, grads, 1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_float32_against_float64_reference(name):
    objective, x, kw, state = model_inputs(name, seed=1)
    x32 = {key: t.float() for key, t in x.items()}
    kw32 = {key: t.float() if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    state32 = {key: t.float() for key, t in state.items()}
    results, _ = run_both(objective, x32, kw32, state32, grad=False, checkpoint_every=4)
    assert_results_close(results, None, 1e-4)
    assert results[1].output.dtype == torch.float32


@pytest.mark.parametrize("name", ROWWISE)
def test_gradients_float32_against_float64_reference(name):
    objective, x, kw, state = model_inputs(name, seed=2, T=6)
    x32 = {key: t.float() for key, t in x.items()}
    kw32 = {key: t.float() if isinstance(t, torch.Tensor) else t for key, t in kw.items()}
    state32 = {key: t.float() for key, t in state.items()}
    results, grads = run_both(objective, x32, kw32, state32, grad=True, checkpoint_every=4)
    assert_results_close(results, grads, 1e-4)
    assert all(g.dtype == torch.float32 for g in grads[1].values())


@pytest.mark.parametrize("name", NAMES)
def test_varlen_batches(name):
    """Packed sequences of lengths 3, 0, 5, 1 with per-sequence initial states, against the reference."""
    cu = torch.tensor([0, 3, 3, 8, 9], device=DEVICE)
    objective, x, kw, state = model_inputs(name, B=1, T=9, N=4, seed=3)
    grad = objective.posterior != "full"
    results, grads = run_both(objective, x, kw, state, grad=grad, cu_seqlens=cu, checkpoint_every=2)
    assert_results_close(results, grads, 1e-10)


@pytest.mark.parametrize("name", ["mamba2", "palimpsa", "gated_deltanet", "meta_longhorn", "mesanet"])
def test_single_token_no_initial_state(name):
    objective, x, kw, state = model_inputs(name, B=2, T=1, H=1, init=False)
    results, grads = run_both(objective, x, kw, None, grad=objective.posterior != "full")
    assert_results_close(results, grads, 1e-10)


@pytest.mark.parametrize("name", ["palimpsa", "gla", "meta_gated_deltanet", "longhorn", "meta_longhorn"])
def test_several_value_blocks(name):
    """block_v = 2 with V = 3: two programs per head, the second half-masked; partial sums over blocks."""
    objective, x, kw, state = model_inputs(name, T=5, seed=4)
    results, grads = run_both(objective, x, kw, state, grad=True, checkpoint_every=2, block_v=2)
    assert_results_close(results, grads, 1e-10)


@pytest.mark.parametrize("name", ["palimpsa", "gated_deltanet"])
@pytest.mark.parametrize("use", ["output", "final_state"])
def test_gradient_of_one_result_only(name, use):
    """A loss on the output alone (no final state asked for) or on the final state alone (output unused)."""
    objective, x, kw, state = model_inputs(name, T=5, seed=12)
    grads = []
    for fn in (metaplastic.scan, fused_recurrent_scan):
        leaves = [t.clone().requires_grad_(True) for t in (x["q"], x["k"], x["v"], kw["beta"])]
        res = fn(objective, *leaves[:3], **{**kw, "beta": leaves[3]}, initial_state=state,
                 output_final_state=use == "final_state")
        loss = res.output.square().sum() if use == "output" else sum(t.square().sum() for t in res.final_state.values())
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)  # the final state does not depend on q
        grads.append([torch.zeros_like(t) if g is None else g for g, t in zip(gs, leaves)])
    for g_ker, g_ref in zip(grads[1], grads[0]):
        assert (g_ker - g_ref).abs().max() <= 1e-10 * max(g_ref.abs().max(), 1)


def test_default_blocks_differ_between_forward_and_backward():
    """K = 64, V = 20: the forward runs one 32-row block per head, the backward two 16-row blocks."""
    objective, x, kw, state = model_inputs("palimpsa", B=1, T=3, H=1, K=64, V=20, seed=11)
    results, grads = run_both(objective, x, kw, state, grad=True, checkpoint_every=2)
    assert_results_close(results, grads, 1e-10)


# --------------------------------------------------------------------------------------------------
# settings that no registry entry uses, gate shapes, precisions
# --------------------------------------------------------------------------------------------------

EXTRA = [
    # (objective, beta per value, b per value)
    (Objective("regression", "point", "exact", "exact", "scalar"), False, False),     # exact proximal step
    (Objective("regression", "diagonal", "exact", "exact", "scalar"), True, False),   # diagonal Kalman step
    (Objective("regression", "diagonal", "gradient", "exact", "vector"), True, True),
    (Objective("regression", "point", "gradient", "exact", "vector"), True, False),
    (Objective("dot_diag", "diagonal", "exact", "exact", "scalar"), True, False),     # head-shared b (limit 7)
    (Objective("dot_diag", "diagonal", "exact", "exact", "none"), False, True),
    (Objective("dot", "point", "exact", "exact", "vector"), True, False),
    (Objective("regression", "diagonal", "exact", "diagonal", "vector"), False, False),
]


def _extra_id(p):
    return p.describe() if isinstance(p, Objective) else str(p)


@pytest.mark.parametrize("objective,beta_per_v,b_per_v", EXTRA, ids=_extra_id)
def test_other_objectives_and_gate_shapes(objective, beta_per_v, b_per_v):
    x, kw, state = make_inputs(objective, 2, 6, 2, 5, 3, beta_per_v=beta_per_v, b_per_v=b_per_v, seed=5)
    kw["scale"] = 0.7
    kw["prior_precision"] = torch.tensor([1.5, 0.8], dtype=F64, device=DEVICE)
    results, grads = run_both(objective, x, kw, state, grad=True, checkpoint_every=4)
    assert_results_close(results, grads, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["mamba2", "palimpsa", "gated_deltanet"])
def test_half_precision_inputs(name, dtype):
    """fp16 / bf16 inputs are computed in fp32. The reference runs in float64 on the same rounded inputs,
    so the output (stored in the input dtype) may differ by one rounding, ≤ eps(dtype) of max|o|; states
    (fp32) by fp32 arithmetic only. Gradients come back in the input dtype (one rounding again)."""
    objective, x, kw, state = model_inputs(name, T=6, seed=6, dtype=dtype)
    state = {key: t.float() for key, t in state.items()}
    results, grads = run_both(objective, x, kw, state, grad=True, checkpoint_every=4)
    ref, ker = results
    eps = torch.finfo(dtype).eps
    assert ker.output.dtype == dtype
    assert_close(ker.output, ref.output, rtol=eps, msg="output")
    for key in ref.final_state:
        assert ker.final_state[key].dtype == torch.float32
        assert_close(ker.final_state[key], ref.final_state[key], rtol=1e-4, msg=key)
    for name_, g in grads[0].items():
        assert grads[1][name_].dtype == (dtype if name_ in x or name_ in kw else torch.float32)
        assert_close(grads[1][name_], g, rtol=eps, msg=name_)


@pytest.mark.parametrize("name,fast", [("palimpsa", True), ("gated_deltanet", True), ("meta_longhorn", True)] + [
    pytest.param(n, False, marks=pytest.mark.slow) for n in ("palimpsa", "gated_deltanet", "meta_longhorn", "gla")])
def test_gradcheck(name, fast):
    """torch.autograd.gradcheck (finite differences) of the hand-written backward, tiny float64 inputs
    (``fast_mode`` checks a random projection of the Jacobian; the full check is marked slow)."""
    objective, x, kw, state = model_inputs(name, B=1, T=3, H=1, K=2, V=2, seed=7)
    names = ["q", "k", "v"] + [n for n in ("log_decay", "beta", "b") if n in kw] + sorted(state)
    inputs = [x[n] if n in x else kw[n] if n in kw else state[n] for n in names]
    inputs = [t.clone().requires_grad_(True) for t in inputs]

    def fn(*tensors):
        d = dict(zip(names, tensors))
        init = {n: d.pop(n) for n in sorted(state)}
        res = fused_recurrent_scan(objective, d.pop("q"), d.pop("k"), d.pop("v"), **d, scale=kw["scale"],
                                   initial_state=init, output_final_state=True,
                                   output_variance=objective.posterior != "point", checkpoint_every=2)
        out = (res.output,) + tuple(res.final_state[n] for n in sorted(res.final_state))
        return out + ((res.variance,) if res.variance is not None else ())

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


# --------------------------------------------------------------------------------------------------
# full posterior, checkpoints, errors
# --------------------------------------------------------------------------------------------------

def test_full_posterior_cg_steps():
    """MesaNet: K CG steps (None) are exact; fewer steps are an approximation that improves with steps."""
    objective, x, kw, state = model_inputs("mesanet", T=6, K=8, V=4, seed=8)
    ref = metaplastic.scan(objective, x["q"], x["k"], x["v"], **kw, initial_state=state)
    errs = []
    for steps in (1, 3, None):
        out = fused_recurrent_scan(objective, x["q"], x["k"], x["v"], **kw, initial_state=state, cg_steps=steps)
        errs.append(relative_error(out.output, ref.output))
    assert errs[2] <= 1e-10
    assert errs[0] > errs[2]


@pytest.mark.parametrize("start", ["zero", "previous", "diagonal"])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_full_posterior_cg_readout_equals_reference(start, eps):
    """A ReadoutSolver with method 'cg' runs the same steps from the same start as the reference scan (varlen:
    the warm start restarts per sequence)."""
    objective, x, kw, state = model_inputs("mesanet", T=6, K=8, V=4, seed=12)
    readout = metaplastic.ReadoutSolver("cg", 2, start, eps)
    outputs = []
    for cu in (None, torch.tensor([0, 5, 12])):
        args = {key: (t.reshape(1, -1, *t.shape[2:]) if cu is not None else t) for key, t in x.items()}
        gates = {key: (t.reshape(1, -1, *t.shape[2:]) if cu is not None and torch.is_tensor(t) and t.dim() > 2 else t)
                 for key, t in kw.items()}
        init = state if cu is None else None
        ref = metaplastic.scan(objective, **args, **gates, initial_state=init, cu_seqlens=cu, readout=readout,
                               output_variance=True)
        out = fused_recurrent_scan(objective, **args, **gates, initial_state=init, cu_seqlens=cu, readout=readout,
                                   output_variance=True)
        assert_close(out.output, ref.output, rtol=1e-12)
        assert_close(out.variance, ref.variance, rtol=1e-12)
        outputs.append(ref.output)
    exact = metaplastic.scan(objective, **x, **kw, initial_state=state).output
    assert relative_error(outputs[0], exact) > 1e-6  # two steps are not the exact solve at K = 8
    with pytest.raises(ValueError, match="conflicts"):
        fused_recurrent_scan(objective, **x, **kw, readout=readout, cg_steps=3)


def test_full_posterior_gradients_fall_back_to_reference():
    """The full posterior's gradients are autograd through metaplastic.scan (documented fallback)."""
    objective, x, kw, state = model_inputs("mesanet", T=5, seed=9)
    results, grads = run_both(objective, x, kw, state, grad=True)
    assert_results_close(results, grads, 1e-12)
    assert set(grads[1]) >= {"q", "k", "v", "log_decay", "beta", "lam", "init.G", "init.H"}


def test_prior_precision_gradient_falls_back_to_reference():
    """A prior_precision that requires grad is differentiated by autograd through metaplastic.scan."""
    objective, x, kw, state = model_inputs("palimpsa", T=4, seed=10)
    ip = [torch.tensor([1.5, 0.7], dtype=F64, device=DEVICE, requires_grad=True) for _ in range(2)]
    outs = [fn(objective, x["q"], x["k"], x["v"], **kw, prior_precision=p, initial_state=state).output
            for fn, p in zip((metaplastic.scan, fused_recurrent_scan), ip)]
    grads = [torch.autograd.grad(o.square().sum(), p)[0] for o, p in zip(outs, ip)]
    assert grads[0].abs().max() > 0
    assert_close(grads[1], grads[0], rtol=1e-12)


def test_checkpoints_fit_two_kilobytes_per_token_and_head():
    """Palimpsa at K = V = 128, fp32, checkpoint_every = 64: the saved states take ≤ 2 KB per token and head."""
    objective = registry["palimpsa"].objective
    T, H, K, V = 64, 1, 128, 128
    x, kw, _ = make_inputs(objective, 1, T, H, K, V, init=False, dtype=torch.float32)
    x["q"].requires_grad_(True)
    res = fused_recurrent_scan(objective, x["q"], x["k"], x["v"], **kw, checkpoint_every=64, block_v=128)
    node = res.output.grad_fn
    while type(node).__name__ != "FusedRecurrentFunctionBackward":
        node = node.next_functions[0][0]
    saved = node.saved_tensors
    inputs = {id(t) for t in saved[:8] if t is not None}
    ckpt_bytes = sum(t.numel() * t.element_size() for t in saved[8:] if t is not None and id(t) not in inputs)
    assert 0 < ckpt_bytes / (T * H) <= 2048


def test_kernel_flags_cover_every_setting():
    flags = {name: kernel_flags(registry[name].objective) for name in NAMES}
    assert {f["POSTERIOR"] for f in flags.values()} == {0, 1, 2}
    assert {f["FORGET"] for f in flags.values()} == {0, 1, 2}
    assert {f["UPDATE"] for f in flags.values() if f["POSTERIOR"] != 2} == {0, 1, 3}
    assert flags["palimpsa"]["UPDATE"] == flags["mamba2"]["UPDATE"]  # both Hebbian row updates


@pytest.mark.parametrize("bad,match", [
    (dict(output_variance=True), "output_variance"),
    (dict(checkpoint_every=0), "checkpoint_every"),
    (dict(block_v=3), "block_v"),
    (dict(cg_steps=0), "cg_steps"),
    (dict(log_decay=None), "log_decay"),
])
def test_bad_input_raises_value_error(bad, match):
    objective, x, kw, _ = model_inputs("mamba2", T=2, init=False)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_recurrent_scan(objective, x["q"], x["k"], x["v"], **kw)


_COMPILE_SCRIPT = r'''
import os, sys
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from metaplastic import registry
from metaplastic.kernels.flags import kernel_flags
from metaplastic.kernels.fused_recurrent import fused_recurrent_fwd_kernel, _block_v
from metaplastic.kernels.fused_recurrent_bwd import fused_recurrent_bwd_kernel

def compile_(fn, consts):
    sig = {n: "constexpr" if n in consts else "i64" if n == "TT" else
           "*i32" if n in ("cu_seqlens", "seg_offsets") else "*bf16" if n in ("q", "k", "v") else "*fp32"
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32))

for name in sys.argv[1:]:
    spec = registry[name]
    fl = kernel_flags(spec.objective)
    base = dict(H=16, K=128, V=128, BK=128, C=64, **fl, HAS_BETA=True, BETA_PER_V=spec.beta_per_value,
                HAS_B=fl["POSTERIOR"] == 1, B_PER_V=True, DTYPE=tl.float32)
    compile_(fused_recurrent_fwd_kernel, dict(base, BV=_block_v(fl["POSTERIOR"], 128, 128, None), CG_STEPS=128,
             CG_START=1, CG_EPS=0.0,
             OUTPUT_VAR=fl["POSTERIOR"] > 0, HAS_INIT=True, STORE_FINAL=True, SAVE_CKPT=fl["POSTERIOR"] < 2))
    if fl["POSTERIOR"] < 2:
        compile_(fused_recurrent_bwd_kernel, dict(base, BV=_block_v(fl["POSTERIOR"], 128, 128, None, True),
                 HAS_DVAR=fl["POSTERIOR"] == 1, HAS_DFINAL=True))
    print("compiled", name, flush=True)
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile every setting's forward and backward
    to an sm_90a cubin (Triton's bundled ptxas; no GPU needed) at K = V = 128 in a fresh process."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    names = ["mamba2", "gla", "deltanet", "longhorn", "mesanet", "palimpsa", "meta_gated_deltanet", "meta_longhorn"]
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, *names], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == len(names)
