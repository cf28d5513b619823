"""Close the loop numerically: evaluate derived expressions on random numbers and compare them with one
step of :func:`metaplastic.scan` (``B = T = H = 1``, float64) for the same settings."""
from __future__ import annotations

from typing import Dict, Iterable

import numpy as np
import sympy

from .derive import Derivation
from .symbols import Array, StepSymbols

Values = Dict[sympy.Symbol, float]


def evaluate(exprs: Array, values: Values) -> np.ndarray:
    """``exprs`` (any shape) evaluated at ``values`` with ``sympy.lambdify``; float64 array, same shape."""
    exprs = np.asarray(exprs, dtype=object)
    args = list(values)
    fn = sympy.lambdify(args, [sympy.sympify(e) for e in exprs.ravel()], modules="math")
    return np.array(fn(*[values[a] for a in args]), dtype=np.float64).reshape(exprs.shape)


def _assign(values: Values, symbols: Array, numbers: np.ndarray) -> None:
    for sym, x in zip(np.ravel(symbols), np.ravel(numbers)):
        if isinstance(sym, sympy.Symbol):
            values[sym] = float(x)


def random_values(sy: StepSymbols, scale: float, seed: int = 0) -> Values:
    """Random numbers for every symbol of ``sy``: gates in their ranges, a positive-definite ``H``."""
    rng = np.random.default_rng(seed)
    K, V = sy.K, sy.V
    values: Values = {}
    post = sy.objective.posterior
    if post == "point":
        _assign(values, sy.state["S"], rng.normal(size=(V, K)))
    elif post == "diagonal":
        _assign(values, sy.state["mu"], rng.normal(size=(V, K)))
        _assign(values, sy.state["I"], rng.uniform(0.5, 3.0, size=(V, K)))
    else:
        _assign(values, sy.state["G"], rng.normal(size=(V, K)))
        A = rng.normal(size=(K, K))
        _assign(values, sy.state["H"], A @ A.T)
        _assign(values, sy.lam, rng.uniform(0.25, 1.0, size=K))
    for arr, low, high in ((sy.alpha, 0.5, 0.99), (sy.beta, 0.1, 1.0), (sy.b, 0.1, 1.0), (sy.Ip, 0.5, 2.0)):
        _assign(values, arr, rng.uniform(low, high, size=arr.shape))
    for arr in (sy.q, sy.k, sy.v):
        _assign(values, arr, rng.normal(size=arr.shape))
    values[sy.scale] = float(scale)
    return values


def _state_values(symbols: Dict[str, Array], numbers: Dict[str, np.ndarray]) -> Values:
    out: Values = {}
    for key, syms in symbols.items():
        _assign(out, syms, numbers[key])
    return out


def derived_step(d: Derivation, values: Values):
    """Prior, update and readout of the derivation, composed numerically: ``(state, output, variance)``."""
    sy = d.symbols
    prior = {key: evaluate(x, values) for key, x in d.prior.items()}
    at_prior = {**values, **_state_values(sy.prior_state, prior)}
    post = {key: evaluate(x, at_prior) for key, x in d.update.items()}
    at_post = {**values, **_state_values(sy.state, post)}
    out = evaluate(d.output, at_post)
    var = None if d.variance is None else evaluate(d.variance, at_post)
    return post, out, var


def _numbers(values: Values, symbols: Array) -> np.ndarray:
    return np.array([values[s] if isinstance(s, sympy.Symbol) else float(s) for s in np.ravel(symbols)]
                    ).reshape(np.shape(symbols))


def scan_step(sy: StepSymbols, values: Values):
    """One step of ``metaplastic.scan`` from the same numbers: ``(state, output, variance)``, float64."""
    import torch

    from metaplastic.scan import scan

    obj = sy.objective
    t = lambda x: torch.as_tensor(np.asarray(x, dtype=np.float64))  # noqa: E731
    K, V = sy.K, sy.V
    q = t(_numbers(values, sy.q)).view(1, 1, 1, K)
    k = t(_numbers(values, sy.k)).view(1, 1, 1, K)
    v = t(_numbers(values, sy.v)).view(1, 1, 1, V)
    alpha = _numbers(values, sy.alpha)
    log_decay = None
    if obj.forgetting == "scalar":
        log_decay = t(np.log(alpha)).view(1, 1, 1)
    elif obj.forgetting == "vector":
        log_decay = t(np.log(alpha)).view(1, 1, 1, K)
    beta_n = _numbers(values, sy.beta)[:, 0]
    beta = t(beta_n).view(1, 1, 1, -1) if beta_n.size > 1 else t(beta_n).view(1, 1, 1)
    b = None
    if obj.posterior == "diagonal":
        b_n = _numbers(values, sy.b)[:, 0]
        b = t(b_n).view(1, 1, 1, -1) if b_n.size > 1 else t(b_n).view(1, 1, 1)
    lam = None if sy.lam is None else t(_numbers(values, sy.lam)).view(1, K)
    init = {key: t(_numbers(values, syms)).unsqueeze(0).unsqueeze(0) for key, syms in sy.state.items()}
    res = scan(obj, q, k, v, log_decay=log_decay, beta=beta, b=b, prior_precision=values[sy.Ip[0, 0]], lam=lam,
               scale=values[sy.scale], initial_state=init, output_final_state=True,
               output_variance=obj.posterior != "point")
    state = {key: x[0, 0].numpy() for key, x in res.final_state.items()}
    var = None if res.variance is None else res.variance[0, 0, 0].numpy()
    return state, res.output[0, 0, 0].numpy(), var


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(max|b|, 1e-12)``."""
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-12))


def numeric_error(d: Derivation, scale: float, seeds: Iterable[int] = (0, 1)) -> float:
    """Largest relative error between the derived step and ``metaplastic.scan`` over ``seeds``."""
    worst = 0.0
    for seed in seeds:
        values = random_values(d.symbols, scale, seed)
        state, out, var = derived_step(d, values)
        ref_state, ref_out, ref_var = scan_step(d.symbols, values)
        errs = [relative_error(out, ref_out)] + [relative_error(state[key], ref_state[key]) for key in state]
        if var is not None and ref_var is not None:
            errs.append(relative_error(var, ref_var))
        worst = max(worst, *errs)
    return worst


def random_scan_inputs(objective, T: int = 6, H: int = 2, K: int = 3, V: int = 2, seed: int = 0,
                       beta_per_value: bool = False) -> dict:
    """Random float64 keyword arguments for ``metaplastic.scan(objective, **inputs)`` (``B = 1``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inputs = {"q": torch.randn(1, T, H, K, generator=gen, dtype=torch.float64),
              "k": torch.randn(1, T, H, K, generator=gen, dtype=torch.float64) / K ** 0.5,
              "v": torch.randn(1, T, H, V, generator=gen, dtype=torch.float64)}
    if objective.forgetting == "scalar":
        inputs["log_decay"] = -0.5 * rand(1, T, H)
    elif objective.forgetting == "vector":
        inputs["log_decay"] = -0.5 * rand(1, T, H, K)
    inputs["beta"] = 0.1 + 0.9 * (rand(1, T, H, V) if beta_per_value else rand(1, T, H))
    if objective.posterior == "full":
        inputs["lam"] = 0.25 + rand(H, K)
    return inputs
