"""The theorems: every registry entry derived from its settings, and the limits of docs/theory.md#the-limits.

Each theorem is a function ``name(closed_form=None) -> TheoremRecord``. ``closed_form`` is the module whose
``prior / update / readout`` are checked (``metaplastic.closed_forms`` by default); passing a deliberately
wrong stand-in makes the theorem report ``holds = False``. Symbolic sizes are ``K = 2, V = 2`` (``V = 1``
where a row-wise argument suffices); every gate, key, value, state entry and precision is a symbol.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import sympy

from metaplastic.closed_forms import Gates
from metaplastic.objective import Objective, metaplastic
from metaplastic.registry import registry

from .check import all_zero, closed_form_readout, closed_form_step, closed_form_update, compare, is_zero
from .derive import diagonal_transition, derive, derive_update
from .free_energy import expected_loss
from .numeric import numeric_error, random_scan_inputs
from .record import Claims, TheoremFn, TheoremRecord, theorem
from .symbols import Array, matrix, step_symbols, vector

NUMERIC_TOL = 1e-10


def _zeros(shape) -> Array:
    return np.full(shape, sympy.Integer(0), dtype=object)


def _filled(value, shape) -> Array:
    return np.full(shape, value, dtype=object)


def _scan_error(obj_a: Objective, kw_a: dict, obj_b: Objective, kw_b: dict, inputs: dict) -> float:
    """Relative error between two scans on the same inputs (outputs only)."""
    from metaplastic.scan import scan

    from .numeric import relative_error

    a = scan(obj_a, **inputs, **kw_a).output.numpy()
    b = scan(obj_b, **inputs, **kw_b).output.numpy()
    return relative_error(a, b)


# --- derive_<model>: each registry entry out of its settings ------------------------------------------

def _derive_theorem(model: str) -> TheoremFn:
    spec = registry[model]

    @theorem(f"derive_{model}",
             f"The one-step update of {model} ({spec.objective.describe()}) is the minimiser of the free energy "
             "F_t reached by its solver: prior, update and readout equal metaplastic.closed_forms entry by entry "
             "(K = 2, V = 2), and the derived step equals one step of metaplastic.scan on random numbers.")
    def body(claims: Claims, closed_form: Any = None) -> None:
        d = derive(spec.objective)
        result = compare(d, closed_form)
        claims.check("symbolic: derived == closed form", result.holds, ", ".join(result.mismatches))
        for key, arr in d.update.items():
            claims.expr(f"update {key}_11", arr[0, 0])
        for name, diff in list(result.differences.items())[:4]:
            claims.expr(f"difference {name}", diff)
        err = numeric_error(d, spec.scale_for(d.symbols.K))
        claims.expr("numeric relative error vs scan", sympy.Float(err, 3))
        claims.check("numeric: derived step == metaplastic.scan", err < NUMERIC_TOL, f"relative error {err:.2e}")

    return body


# --- limit 1 ------------------------------------------------------------------------------------------

@theorem("palimpsa_to_mamba2",
         "Palimpsa with b ≡ 0 and I_{t-1} = Ip is the dot/point (Mamba2) step with rate β/Ip: μ_t = α μ + (β/Ip) "
         "v⊗k and I_t = Ip, so with Ip = 1 it is Mamba2 exactly; to first order in b, "
         "μ_t = S_t^{Mamba2} ∘ (1 − b ⊗ k²/Ip) + O(b²).")
def palimpsa_to_mamba2(claims: Claims, closed_form: Any = None) -> None:
    pal, mam = registry["palimpsa"].objective, registry["mamba2"].objective
    sy = step_symbols(pal)
    Ip = sy.Ip[0, 0]
    shape = (sy.V, sy.K)
    at_fixed_point = {"mu": sy.state["mu"], "I": _filled(Ip, shape)}
    g0 = sy.gates()._replace(b=_zeros(sy.b.shape))
    st_p, out_p, _ = closed_form_step(pal, at_fixed_point, sy.q, sy.k, sy.v, g0, sy.scale, closed_form)
    st_m, out_m, _ = closed_form_step(mam, {"S": sy.state["mu"]}, sy.q, sy.k, sy.v, g0, sy.scale, closed_form)
    claims.check("b = 0: μ_t == S_t(Mamba2)", all_zero(st_p["mu"] - st_m["S"]))
    claims.check("b = 0: I_t == Ip", all_zero(st_p["I"] - Ip))
    claims.check("b = 0: outputs equal", all_zero(out_p - out_m))
    claims.expr("mu_11 (b = 0)", st_p["mu"][0, 0])
    # first order in b, from the same fixed point I_{t-1} = Ip
    st_b, _, _ = closed_form_step(pal, at_fixed_point, sy.q, sy.k, sy.v, sy.gates(), sy.scale, closed_form)
    ok = True
    for i in range(sy.V):
        b_i = sy.b[i, 0]
        for j in range(sy.K):
            first = sympy.diff(st_b["mu"][i, j], b_i).subs(b_i, 0)
            ok &= is_zero(first + sy.k[j] ** 2 / Ip * st_m["S"][i, j])
            if i == j == 0:
                claims.expr("first-order term of mu_11 in b", sympy.factor(b_i * first))
    claims.check("first order in b: −(b k²/Ip) S_t", ok)
    # numerically, over several tokens: Palimpsa (b = 0) vs Mamba2, both with Ip = 1.7
    inputs = random_scan_inputs(pal, seed=1)
    B, T, H = inputs["q"].shape[:3]
    import torch
    err = _scan_error(pal, {"b": torch.zeros(B, T, H, dtype=torch.float64), "prior_precision": 1.7}, mam,
                      {"prior_precision": 1.7}, inputs)
    claims.expr("numeric relative error, 6 tokens", sympy.Float(err, 3))
    claims.check("numeric: scan(palimpsa, b = 0) == scan(mamba2)", err < NUMERIC_TOL, f"{err:.2e}")


# --- limit 2 ------------------------------------------------------------------------------------------

@theorem("metaplastic_identity",
         "For every point-posterior registry entry X, metaplastic(X) (posterior point → diagonal, importance "
         "rate b, prior precision Ip) at b ≡ 0 and I_{t-1} = Ip has μ_t = S_t(X), I_t = Ip and the same output, "
         "for any Ip (in particular Ip = 1).")
def metaplastic_identity(claims: Claims, closed_form: Any = None) -> None:
    import torch

    for spec in registry.point_entries():
        obj, meta = spec.objective, metaplastic(spec.objective)
        sy = step_symbols(obj, beta_per_value=True)
        Ip = sy.Ip[0, 0]
        shape = (sy.V, sy.K)
        gates = sy.gates()._replace(b=_zeros((sy.V, 1)))
        st_x, out_x, _ = closed_form_step(obj, {"S": sy.state["S"]}, sy.q, sy.k, sy.v, gates, sy.scale, closed_form)
        st_m, out_m, _ = closed_form_step(meta, {"mu": sy.state["S"], "I": _filled(Ip, shape)}, sy.q, sy.k, sy.v,
                                          gates, sy.scale, closed_form)
        ok = all_zero(st_m["mu"] - st_x["S"]) and all_zero(st_m["I"] - Ip) and all_zero(out_m - out_x)
        claims.check(f"{spec.name}: metaplastic(X) at b = 0 == X", ok)
        claims.expr(f"{spec.name}: S_11", st_x["S"][0, 0])
        inputs = random_scan_inputs(obj, seed=2, beta_per_value=spec.beta_per_value)
        B, T, H = inputs["q"].shape[:3]
        err = _scan_error(meta, {"b": torch.zeros(B, T, H, dtype=torch.float64)}, obj, {}, inputs)
        claims.check(f"{spec.name}: numeric, 6 tokens", err < NUMERIC_TOL, f"{err:.2e}")


# --- limit 3 ------------------------------------------------------------------------------------------

def _cross_terms(m: Array, cov, k: Array, b: Array) -> sympy.Expr:
    """``Σ_i (b_i/2) Σ_{j≠j'} k_j k_j' E[S_ij S_ij']`` (the off-diagonal curvature of ``(b/2)‖Sk‖²``)."""
    V, K = m.shape
    total = sympy.Integer(0)
    for i in range(V):
        C = cov(i)
        b_i = b[min(i, b.shape[0] - 1), 0]
        total += b_i / 2 * sum(k[j] * k[l] * (m[i, j] * m[i, l] + C[j, l])
                               for j in range(K) for l in range(K) if j != l)
    return total


@theorem("palimpsa_is_meanfield_regression",
         "Palimpsa's loss −β vᵀSk + (b/2) Σ_ij k_j² S_ij² is the regression loss (b/2)‖βv/b − Sk‖² (target v/b with "
         "β folded into v) minus its cross-synapse terms (b/2) Σ_{j≠j'} k_j k_j' S_ij S_ij', up to a constant; "
         "the mean-field (diagonal) exact minimiser of F_t with that truncated loss is Palimpsa's closed form.")
def palimpsa_is_meanfield_regression(claims: Claims, closed_form: Any = None) -> None:
    pal = registry["palimpsa"].objective
    sy = step_symbols(pal)
    S = sy.state["mu"]
    no_cov = lambda i: sympy.zeros(sy.K, sy.K)  # noqa: E731  (a point evaluation of the losses)
    target = np.array([sy.beta[i, 0] * sy.v[i] / sy.b[i, 0] for i in range(sy.V)], dtype=object)
    regression = expected_loss("regression", "point", S, no_cov, sy.k, target, sy.b, sy.b)
    dot_diag = expected_loss("dot_diag", "diagonal", S, no_cov, sy.k, sy.v, sy.beta, sy.b)
    gap = sympy.expand(regression - _cross_terms(S, no_cov, sy.k, sy.b) - dot_diag)
    claims.expr("regression − cross terms − dot_diag", sympy.factor(gap))
    claims.check("loss gap is independent of S", all(is_zero(sympy.diff(gap, s)) for s in S.ravel()))

    def truncated(likelihood, posterior, m, cov, k, v, beta, b):
        tgt = np.array([beta[min(i, beta.shape[0] - 1), 0] * v[i] / b[min(i, b.shape[0] - 1), 0]
                        for i in range(m.shape[0])], dtype=object)
        return expected_loss("regression", "diagonal", m, cov, k, tgt, b, b) - _cross_terms(m, cov, k, b)

    derived = derive_update(sy, likelihood="regression", loss=truncated)
    expected = closed_form_update(sy, closed_form)
    claims.check("mean-field minimiser == Palimpsa closed form (μ)", all_zero(derived["mu"] - expected["mu"]))
    claims.check("mean-field minimiser == Palimpsa closed form (I)", all_zero(derived["I"] - expected["I"]))
    claims.expr("mu_11", derived["mu"][0, 0])


# --- limit 4 ------------------------------------------------------------------------------------------

PROXIMAL = Objective("regression", "point", "exact", "exact", "none")


@theorem("longhorn_is_diagonal_proximal",
         "The exact (proximal) regression step on a point posterior is S_t = S⁻ + ε (v − S⁻k) ⊗ k with "
         "ε = β/(Ip + β‖k‖²) (Sherman–Morrison; Ip = 1: ε = β/(1 + β‖k‖²)); LongHorn's update is that solution "
         "with the transition (I − ε k kᵀ) replaced by its diagonal (1 − ε k²).")
def longhorn_is_diagonal_proximal(claims: Claims, closed_form: Any = None) -> None:
    sy = step_symbols(PROXIMAL)
    Sm, k, v = sy.prior_state["S"], sy.k, sy.v
    Ip = sy.Ip[0, 0]
    exact = derive_update(sy)["S"]
    knorm = sum(kj ** 2 for kj in k)
    ok = True
    for i in range(sy.V):
        eps = sy.beta[i, 0] / (Ip + sy.beta[i, 0] * knorm)
        resid = v[i] - sum(Sm[i, j] * k[j] for j in range(sy.K))
        ok &= all(is_zero(exact[i, j] - (Sm[i, j] + eps * resid * k[j])) for j in range(sy.K))
    claims.check("exact step is Sherman–Morrison with ε = β/(Ip + β‖k‖²)", ok)
    claims.check("closed form (transition exact) == exact step",
                 all_zero(closed_form_update(sy, closed_form)["S"] - exact))
    diagonal = diagonal_transition(exact, Sm)
    lh = registry["longhorn"]
    sy_lh = step_symbols(lh.objective)
    longhorn = closed_form_update(sy_lh, closed_form)["S"]
    claims.check("LongHorn closed form == exact step with diagonal transition", all_zero(diagonal - longhorn))
    claims.expr("exact S_11", exact[0, 0])
    claims.expr("LongHorn S_11", diagonal[0, 0])


# --- limit 5 ------------------------------------------------------------------------------------------

@theorem("gdn_is_first_order_proximal",
         "With Ip = 1, Gated DeltaNet's gradient step S⁻ + β (v − S⁻k) ⊗ k is the first-order expansion in β of "
         "the exact proximal step (rate β/(1 + β‖k‖²)): they agree at β = 0 and in ∂/∂β, and differ at second "
         "order; the exact step with β_exact = β/(1 − β‖k‖²) (β‖k‖² < 1) equals the gradient step exactly.")
def gdn_is_first_order_proximal(claims: Claims, closed_form: Any = None) -> None:
    gdn = registry["gated_deltanet"].objective
    exact_obj = replace(gdn, solver="exact")
    sy = step_symbols(exact_obj, beta_per_value=False)
    beta, Ip = sy.beta[0, 0], sy.Ip[0, 0]
    exact = derive_update(sy)["S"]
    grad = closed_form_update(replace(sy, objective=gdn), closed_form)["S"]
    exact1 = np.vectorize(lambda e: e.subs(Ip, 1), otypes=[object])(exact)
    grad1 = np.vectorize(lambda e: sympy.sympify(e).subs(Ip, 1), otypes=[object])(grad)
    diff = exact1 - grad1
    at0 = np.vectorize(lambda e: e.subs(beta, 0), otypes=[object])
    d1 = np.vectorize(lambda e: sympy.diff(e, beta).subs(beta, 0), otypes=[object])
    d2 = np.vectorize(lambda e: sympy.diff(e, beta, 2).subs(beta, 0), otypes=[object])
    claims.check("equal at β = 0", all_zero(at0(diff)))
    claims.check("equal first derivative in β at 0", all_zero(d1(diff)))
    second = d2(diff)
    claims.check("differ at second order", not all_zero(second))
    claims.expr("second-order term of S_11 (β²/2 ·)", sympy.factor(second[0, 0]))
    knorm = sum(kj ** 2 for kj in sy.k)
    beta_exact = beta / (1 - beta * knorm)
    reparam = np.vectorize(lambda e: e.subs(beta, beta_exact), otypes=[object])(exact1)
    claims.check("exact step at β/(1 − β‖k‖²) == gradient step", all_zero(reparam - grad1))
    claims.expr("beta_exact", beta_exact)


# --- limit 6 ------------------------------------------------------------------------------------------

@theorem("mesanet_full_to_diagonal",
         "MesaNet (full posterior) keeps G_t = α G + β v⊗k, the recurrence of Palimpsa's M = I ∘ μ (and of the "
         "Mamba2 state). The diagonal of its key precision P = H + diag λ obeys Palimpsa's I_t = α I + (1−α) λ + "
         "β k²; accumulated per value row with rate b (Ip = λ), MesaNet's readout G (H + diag λ)^{-1} q with H "
         "restricted to that diagonal is Palimpsa's (M / I) q.")
def mesanet_full_to_diagonal(claims: Claims, closed_form: Any = None) -> None:
    mesa, pal, mam = (registry[n].objective for n in ("mesanet", "palimpsa", "mamba2"))
    sy = step_symbols(mesa)  # scalar β (a full posterior shares its key precision)
    K, V = sy.K, sy.V
    M = sy.state["G"]
    I = matrix("I", V, K, positive=True)
    g_pal = sy.gates()._replace(b=_filled(sy.beta[0, 0], (V, 1)), Ip=sy.lam[None, :])
    st_g, _, _ = closed_form_step(mesa, {"G": M, "H": sy.state["H"]}, sy.q, sy.k, sy.v, sy.gates(), sy.scale,
                                  closed_form)
    st_p, _, _ = closed_form_step(pal, {"mu": M / I, "I": I}, sy.q, sy.k, sy.v, g_pal, sy.scale, closed_form)
    st_m, _, _ = closed_form_step(mam, {"S": M}, sy.q, sy.k, sy.v, sy.gates()._replace(Ip=_filled(1, (1, 1))),
                                  sy.scale, closed_form)
    claims.check("G_t == I_t ∘ μ_t (Palimpsa's M)", all_zero(st_g["G"] - st_p["I"] * st_p["mu"]))
    claims.check("G_t == Mamba2 state", all_zero(st_g["G"] - st_m["S"]))
    # the diagonal of P = H + diag λ follows Palimpsa's precision recurrence with Ip = λ, b = β
    H, lam = sy.state["H"], sy.lam
    diagP = np.array([[H[j, j] + lam[j] for j in range(K)] for _ in range(V)], dtype=object)
    st_pd, _, _ = closed_form_step(pal, {"mu": M / diagP, "I": diagP}, sy.q, sy.k, sy.v, g_pal, sy.scale,
                                   closed_form)
    P_new = st_g["H"] + np.diag(lam)
    claims.check("diag(P_t) == Palimpsa I_t (Ip = λ, b = β)",
                 all(is_zero(P_new[j, j] - st_pd["I"][i, j]) for i in range(V) for j in range(K)))
    # readout: H restricted to the diagonal I_i − λ, row by row, rate b per row
    b = vector("b", V, positive=True)
    g_row = sy.gates()._replace(b=b[:, None], Ip=lam[None, :])
    st_r, out_p, _ = closed_form_step(pal, {"mu": M / I, "I": I}, sy.q, sy.k, sy.v, g_row, sy.scale, closed_form)
    ok = True
    for i in range(V):
        I_i, M_i = st_r["I"][i], st_r["I"][i] * st_r["mu"][i]
        state = {"G": M_i[None, :], "H": np.diag(I_i - lam)}
        sy_row = replace(sy, V=1)
        out_g, _ = closed_form_readout(sy_row, closed_form, state)
        ok &= is_zero(out_g[0] - out_p[i])
    claims.check("MesaNet readout with diagonal H == Palimpsa readout (M/I) q", ok)
    claims.expr("G_11", st_g["G"][0, 0])
    claims.expr("Palimpsa output_1", out_p[0])


# --- limit 7 ------------------------------------------------------------------------------------------

@theorem("headshared_importance_is_gla",
         "With a head-shared importance rate (b scalar per token and head) and I_{t-1} the same in every value "
         "row, I_t depends on the key channel only, M = I ∘ μ follows simple GLA's recurrence, and Palimpsa's "
         "output equals simple GLA's read with the rescaled query q ⊘ I_t.")
def headshared_importance_is_gla(claims: Claims, closed_form: Any = None) -> None:
    pal, sgla = registry["palimpsa"].objective, registry["simple_gla"].objective
    sy = step_symbols(pal, beta_per_value=False, b_per_value=False)
    K, V = sy.K, sy.V
    I_row = vector("I", K, positive=True)
    I = np.array([list(I_row) for _ in range(V)], dtype=object)
    M = sy.state["mu"]  # used as the numerator M
    st_p, out_p, _ = closed_form_step(pal, {"mu": M / I, "I": I}, sy.q, sy.k, sy.v, sy.gates(), sy.scale,
                                      closed_form)
    claims.check("I_t rows are equal", all(is_zero(st_p["I"][i, j] - st_p["I"][0, j])
                                           for i in range(V) for j in range(K)))
    g = sy.gates()._replace(b=_zeros((1, 1)), Ip=_filled(1, (1, 1)))  # simple GLA: rate β, not β/Ip
    q_scaled = np.array([sy.q[j] / st_p["I"][0, j] for j in range(K)], dtype=object)
    st_g, out_g, _ = closed_form_step(sgla, {"S": M}, q_scaled, sy.k, sy.v, g, sy.scale, closed_form)
    claims.check("I_t ∘ μ_t == simple GLA state", all_zero(st_p["I"] * st_p["mu"] - st_g["S"]))
    claims.check("output == simple GLA output read with q ⊘ I_t", all_zero(out_p - out_g))
    claims.expr("I_t[1,1]", st_p["I"][0, 0])


# --- limit 8 ------------------------------------------------------------------------------------------

GROUPED_SIZES = dict(K=2, V=4, G=2, T=2)


@theorem("grouped_importance_is_gla",
         "With the importance rate shared within G contiguous groups of value rows (b_t ∈ R^G, row i uses "
         "b_t[i // (V/G)]) and an initial precision constant within each group, the precision stays constant "
         "within each group, I_t[i, :] = J^{(g)}_t with J^{(g)}_t = α J^{(g)}_{t-1} + (1−α) Ip + b_t[g] k_t², "
         "I_t ∘ μ_t = M_t = α M_{t-1} + β v_t ⊗ k_t, and the output of row i of group g is simple GLA's read of M_t "
         "with the query q_t ⊘ J^{(g)}_t: o_t[i] = scale Σ_j M_t[i, j] q_t[j] / J^{(g)}_t[j] (variance scale² Σ_j "
         "q_j² / J^{(g)}_j). The same holds with a decay per key channel (α ∈ R^K, meta_gla), each group then "
         "being GLA's read. Checked over T = 2 tokens at K = 2, V = 4, G = 2, every gate and input a symbol, "
         "for Palimpsa (scalar α) and meta_gla (vector α).")
def grouped_importance_is_gla(claims: Claims, closed_form: Any = None) -> None:
    for meta, point in (("palimpsa", "simple_gla"), ("meta_gla", "gla")):
        _grouped_importance(claims, registry[meta].objective, registry[point].objective, closed_form)


def _grouped_importance(claims: Claims, pal: Objective, gla: Objective, closed_form: Any) -> None:
    """Limit 8 for the diagonal objective ``pal`` whose groups read as the point objective ``gla`` (same
    forgetting: scalar or per key channel)."""
    vector_decay = pal.forgetting == "vector"
    tag = " (α per key channel)" if vector_decay else ""
    K, V, G, T = (GROUPED_SIZES[n] for n in ("K", "V", "G", "T"))
    R = V // G
    Ip, scale = sympy.Symbol("I_{p}", positive=True), sympy.Symbol("scale", positive=True)
    J = [matrix("J", G, K, positive=True)[g] for g in range(G)]  # initial precision of each group
    M = matrix("M", V, K)  # initial numerator I ∘ μ
    I = np.array([list(J[i // R]) for i in range(V)], dtype=object)
    state = {"mu": M / I, "I": I}
    ok_const = ok_M = ok_out = ok_var = ok_gla = True
    for t in range(1, T + 1):
        q, k, v = vector(f"q^{t}", K), vector(f"k^{t}", K), vector(f"v^{t}", V)
        beta = sympy.Symbol(f"beta_{t}", positive=True)
        if vector_decay:
            alpha = vector(f"alpha^{t}", K, positive=True)
            alpha_gate = np.array([list(alpha)], dtype=object)  # [1, K]
        else:
            alpha = sympy.Symbol(f"alpha_{t}", positive=True)
            alpha_gate = _filled(alpha, (1, 1))
        b = vector(f"b^{t}", G, positive=True)
        gates = Gates(alpha=alpha_gate, beta=_filled(beta, (1, 1)),
                      b=np.array([[b[i // R]] for i in range(V)], dtype=object), Ip=_filled(Ip, (1, 1)))
        M_prev = M
        state, out, var = closed_form_step(pal, state, q, k, v, gates, scale, closed_form)
        # limit 8 written out: one K-vector J per group, the shared numerator M, the per-group read
        J = [alpha * J[g] + (1 - alpha) * Ip + b[g] * k * k for g in range(G)]
        M = alpha * M + beta * np.array([[v[i] * k[j] for j in range(K)] for i in range(V)], dtype=object)
        ok_const &= all(is_zero(state["I"][i, j] - J[i // R][j]) for i in range(V) for j in range(K))
        ok_M &= all_zero(state["I"] * state["mu"] - M)
        ok_out &= all(is_zero(out[i] - scale * sum(M[i, j] * q[j] / J[i // R][j] for j in range(K)))
                      for i in range(V))
        ok_var &= all(is_zero(var[i] - scale ** 2 * sum(q[j] ** 2 / J[i // R][j] for j in range(K)))
                      for i in range(V))
        # each group's rows are one (simple) GLA step (rate β, no importance) read with q ⊘ J^{(g)}
        g_gla = Gates(alpha=alpha_gate, beta=_filled(beta, (1, 1)), b=_zeros((1, 1)), Ip=_filled(1, (1, 1)))
        for g in range(G):
            rows = slice(g * R, (g + 1) * R)
            st_g, out_g, _ = closed_form_step(gla, {"S": M_prev[rows]}, q / J[g], k, v[rows], g_gla, scale,
                                              closed_form)
            ok_gla &= all_zero(st_g["S"] - M[rows]) and all_zero(out_g - out[rows])
        if t == 1:
            claims.expr(f"I_1[1,1] = J^(1)_1[1]{tag}", state["I"][0, 0])
            claims.expr(f"o_1[1]{tag}", out[0])
        if not (ok_const and ok_M and ok_out and ok_var and ok_gla):
            break  # a later token would only repeat the failure, on much larger expressions
    read = "GLA" if vector_decay else "simple GLA"
    claims.check(f"precision constant within each group: I_t[i, :] == J^(g)_t{tag}", ok_const)
    claims.check(f"I_t ∘ μ_t == M_t (shared numerator){tag}", ok_M)
    claims.check(f"o_t[i] == scale Σ_j M_t[i, j] q_t[j] / J^(g)_t[j]{tag}", ok_out)
    claims.check(f"variance == scale² Σ_j q_j² / J^(g)_j{tag}", ok_var)
    claims.check(f"each group == {read} step read with q ⊘ J^(g){tag}", ok_gla)
    # numerically over six tokens: metaplastic.scan with b [B,T,H,G] against the limit-8 recurrence
    import torch
    from metaplastic.scan import scan

    from .numeric import relative_error
    inputs = random_scan_inputs(pal, seed=3, V=V)
    _, Tn, Hn, Kn = inputs["q"].shape
    bg = torch.rand(1, Tn, Hn, G, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = scan(pal, **inputs, b=bg, prior_precision=1.3, scale=0.7).output
    Jn = torch.full((1, Hn, G, Kn), 1.3, dtype=torch.float64)
    Mn = torch.zeros(1, Hn, V, Kn, dtype=torch.float64)
    want = []
    for t in range(Tn):
        a = inputs["log_decay"][:, t].exp()
        a = a[:, :, None, :] if vector_decay else a[..., None, None]  # [1, H, 1, K|1]
        kt = inputs["k"][:, t, :, None, :]
        Jn = a * Jn + (1 - a) * 1.3 + bg[:, t, :, :, None] * kt ** 2
        Mn = a * Mn + (inputs["beta"][:, t, :, None] * inputs["v"][:, t])[..., None] * kt
        want.append(0.7 * (Mn * inputs["q"][:, t, :, None, :] / Jn.repeat_interleave(R, 2)).sum(-1))
    err = relative_error(got.numpy(), torch.stack(want, 1).numpy())
    claims.expr(f"numeric relative error, 6 tokens{tag}", sympy.Float(err, 3))
    claims.check(f"numeric: scan(b [B,T,H,G]) == limit-8 recurrence{tag}", err < NUMERIC_TOL, f"{err:.2e}")


# --- the list and the runner ---------------------------------------------------------------------------

LIMITS = (palimpsa_to_mamba2, metaplastic_identity, palimpsa_is_meanfield_regression, longhorn_is_diagonal_proximal,
          gdn_is_first_order_proximal, mesanet_full_to_diagonal, headshared_importance_is_gla,
          grouped_importance_is_gla)
_DERIVES: Dict[str, TheoremFn] = {}


def theorems() -> List[TheoremFn]:
    """Every theorem: the eight limits of docs/theory.md#the-limits, then ``derive_<model>`` for each registry entry."""
    for model in registry:
        if model not in _DERIVES:
            _DERIVES[model] = _derive_theorem(model)
    return list(LIMITS) + [_DERIVES[model] for model in registry]


def theorem_names() -> List[str]:
    return [fn.__name__ for fn in theorems()]


def run_all(names: Optional[Sequence[str]] = None, closed_form: Any = None,
            progress: Optional[Callable[[TheoremRecord], None]] = None) -> List[TheoremRecord]:
    """Run the theorems called ``names`` (all when None), in order; ``ValueError`` for an unknown name."""
    table = {fn.__name__: fn for fn in theorems()}
    if names is None:
        names = list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown theorem(s) {', '.join(unknown)}; known: {', '.join(table)}")
    records = []
    for name in names:
        record = table[name](closed_form=closed_form)
        records.append(record)
        if progress is not None:
            progress(record)
    return records
