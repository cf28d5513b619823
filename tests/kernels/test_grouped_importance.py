"""Grouped importance (docs/theory.md#limit-8-grouped-importance): ``b [B,T,H,G]`` shared within G contiguous groups of value rows.

Yardsticks nobody here wrote or that are written out independently here:

- the limit-8 recurrence written out in this file, token by token (``J^{(g)}``, ``M``, ``o = scale Σ M q / J``);
- fla's ``naive_recurrent_simple_gla`` read with the rescaled query ``q ⊘ I^{(g)}``, one call per group;
- the reference scan with ``b`` expanded by ``repeat_interleave`` (it runs ``closed_forms`` token by token),
  and autograd through it for every gradient.
"""
import math

import pytest
import torch

import metaplastic
from metaplastic.kernels.dispatch import scan as kernel_scan
from metaplastic.kernels.chunk import chunk_scan

from helpers import assert_close, check_against_reference, random_inputs

PALIMPSA = metaplastic.registry["palimpsa"].objective
META_GLA = metaplastic.registry["meta_gla"].objective  # vector (per key channel) forgetting
TOL = 1e-10


@pytest.fixture(autouse=True)
def grouped_path_on_cpu(monkeypatch):
    """On a CPU the chunked path hands small grouped shapes to the fused C kernel
    (``kernels/chunk.py: native_beats_grouped``); these tests are about the grouped path itself."""
    monkeypatch.setenv("METAPLASTIC_CPU_KERNEL", "0")


INPUTS = dict(keys=1.0)  # keys N(0, 1), decays in (0.5, 1), b [B,T,H,G] in (0, 1), prior precision in (0.5, 1.5)


def limit8_by_hand(q, k, v, log_decay, beta, b, prior_precision, scale):
    """docs/theory.md#limit-8-grouped-importance written out: per group a K-vector J, the shared numerator M, o[i] = scale Σ_j M q / J."""
    B, T, H, K = q.shape
    V, G = v.shape[-1], b.shape[-1]
    R = V // G
    Ip = prior_precision.view(1, H, 1, 1)
    J = Ip.expand(B, H, G, K).clone()
    M = torch.zeros(B, H, V, K, dtype=q.dtype)
    out = []
    for t in range(T):
        a = log_decay[:, t].exp()
        a = a[..., None, None] if a.dim() == 2 else a[..., None, :]
        be = beta[:, t][..., None] if beta.dim() == 3 else beta[:, t]
        J = a * J + (1 - a) * Ip + b[:, t][..., None] * k[:, t, :, None, :] ** 2
        M = a * M + (be * v[:, t])[..., None] * k[:, t, :, None, :]
        o = torch.stack([scale * (M[:, :, i] * q[:, t] / J[:, :, i // R]).sum(-1) for i in range(V)], -1)
        out.append(o)
    return torch.stack(out, 1)


# --- the reference scan -----------------------------------------------------------------------------

@pytest.mark.parametrize("G", [1, 2, 4])
def test_reference_scan_with_groups_is_limit8_written_out(G):
    x = random_inputs("palimpsa", 2, 6, 2, 3, 4, groups=G, beta_per_value=False, **INPUTS)
    res = metaplastic.scan(PALIMPSA, scale=0.7, **x)
    assert_close(res.output, limit8_by_hand(scale=0.7, **x), rtol=TOL, msg="output")


def test_one_group_is_head_shared_and_all_groups_are_per_value():
    x = random_inputs("palimpsa", 1, 5, 2, 3, 4, groups=1, beta_per_value=False, **INPUTS)
    shared = metaplastic.scan(PALIMPSA, **{**x, "b": x["b"][..., 0]}).output
    assert_close(metaplastic.scan(PALIMPSA, **x).output, shared, rtol=TOL)
    assert_close(kernel_scan(PALIMPSA, **x, backend="chunk").output, shared, rtol=TOL)


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_groups_that_do_not_divide_v_are_refused_by_name(backend):
    x = random_inputs("palimpsa", 1, 3, 1, 2, 4, groups=3, beta_per_value=False, **INPUTS)
    with pytest.raises(ValueError) as info:
        kernel_scan(PALIMPSA, **x, backend=backend)
    message = str(info.value)
    assert message.startswith("b ") and "G = 3" in message and "V = 4" in message, message


# --- the chunked torch path against the reference -------------------------------------------------------

@pytest.mark.parametrize("G,vector,beta_per_value,C", [
    (1, False, False, 4), (2, False, False, 4), (4, False, True, 16), (2, True, False, 4), (4, True, True, 3),
    (8, False, False, 4)])
def test_chunk_matches_reference_with_every_gradient(G, vector, beta_per_value, C):
    """An initial state whose precision is constant within each group (without a gradient: the grouped path)."""
    B, T, H, K, V = 2, 11, 2, 3, 8
    x = random_inputs("meta_gla" if vector else "palimpsa", B, T, H, K, V, groups=G, beta_per_value=beta_per_value,
                      init="shared", **INPUTS)
    check_against_reference(META_GLA if vector else PALIMPSA, x, lambda o, **kw: chunk_scan(o, **kw, chunk_size=C),
                            rtol=TOL, grad_initial_precision=False, scale=0.6)


@pytest.mark.parametrize("G", [1, 2])
def test_chunk_equals_fla_simple_gla_read_with_rescaled_query(G):
    """Limits 7 (G = 1) and 8: each group's rows are fla's simple-GLA read of (β v)[rows] with q ⊘ I^{(g)}."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    B, T, H, K, V = 1, 12, 2, 4, 4
    x = random_inputs("palimpsa", B, T, H, K, V, groups=G, beta_per_value=False, **INPUTS)
    Ip = x["prior_precision"].view(1, 1, H, 1)
    a = x["log_decay"].exp()[..., None]
    Is = []
    for g in range(G):  # the precision of group g, written out: I_t = α I_{t-1} + (1 − α) Ip + b_t[g] k²
        I = Ip[:, 0].expand(B, H, K)
        rows = []
        for t in range(T):
            I = a[:, t] * I + (1 - a[:, t]) * Ip[:, 0] + x["b"][:, t, :, g, None] * x["k"][:, t] ** 2
            rows.append(I)
        Is.append(torch.stack(rows, 1))
    R = V // G
    w = x["beta"][..., None] * x["v"]
    expected = torch.cat([naive_recurrent_simple_gla(x["q"] / Is[g], x["k"], w[..., g * R:(g + 1) * R],
                                                     x["log_decay"], scale=0.5)[0] for g in range(G)], -1)
    got = chunk_scan(PALIMPSA, **x, scale=0.5, chunk_size=4).output
    assert_close(got, expected, rtol=1e-5, msg="output vs fla (fla computes in float32)")


# --- non-finite inputs, α = 0, extreme decays ---------------------------------------------------------

@pytest.mark.parametrize("name", ["q", "k", "v", "b", "beta", "log_decay"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_does_not_touch_earlier_outputs(name, bad):
    B, T, H, K, V, G, t = 1, 12, 2, 3, 4, 2, 6
    x = random_inputs("palimpsa", B, T, H, K, V, groups=G, beta_per_value=False, **INPUTS)
    clean = metaplastic.scan(PALIMPSA, **x).output
    x[name] = x[name].clone()
    x[name][0, t, 0] = bad  # (a log-decay of -inf is valid: α = 0; +inf and NaN are not)
    if name == "log_decay" and bad == float("inf"):  # growth: refused up front, by name
        with pytest.raises(ValueError, match="log_decay"):
            chunk_scan(PALIMPSA, **x, chunk_size=8)
        return
    got = chunk_scan(PALIMPSA, **x, chunk_size=8).output  # t and the earlier tokens share a chunk
    assert_close(got[:, :t], clean[:, :t], rtol=TOL, msg="outputs before the non-finite token")
    assert_close(got[:, :, 1], clean[:, :, 1], rtol=TOL, msg="the other head")
    assert torch.isnan(got[0, t, 0]).all(), "the output at the non-finite token must not look valid"


@pytest.mark.parametrize("vector", [False, True])
def test_zero_decay_resets_and_extreme_decays_stay_finite(vector):
    B, T, H, K, V, G = 1, 14, 1, 3, 4, 2
    x = random_inputs("meta_gla" if vector else "palimpsa", B, T, H, K, V, groups=G, beta_per_value=False, **INPUTS)
    x["log_decay"] = x["log_decay"].clone()
    x["log_decay"][0, 4] = -math.inf  # α = 0: the state restarts from the prior
    x["log_decay"][0, 9] = -1e30
    obj = META_GLA if vector else PALIMPSA
    leaves = [t.requires_grad_() for t in x.values()]
    ref = metaplastic.scan(obj, **x, output_final_state=True)
    got = chunk_scan(obj, **x, chunk_size=8, output_final_state=True)
    assert_close(got.output, ref.output, rtol=TOL, msg="output")
    assert_close(got.final_state["mu"], ref.final_state["mu"], rtol=TOL, msg="mu")
    after = metaplastic.scan(obj, **{n: (val[:, 4:] if val.dim() >= 3 and val.shape[1] == T else val)
                                     for n, val in x.items()})
    assert_close(got.output[:, 4:], after.output, rtol=TOL, msg="output after α = 0 equals a fresh start")
    for name, a, e in zip(x, torch.autograd.grad(got.output.sum(), leaves),
                          torch.autograd.grad(ref.output.sum(), leaves)):
        assert_close(a, e, rtol=TOL, msg=f"d{name}")


# --- packing, dispatch, memory ------------------------------------------------------------------------

def test_packed_sequences_with_groups():
    x = random_inputs("palimpsa", 1, 10, 2, 3, 4, groups=2, beta_per_value=False, **INPUTS)
    cu = torch.tensor([0, 3, 3, 10])
    ref = metaplastic.scan(PALIMPSA, **x, cu_seqlens=cu, output_final_state=True)
    got = kernel_scan(PALIMPSA, **x, cu_seqlens=cu, output_final_state=True, backend="chunk", chunk_size=4)
    assert_close(got.output, ref.output, rtol=TOL)
    assert_close(got.final_state["I"], ref.final_state["I"], rtol=TOL)


def _saved_bytes_per_token(G, T, B=1, H=1, K=128, V=128):
    """Bytes the chunked path saves for its backward (distinct storages), per token and head, float32."""
    gen = torch.Generator().manual_seed(0)
    x = dict(q=torch.randn(B, T, H, K, generator=gen), k=torch.randn(B, T, H, K, generator=gen),
             v=torch.randn(B, T, H, V, generator=gen), log_decay=-torch.rand(B, T, H, generator=gen),
             beta=torch.rand(B, T, H, generator=gen), b=torch.rand(B, T, H, G, generator=gen))
    for t in x.values():
        t.requires_grad_()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunk_scan(PALIMPSA, **x, scale=K ** -0.5, output_final_state=True)
    return sum(storages.values()) / (B * T * H)


@pytest.mark.parametrize("G", [1, 16])
def test_saved_state_is_at_most_2kb_per_token_and_head(G):
    """K = V = 128, float32: everything saved for the backward, sequence-level states included (T = 1024)."""
    per_token = _saved_bytes_per_token(G, 1024)
    assert per_token <= 2048, f"G = {G}: {per_token:.0f} bytes saved per token and head"


def test_initial_precision_varying_within_a_group_takes_the_per_value_path():
    """I_0 that differs between rows of one group (or needs a gradient) does not factor per group: the chunked
    path expands b to one rate per row and still matches the reference, gradients included."""
    B, T, H, K, V, G = 1, 7, 2, 3, 4, 2
    x = random_inputs("palimpsa", B, T, H, K, V, groups=G, beta_per_value=False, init="random", seed=9, **INPUTS)
    check_against_reference(PALIMPSA, x, lambda o, **kw: chunk_scan(o, **kw, chunk_size=4), rtol=TOL,
                            output_variance=False)


def test_cpu_kernel_runs_grouped_b_repeated_over_its_rows(monkeypatch):
    """With the fused C kernel on, small grouped shapes run on it (b repeated over each group's rows) and match
    the reference with every gradient."""
    from metaplastic.kernels import cpu_per_value
    monkeypatch.delenv("METAPLASTIC_CPU_KERNEL", raising=False)
    if cpu_per_value.native_unavailable_reason():
        pytest.skip(cpu_per_value.native_unavailable_reason())
    calls = []
    native = cpu_per_value.native_per_value_scan
    monkeypatch.setattr(cpu_per_value, "native_per_value_scan", lambda *a, **kw: calls.append(1) or native(*a, **kw))
    B, T, H, K, V, G = 2, 11, 2, 3, 8, 2
    x = random_inputs("meta_gla", B, T, H, K, V, groups=G, beta_per_value=True, **INPUTS)
    check_against_reference(META_GLA, x, lambda o, **kw: chunk_scan(o, **kw, chunk_size=4), rtol=TOL, scale=0.6)
    assert calls, "the fused CPU kernel did not run"
