"""Independent references (docs/references.md#reference-functions-on-a-cpu), adapted to this package's layout.

Each :class:`Oracle` builds valid random inputs in *its* parameterisation (Mamba2's ``Δ·A`` decay, for
instance), runs the implementation nobody here wrote, and returns ``(output [B,T,H,V], final_state)``
with the final state converted to this package's value-first dictionaries. ``metaplastic verify
--numeric`` and the tests both use these adapters, so the layout traps are handled in one place.

All the references compute in float32 (they cast their inputs), which bounds any comparison with them
to about 1e-6 relative error, measured as ``max |ours - ref| / max |ref|``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Inputs = Dict[str, object]


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64)


def base_inputs(B: int, T: int, H: int, K: int, V: int, seed: int, *, normalize_keys: bool = False) -> Tuple[
        torch.Generator, Inputs]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _randn(gen, B, T, H, K), _randn(gen, B, T, H, K), _randn(gen, B, T, H, V)
    if normalize_keys:
        k = F.normalize(k, dim=-1)
        q = F.normalize(q, dim=-1)
    return gen, {"q": q, "k": k, "v": v}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|`` (0 when both are zero)."""
    ref = ref.to(torch.float64)
    denom = ref.abs().max().item()
    err = (ours.to(torch.float64) - ref).abs().max().item()
    return err / denom if denom > 0 else err


@dataclass(frozen=True)
class Oracle:
    """An independent implementation of one registry model."""

    model: str  # registry name
    name: str  # what it is, e.g. "fla naive_recurrent_simple_gla"
    make_inputs: Callable[..., Inputs]  # (B, T, H, K, V, seed, initial_state: bool) -> scan kwargs (+ q, k, v)
    run: Callable[[Inputs], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]
    requires: str  # importable module it needs
    needs_square: bool = False  # V must equal K

    def inputs(self, B: int, T: int, H: int, K: int, V: int, seed: int = 0, initial_state: bool = False) -> Inputs:
        """Random valid inputs in float64, rounded to float32-representable values (the oracles are fp32)."""
        return _map_tensors(self.make_inputs(B, T, H, K, V, seed, initial_state),
                            lambda t: t.float().double())

    def reference(self, inputs: Inputs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Run the independent implementation (in float32) on ``inputs``; outputs come back in float64."""
        out, state = self.run(_map_tensors(inputs, lambda t: t.float()))
        return out.double(), {key: val.double() for key, val in state.items()}

    def available(self) -> bool:
        try:
            __import__(self.requires)
            return True
        except Exception:
            return False


def _map_tensors(x, fn):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {key: _map_tensors(val, fn) for key, val in x.items()}
    if isinstance(x, tuple):
        return tuple(_map_tensors(val, fn) for val in x)
    return x


# --- input builders --------------------------------------------------------------------------------

def _decay_inputs(vector: bool) -> Callable[..., Inputs]:
    def make(B, T, H, K, V, seed, initial_state=False) -> Inputs:
        gen, x = base_inputs(B, T, H, K, V, seed)
        shape = (B, T, H, K) if vector else (B, T, H)
        x["log_decay"] = torch.log(0.7 + 0.3 * _rand(gen, *shape))
        if initial_state:
            x["initial_state"] = {"S": _randn(gen, B, H, V, K)}
        return x
    return make


def _no_decay_inputs(B, T, H, K, V, seed, initial_state=False) -> Inputs:
    gen, x = base_inputs(B, T, H, K, V, seed)
    if initial_state:
        x["initial_state"] = {"S": _randn(gen, B, H, V, K)}
    return x


def _delta_inputs(gated: bool) -> Callable[..., Inputs]:
    def make(B, T, H, K, V, seed, initial_state=False) -> Inputs:
        gen, x = base_inputs(B, T, H, K, V, seed, normalize_keys=True)
        x["beta"] = _rand(gen, B, T, H)
        if gated:
            x["log_decay"] = torch.log(0.7 + 0.3 * _rand(gen, B, T, H))
        if initial_state:
            x["initial_state"] = {"S": _randn(gen, B, H, V, K)}
        return x
    return make


def _mamba2_inputs(B, T, H, K, V, seed, initial_state=False) -> Inputs:
    gen, x = base_inputs(B, T, H, K, V, seed)
    dt = 0.05 + 0.5 * _rand(gen, B, T, H)
    A = -(0.2 + _rand(gen, H))
    x["beta"] = dt
    x["log_decay"] = dt * A
    x["_mamba2"] = (dt, A)
    if initial_state:
        x["initial_state"] = {"S": _randn(gen, B, H, V, K)}
    return x


def _longhorn_inputs(B, T, H, K, V, seed, initial_state=False) -> Inputs:
    gen, x = base_inputs(B, T, H, K, V, seed)
    x["k"] = x["k"] / math.sqrt(K)
    x["beta"] = _rand(gen, B, T, H, V)
    if initial_state:
        x["initial_state"] = {"S": _randn(gen, B, H, V, K)}
    return x


def _mesanet_inputs(B, T, H, K, V, seed, initial_state=False) -> Inputs:
    gen, x = base_inputs(B, T, H, K, V, seed, normalize_keys=True)
    x["log_decay"] = F.logsigmoid(2.0 + _randn(gen, B, T, H))
    x["beta"] = torch.sigmoid(_randn(gen, B, T, H))
    x["lam"] = F.softplus(_randn(gen, H, K)) + 0.25
    if initial_state:
        R = _randn(gen, B, H, K, K) / math.sqrt(K)
        x["initial_state"] = {"G": _randn(gen, B, H, V, K), "H": R @ R.transpose(-1, -2)}
    return x


# --- runners ---------------------------------------------------------------------------------------

def _key_first(state: Optional[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    return None if state is None else state["S"].transpose(-1, -2).contiguous()


def _value_first(S: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {"S": S.transpose(-1, -2)}


def _run_linear_attention(x: Inputs):
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    K = x["q"].shape[-1]
    o, S = naive_recurrent_linear_attn(x["q"], x["k"], x["v"], scale=K ** -0.5,
                                       initial_state=_key_first(x.get("initial_state")), output_final_state=True)
    return o, _value_first(S)


def _run_simple_gla(x: Inputs):
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    K = x["q"].shape[-1]
    o, S = naive_recurrent_simple_gla(x["q"], x["k"], x["v"], x["log_decay"], scale=K ** -0.5,
                                      initial_state=_key_first(x.get("initial_state")), output_final_state=True)
    return o, _value_first(S)


def _run_mamba2(x: Inputs):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    fn = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)
    dt, A = x["_mamba2"]
    init = x.get("initial_state")
    # hidden_states = v (x), B = k, C = q; groups = heads here (G = H); state [B,H,P,N] is value-first.
    o, S = fn(x["v"], dt, A, x["k"], x["q"], chunk_size=8, D=None, dt_bias=None,
              initial_states=None if init is None else init["S"], dt_softplus=False, return_final_states=True)
    return o, {"S": S}


def _run_gla(x: Inputs):
    from fla.ops.gla.naive import naive_recurrent_gla
    o, S = naive_recurrent_gla(x["q"], x["k"], x["v"], x["log_decay"],
                               initial_state=_key_first(x.get("initial_state")), output_final_state=True)
    return o, _value_first(S)


def _run_deltanet(x: Inputs):
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    t = lambda a: a.transpose(1, 2).contiguous()  # noqa: E731  fla's delta rule is [B, H, T, D]
    o, S = delta_rule_recurrence(t(x["q"]), t(x["k"]), t(x["v"]), x["beta"].transpose(1, 2).contiguous(),
                                 initial_state=_key_first(x.get("initial_state")), output_final_state=True)
    return o.transpose(1, 2), _value_first(S)


def _run_gated_deltanet(x: Inputs):
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    K = x["q"].shape[-1]
    # argument order (beta, g): the chunk version and transformers' take (g, beta)
    o, S = naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], scale=K ** -0.5,
                                            initial_state=_key_first(x.get("initial_state")),
                                            output_final_state=True)
    return o, _value_first(S)


def _run_gated_deltanet_transformers(x: Inputs):
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule
    fn = getattr(torch_recurrent_gated_delta_rule, "__wrapped__", torch_recurrent_gated_delta_rule)
    o, S = fn(x["q"], x["k"], x["v"], x["log_decay"], x["beta"], initial_state=_key_first(x.get("initial_state")),
              output_final_state=True)
    return o, _value_first(S)


def _run_longhorn(x: Inputs):
    """LongHorn = fla's ``naive_recurrent_gla`` with one head per value channel (docs/references.md#the-longhorn-mapping).

    This oracle restates the formula it checks: the mapping writes LongHorn's ``ε = β / (1 + β‖k‖²)`` and its
    decay ``log1p(−ε k²)`` out by hand, the same closed form as ``unify/metaplastic/closed_forms.py``, so an error in that
    formula shared by both sides would pass here. What it checks independently is the recurrence around it
    (decay before update, read-out, scale, layouts, initial and final states), with fla doing the arithmetic.
    The closed form itself is checked by the sympy theorem ``longhorn_is_diagonal_proximal`` (limit 4: ε is the
    exact Sherman–Morrison solution of the regression step with a diagonal transition, derived from the
    objective, not restated) and by its mutation test in ``tests/derivations/test_derivations.py``.
    """
    from fla.ops.gla.naive import naive_recurrent_gla
    q, k, v, beta = x["q"], x["k"], x["v"], x["beta"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    eps = beta / (1 + beta * (k * k).sum(-1, keepdim=True))  # [B,T,H,V]
    k2 = (k * k)[..., None, :]  # [B,T,H,1,K]
    gk = torch.log1p(-eps[..., None] * k2)  # [B,T,H,V,K]
    k_ = eps[..., None] * k[..., None, :]
    q_ = (q * math.sqrt(K))[..., None, :].expand(B, T, H, V, K)
    v_ = v[..., None]  # [B,T,H,V,1]
    flat = lambda a: a.reshape(B, T, H * V, a.shape[-1])  # noqa: E731
    init = x.get("initial_state")
    h0 = None if init is None else init["S"].reshape(B, H * V, K)[..., None]
    o, h = naive_recurrent_gla(flat(q_), flat(k_), flat(v_), flat(gk), initial_state=h0, output_final_state=True)
    return o.reshape(B, T, H, V), {"S": h.reshape(B, H, V, K)}


def _run_mesanet(x: Inputs):
    from fla.ops.mesa_net.naive import naive_mesa_net_exact
    init = x.get("initial_state")
    o, h_kk, h_kv = naive_mesa_net_exact(
        x["q"], x["k"], x["v"], x["log_decay"], x["lam"], x["beta"],
        h_kk_init=None if init is None else init["H"],
        h_kv_init=None if init is None else init["G"].transpose(-1, -2).contiguous())
    return o, {"G": h_kv.transpose(-1, -2), "H": h_kk}


ORACLES: Tuple[Oracle, ...] = (
    Oracle("linear_attention", "fla naive_recurrent_linear_attn", _no_decay_inputs, _run_linear_attention, "fla"),
    Oracle("simple_gla", "fla naive_recurrent_simple_gla", _decay_inputs(False), _run_simple_gla, "fla"),
    Oracle("mamba2", "transformers mamba2_chunk_scan (torch path)", _mamba2_inputs, _run_mamba2, "transformers"),
    Oracle("gla", "fla naive_recurrent_gla", _decay_inputs(True), _run_gla, "fla"),
    Oracle("deltanet", "fla delta_rule_recurrence", _delta_inputs(False), _run_deltanet, "fla"),
    Oracle("gated_deltanet", "fla naive_recurrent_gated_delta_rule", _delta_inputs(True), _run_gated_deltanet, "fla"),
    Oracle("gated_deltanet", "transformers torch_recurrent_gated_delta_rule (qwen3_next)", _delta_inputs(True),
           _run_gated_deltanet_transformers, "transformers"),
    Oracle("longhorn", "fla naive_recurrent_gla, one head per value channel (docs/references.md#the-longhorn-mapping)",
           _longhorn_inputs, _run_longhorn, "fla"),
    Oracle("mesanet", "fla naive_mesa_net_exact", _mesanet_inputs, _run_mesanet, "fla", needs_square=True),
)


def scan_kwargs(inputs: Inputs) -> Inputs:
    """The inputs an oracle built, minus its private entries (``_*``), ready for ``metaplastic.scan``."""
    return {key: val for key, val in inputs.items() if not key.startswith("_")}


# transformers' Mamba2 follows mamba_ssm for n_groups > 1 (heads read their group's B, C in contiguous blocks,
# and the gated RMSNorm runs within each group) from this version on; before it, its gated RMSNorm ran over
# the whole d_inner (the paper authors' convention), which gives other logits whenever n_groups > 1.
TRANSFORMERS_MAMBA2_GROUPED_NORM = (5, 23, 0)


def transformers_mamba2_is_grouped(version: Optional[str] = None) -> bool:
    """True when the installed (or the given) transformers normalises Mamba2's gated output per group, as
    mamba_ssm does; only then is it a reference for Mamba2 at ``n_groups > 1``."""
    from packaging.version import Version
    if version is None:
        import transformers
        version = transformers.__version__
    return Version(version).release >= TRANSFORMERS_MAMBA2_GROUPED_NORM
