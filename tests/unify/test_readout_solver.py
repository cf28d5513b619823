"""The full posterior's read-out solvers against fla's naive MesaNet functions (docs/references.md#reference-functions-on-a-cpu).

fla's ``naive_mesa_net_CG`` runs ``max_CG_iteration`` conjugate-gradient steps from ``x_0 = 0`` on
``(H_t + diag λ) x = q_t`` with ``1e-5`` added to both denominators, H_t the chunk-wise state at the token;
``naive_mesa_net_exact`` solves directly; ``naive_mesa_net_decoding_one_step`` starts one token's CG from
``q / (diag(H) + λ)``. They compute in float32 (they cast q, k, v, g, β; λ is passed as float32), so the
inputs are drawn in float64, rounded to float32 values and our reference scan runs in float64 on those
values: the difference is float32 round-off (~2e-7 measured), bounded here by 1e-6 as in test_references.py.
"""
import pytest
import torch
import torch.nn.functional as F

import metaplastic
from metaplastic import ReadoutSolver, registry
from metaplastic.oracles import relative_error

from helpers import assert_close

naive = pytest.importorskip("fla.ops.mesa_net.naive")

TOL = 1e-6
B, T, H, K, CHUNK = 2, 12, 2, 6, 4  # three chunks: the inter-chunk states of the naive function are used
FLA_EPS = 1e-5
OBJECTIVE = registry["mesanet"].objective


def _inputs(seed: int, T: int = T):
    """Unit-norm q, k (as the layer feeds them), decays in (0, 1) around 0.8, β in (0, 1), λ in (0.25, ~2.5);
    float32 values held in float64."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=f64), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=f64), dim=-1)
    v = torch.randn(B, T, H, K, generator=gen, dtype=f64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=f64) + 1.5)
    beta = torch.rand(B, T, H, generator=gen, dtype=f64)
    lam = F.softplus(torch.randn(H, K, generator=gen, dtype=f64)) + 0.25
    return tuple(x.float().double() for x in (q, k, v, g, beta, lam))


def _ours(x, readout=None, **kw):
    q, k, v, g, beta, lam = x
    return metaplastic.scan(OBJECTIVE, q, k, v, log_decay=g, beta=beta, lam=lam, readout=readout, **kw)


@pytest.mark.parametrize("steps", [1, 3, K, 30])
def test_cg_readout_cold_start_equals_fla_naive_cg(steps):
    x = _inputs(seed=steps)
    q, k, v, g, beta, lam = x
    expected, h_kk, h_kv = naive.naive_mesa_net_CG(q, k, v, g, lam.float(), beta, chunk_size=CHUNK,
                                                   max_CG_iteration=steps)
    res = _ours(x, ReadoutSolver("cg", steps, "zero", FLA_EPS), output_final_state=True)
    assert_close(res.output, expected, rtol=TOL)
    assert_close(res.final_state["H"], h_kk, rtol=TOL)
    assert_close(res.final_state["G"], h_kv.transpose(-1, -2), rtol=TOL)


def test_exact_readout_equals_fla_naive_exact_and_differs_from_fla_cg():
    """The exact read-out is fla's exact one; fla's 30 CG steps with ε = 1e-5 are not (ε stalls them), while
    30 steps of plain CG (ε = 0) on these K = 6 systems are exact to round-off."""
    x = _inputs(seed=7)
    q, k, v, g, beta, lam = x
    exact, _, _ = naive.naive_mesa_net_exact(q, k, v, g, lam, beta)
    assert_close(_ours(x).output, exact, rtol=TOL)
    assert_close(_ours(x, ReadoutSolver("cg", 30)).output, exact, rtol=TOL)
    fla_cg, _, _ = naive.naive_mesa_net_CG(q, k, v, g, lam.float(), beta, chunk_size=CHUNK, max_CG_iteration=30)
    assert relative_error(fla_cg.double(), exact.double()) > 1e-5


def test_cg_readout_diagonal_start_equals_fla_naive_decoding_step():
    """One decoding token from a state: fla's naive step starts CG from q / (diag H + λ); ours (as fla's Triton
    decoding kernel) from q / (diag H + λ + ε), a start that differs by at most ε / (diag H + λ) ≤ 4e-5
    relative (λ ≥ 0.25), which CG carries into the result at that order: bound 1e-4."""
    x = _inputs(seed=11, T=6)
    q, k, v, g, beta, lam = x
    res = _ours(tuple(t[:, :5] for t in x[:5]) + (lam,), output_final_state=True)
    state = res.final_state
    expected, _, _ = naive.naive_mesa_net_decoding_one_step(
        q[:, 5], k[:, 5], v[:, 5], g[:, 5], lam, beta[:, 5], state["H"].float(),
        state["G"].transpose(-1, -2).float(), max_CG_iteration=3)
    got = _ours(tuple(t[:, 5:] for t in x[:5]) + (lam,), ReadoutSolver("cg", 3, "diagonal", FLA_EPS),
                initial_state=state).output[:, 0]
    assert_close(got, expected, rtol=1e-4)


def test_cg_readout_previous_start_restarts_per_sequence_and_converges():
    """Warm start: with K steps plain CG is exact whatever the guess; packed sequences each start from 0, so
    the packed run equals the runs of each sequence alone."""
    x = _inputs(seed=5)
    exact = _ours(x).output
    warm = ReadoutSolver("cg", K, "previous")
    assert_close(_ours(x, warm).output, exact, rtol=1e-9)
    few = ReadoutSolver("cg", 1, "previous")
    packed = _ours(tuple(t.reshape(1, B * T, *t.shape[2:]) if t.dim() > 2 else t for t in x), few,
                   cu_seqlens=torch.tensor([0, T, 2 * T])).output
    alone = _ours(x, few).output
    assert_close(packed.reshape(alone.shape), alone, rtol=1e-12)
    assert relative_error(alone, exact) > 1e-6  # one step is an approximation


def test_cg_readout_is_differentiable():
    x = [t.clone().requires_grad_(True) for t in _inputs(seed=3, T=4)]
    out = _ours(x, ReadoutSolver("cg", 3, "zero", FLA_EPS)).output
    out.square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="newton"), "method"),
    (dict(method="exact", cg_steps=3), "cg_steps"),
    (dict(method="cg"), "cg_steps"),
    (dict(method="cg", cg_steps=-1), "cg_steps"),
    (dict(method="cg", cg_steps=2, cg_start="random"), "cg_start"),
    (dict(method="cg", cg_steps=2, cg_eps=float("nan")), "cg_eps"),
])
def test_readout_solver_refuses_invalid_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReadoutSolver(**kwargs)


def test_cg_readout_refused_without_a_full_posterior():
    spec = registry["gated_deltanet"]
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="readout"):
        metaplastic.scan(spec.objective, q, q, q, log_decay=-torch.rand(1, 2, 1), readout=ReadoutSolver("cg", 2))
