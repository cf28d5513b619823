"""Shared test helpers: random scan inputs for any objective (:func:`scan_inputs`), one comparison of a scan
path against the reference scan with every gradient (:func:`check_against_reference`), tiny Mamba2 / Gated
DeltaNet models, one ``assert_close``.

Imported as ``from helpers import ...`` (``tests/conftest.py`` puts ``tests/`` on ``sys.path``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

import metaplastic
from metaplastic import Objective, ScanResult
from metaplastic.registry import ModelSpec

Tensor = torch.Tensor
TINY = 1e-30  # the smallest norm a relative error divides by


# --- comparisons ------------------------------------------------------------------------------------

def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float = 0.0, msg: str = "") -> None:
    """``max|actual - expected| <= atol + rtol · max|expected|`` over the entries where ``expected`` is finite.

    Fails on a shape mismatch, on any non-finite ``actual`` where ``expected`` is finite, and where
    ``expected`` is not finite unless ``actual`` holds the same value there. The message reports the max
    relative error ``‖a − e‖∞ / max(‖e‖∞, tiny)`` and the max absolute error.
    """
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    where = f"{msg}: " if msg else ""
    assert a.shape == e.shape, f"{where}shape {tuple(a.shape)} differs from the expected {tuple(e.shape)}"
    finite = torch.isfinite(e)
    bad = finite & ~torch.isfinite(a)
    assert not bad.any(), f"{where}{int(bad.sum())} non-finite values where the expected ones are finite"
    if not finite.all():
        same = (a[~finite] == e[~finite]) | (torch.isnan(a[~finite]) & torch.isnan(e[~finite]))
        assert same.all(), f"{where}non-finite expected values not matched"
    if not finite.any():
        return
    abs_err = (a[finite] - e[finite]).abs().max().item()
    scale = e[finite].abs().max().item()
    rel_err = abs_err / max(scale, TINY)
    assert abs_err <= atol + rtol * scale, (f"{where}max relative error {rel_err:.3e} (rtol {rtol:.1e}), "
                                            f"max abs error {abs_err:.3e} (atol {atol:.1e})")


# --- random scan inputs -----------------------------------------------------------------------------

def random_inputs(model: Union[str, ModelSpec, Objective], B: int = 2, T: int = 7, H: int = 2, K: int = 5, V: int = 3,
                  *, seed: int = 0, beta_per_value: Optional[bool] = None, b_per_value: bool = True,
                  b_zero: bool = False, prior_precision: bool = True, keys: Union[str, float] = "unit",
                  decay_min: float = 0.5, init: Optional[str] = None, N: Optional[int] = None,
                  groups: Optional[int] = None, beta_min: float = 0.0,
                  dtype: torch.dtype = torch.float64, device: Union[str, torch.device] = "cpu") -> Dict[str, object]:
    """Valid random keyword inputs of :func:`metaplastic.scan` for ``model`` (registry name, spec or objective).

    ``q, k, v [B, T, H, K|V]``; ``log_decay`` ``[B, T, H]`` (scalar forgetting) or ``[B, T, H, K]`` (vector),
    decays uniform in ``(decay_min, 1)``; ``beta`` in ``(beta_min, beta_min + 1)``, ``[B, T, H, V]`` when
    ``beta_per_value`` (default: the registry entry's) else ``[B, T, H]``; diagonal posterior: ``b`` in (0, 1)
    (``[B, T, H, V]``, head-shared ``[B, T, H]``, or one per group of value rows ``[B, T, H, groups]`` when
    ``groups`` is given; zeros with ``b_zero``) and ``prior_precision [H]`` in (0.5, 1.5) (1.0 with ``b_zero``;
    none when ``prior_precision`` is False); full posterior: ``lam [H, K]`` in (0.25, 1.25).
    ``keys``: ``"unit"`` (unit-norm rows) or a number (standard normal times it). ``init``: None, ``"random"``
    (a random initial state of ``N`` sequences, default ``B``), or ``"shared"`` (the precision ``I`` constant over
    the value rows of each importance group: over V without ``groups``).
    """
    spec = metaplastic.registry[model] if isinstance(model, str) else model
    obj = spec if isinstance(spec, Objective) else spec.objective
    if beta_per_value is None:
        beta_per_value = bool(getattr(spec, "beta_per_value", False))
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def u(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    q, k = r(B, T, H, K), r(B, T, H, K)
    k = torch.nn.functional.normalize(k, dim=-1) if keys == "unit" else float(keys) * k
    x: Dict[str, object] = {"q": q, "k": k, "v": r(B, T, H, V)}
    if obj.forgetting != "none":
        shape = (B, T, H, K) if obj.forgetting == "vector" else (B, T, H)
        x["log_decay"] = torch.log(decay_min + (1 - decay_min) * u(*shape))
    x["beta"] = beta_min + (u(B, T, H, V) if beta_per_value else u(B, T, H))
    if obj.posterior == "diagonal":
        shape = (B, T, H, groups) if groups is not None else (B, T, H, V) if b_per_value else (B, T, H)
        x["b"] = torch.zeros(shape, dtype=torch.float64) if b_zero else u(*shape)
        if prior_precision:
            x["prior_precision"] = 1.0 if b_zero else 0.5 + u(H)
    if obj.posterior == "full":
        x["lam"] = 0.25 + u(H, K)
    if init is not None:
        n = B if N is None else N
        if obj.posterior == "point":
            x["initial_state"] = {"S": r(n, H, V, K)}
        elif obj.posterior == "diagonal":
            if init == "random":
                I0 = 0.5 + u(n, H, V, K)
            else:  # constant over the value rows of each of the G groups
                G = groups or 1
                I0 = (0.5 + u(n, H, G, 1, K)).expand(n, H, G, V // G, K).reshape(n, H, V, K)
            x["initial_state"] = {"mu": r(n, H, V, K), "I": I0.clone()}
        else:
            R = r(n, H, K, K)
            x["initial_state"] = {"G": r(n, H, V, K), "H": R @ R.transpose(-1, -2) / K}
    return {key: _to(val, dtype, device) for key, val in x.items()}


def scan_inputs(model: Union[str, ModelSpec, Objective], B: int = 2, T: int = 7, H: int = 2, K: int = 5,
                V: int = 3, **options) -> Tuple[Objective, Dict[str, object]]:
    """``(objective, inputs)``: the objective of ``model`` and :func:`random_inputs` ``(model, B, T, H, K, V,
    **options)``."""
    spec = metaplastic.registry[model] if isinstance(model, str) else model
    return (spec if isinstance(spec, Objective) else spec.objective), random_inputs(model, B, T, H, K, V, **options)


def _to(val, dtype, device):
    if isinstance(val, Tensor):
        return val.to(device, dtype)
    if isinstance(val, dict):
        return {key: t.to(device, dtype) for key, t in val.items()}
    return val


# --- a scan path against the reference scan, with every gradient ----------------------------------------

def scan_leaves(x: Dict[str, object], dtype: Optional[torch.dtype] = None,
                device: Union[str, torch.device, None] = None, *,
                grad_initial_precision: bool = True) -> Tuple[Dict[str, object], Dict[str, Tensor]]:
    """Fresh copies of the scan inputs ``x`` (in ``dtype`` on ``device``; None keeps each tensor's) that are
    autograd leaves: ``(inputs, {name: leaf})``, every tensor requiring a gradient except the initial precision
    ``I`` without ``grad_initial_precision``. Names: the keyword, or ``initial_state.KEY``."""
    out: Dict[str, object] = {}
    flat: Dict[str, Tensor] = {}

    def leaf(name: str, t: Tensor, grad: bool = True) -> Tensor:
        t = t.detach().to(device or t.device, dtype or t.dtype).clone().requires_grad_(grad)
        if grad:
            flat[name] = t
        return t

    for key, val in x.items():
        if key == "initial_state" and val is not None:
            out[key] = {s: leaf(f"{key}.{s}", t, s != "I" or grad_initial_precision) for s, t in val.items()}
        else:
            out[key] = leaf(key, val) if isinstance(val, Tensor) else val
    return out, flat


def random_cotangents(res: ScanResult, seed: int = 1) -> List[Tensor]:
    """Standard normal float64 CPU weights, one per output of ``res``: output, variance (if any), then the
    final state by sorted key (if any)."""
    gen = torch.Generator().manual_seed(seed)
    outputs = [res.output] + ([res.variance] if res.variance is not None else [])
    outputs += [res.final_state[key] for key in sorted(res.final_state or {})]
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in outputs]


def cotangent_loss(res: ScanResult, weights: Sequence[Tensor]) -> Tensor:
    """``Σ weights · outputs`` in float64 on the CPU, outputs in :func:`random_cotangents`' order: a loss whose
    gradient sends a distinct random cotangent into every output entry."""
    outputs = [res.output] + ([res.variance] if res.variance is not None else [])
    outputs += [res.final_state[key] for key in sorted(res.final_state or {})]
    assert len(outputs) == len(weights), "the result's outputs do not match the cotangents"
    return sum((t.double().cpu() * w).sum() for t, w in zip(outputs, weights))


def check_against_reference(objective: Objective, x: Dict[str, object], run: Callable[..., ScanResult], *,
                            rtol: float, grad_rtol: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                            device: Union[str, torch.device, None] = None, cu_seqlens: Optional[Tensor] = None,
                            reference_inputs: Optional[Callable[[Dict[str, object]], Dict[str, object]]] = None,
                            grad_initial_precision: bool = True, may_vanish: Sequence[str] = (),
                            output_final_state: bool = True, output_variance: Optional[bool] = None,
                            **kw) -> Tuple[ScanResult, ScanResult]:
    """``run(objective, **inputs, **kw)`` (the path under test, on copies of ``x`` in ``dtype`` on ``device``;
    None keeps ``x``'s) against :func:`metaplastic.scan` with autograd (on float64 CPU copies of the same
    values; ``reference_inputs`` maps those first, e.g. to expand a grouped ``b``). ``kw``: the scan's other
    keywords (``scale``...), given to both; ``output_variance`` defaults to a non-point posterior.

    Asserts: the output has the inputs' dtype; the output, the variance and every final state (the same keys)
    equal the reference's within ``rtol`` (:func:`assert_close`); under one random cotangent per output
    (:func:`random_cotangents`) the gradient of every leaf (:func:`scan_leaves`; ``I`` only with
    ``grad_initial_precision``) is finite, the reference's is not zero everywhere (one that is cannot test
    anything; the leaves named in ``may_vanish`` may be, and are then compared to 1e-12), and the two agree
    within ``grad_rtol`` (default ``rtol``). Returns ``(reference, result)``.
    """
    if output_variance is None:
        output_variance = objective.posterior != "point"
    kw = dict(kw, output_final_state=output_final_state, output_variance=output_variance)
    ref_x, ref_leaves = scan_leaves(x, torch.float64, "cpu", grad_initial_precision=grad_initial_precision)
    ref = metaplastic.scan(objective, **(reference_inputs(ref_x) if reference_inputs else ref_x), **kw,
                           cu_seqlens=cu_seqlens)
    got_x, got_leaves = scan_leaves(x, dtype, device, grad_initial_precision=grad_initial_precision)
    cu = None if cu_seqlens is None else cu_seqlens.to(got_x["q"].device)
    got = run(objective, **got_x, **kw, cu_seqlens=cu)
    assert got.output.dtype == got_x["q"].dtype, f"output dtype {got.output.dtype}, inputs {got_x['q'].dtype}"
    assert_close(got.output, ref.output, rtol=rtol, msg="output")
    if ref.variance is not None:
        assert_close(got.variance, ref.variance, rtol=rtol, msg="variance")
    assert set(got.final_state or {}) == set(ref.final_state or {})
    for key in ref.final_state or {}:
        assert_close(got.final_state[key], ref.final_state[key], rtol=rtol, msg=f"final state {key}")
    weights = random_cotangents(ref)
    g_ref = torch.autograd.grad(cotangent_loss(ref, weights), list(ref_leaves.values()))
    g_got = torch.autograd.grad(cotangent_loss(got, weights), list(got_leaves.values()))
    for name, a, b in zip(ref_leaves, g_ref, g_got):
        assert torch.isfinite(b).all(), f"non-finite gradient of {name}"
        if name in may_vanish:
            assert_close(b, a, rtol=grad_rtol or rtol, atol=1e-12, msg=f"gradient of {name}")
            continue
        assert a.abs().max() > 0, f"the reference gradient of {name} is zero everywhere: it cannot test anything"
        assert_close(b, a, rtol=grad_rtol or rtol, msg=f"gradient of {name}")
    return ref, got


# --- tiny models ------------------------------------------------------------------------------------

@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, *, dt_bias: float = -2.0, scale: float = 0.3):
    """Move every parameter off its initial value (ones, zeros and aranges hide terms): ``A_log`` ->
    ``log(0.5 + 4u)``, ``dt_bias`` -> ``dt_bias + N(0, 1)``, every other parameter ``+= scale · N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + 4 * torch.rand(p.shape, generator=gen)))
        elif name.endswith("dt_bias"):
            p.copy_(dt_bias + torch.randn(p.shape, generator=gen))
        else:
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module


def mamba2_config(**overrides):
    """A tiny transformers ``Mamba2Config`` (16 wide, 2 layers, 4 heads of 8, state 6, 2 groups); ``overrides``
    replace any field (``tie_word_embeddings`` defaults to True)."""
    from transformers import Mamba2Config
    kw = dict(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8, state_size=6, n_groups=2,
              expand=2, conv_kernel=4, chunk_size=4, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None,
              eos_token_id=None)
    kw.update(overrides)
    return Mamba2Config(**kw)


def tiny_mamba2(seed: int = 0, *, dt_bias: float = -2.0, **overrides):
    """transformers' ``Mamba2ForCausalLM`` at :func:`mamba2_config` size (``torch.manual_seed(seed)``), every
    weight perturbed (:func:`perturb_` seeded ``seed + 1``), in eval mode."""
    from transformers import Mamba2ForCausalLM
    cfg = mamba2_config(**overrides)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(cfg).eval()
    return perturb_(model, seed + 1, dt_bias=dt_bias)


def write_hf(model, path: Path, shard: bool = False) -> Path:
    """``save_pretrained`` (sharded into 20 KB files with ``shard``) plus a stand-in ``tokenizer.json``."""
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    (path / "tokenizer.json").write_text('{"tiny": true}')
    return path


def write_mamba_ssm(model, path: Path, weights: str = "bin", pad_multiple: int = 16,
                    unpadded_vocab: Optional[int] = None) -> Path:
    """A directory in the original mamba_ssm layout (docs/references.md#original-format): config with d_model / ssm_cfg, the
    singular ``backbone.embedding.weight``, ``ngroups`` inside ``ssm_cfg``, a padded vocabulary."""
    c = model.config
    path.mkdir(parents=True, exist_ok=True)
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
              "vocab_size": unpadded_vocab or c.vocab_size,
              "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                          "headdim": c.head_dim, "ngroups": c.n_groups},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple,
              "tie_embeddings": c.tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(config))
    state = {}
    for i in range(c.num_hidden_layers):
        p = f"backbone.layers.{i}."
        for key in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                    "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"):
            state[p + key] = model.state_dict()[p + key].clone()
    state["backbone.embedding.weight"] = model.backbone.embeddings.weight.detach().clone()
    state["backbone.norm_f.weight"] = model.backbone.norm_f.weight.detach().clone()
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()  # mamba_ssm saves the tied head too
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        state.pop("lm_head.weight") if c.tie_word_embeddings else None
        save_file(state, str(path / "model.safetensors"))
    return path


@torch.no_grad()
def tiny_gated_deltanet(seed: int = 0, *, tie: bool = True, num_v_heads: Optional[int] = None, **overrides):
    """fla's ``GatedDeltaNetForCausalLM`` at a tiny size (16 wide, 2 layers, 2 heads of 8, expand_v 1.5),
    every weight moved off its initial value, in eval mode."""
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM
    kw = dict(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_heads=2, head_dim=8, expand_v=1.5,
              num_v_heads=num_v_heads, intermediate_size=24, norm_eps=1e-6, tie_word_embeddings=tie,
              pad_token_id=None, bos_token_id=None, eos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(**kw)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(0.5 + 4 * torch.rand(p.shape, generator=gen)))
        elif name.endswith("dt_bias"):
            p.copy_(-2.0 + torch.randn(p.shape, generator=gen))
        elif name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.4 * torch.randn(p.shape, generator=gen))
    return model


def tiny_gla(seed: int = 0, *, tie: bool = True, **overrides):
    """fla's ``GLAForCausalLM`` at a tiny size (16 wide, 2 layers, 2 heads of 4 key and 8 value channels, MLP 24),
    every weight moved off its initial value, in eval mode."""
    from fla.models import GLAConfig, GLAForCausalLM
    kw = dict(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_heads=2, intermediate_size=24, norm_eps=1e-6,
              tie_word_embeddings=tie, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GLAForCausalLM(GLAConfig(**kw)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_swish_gate.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=gen))
    return model


def skip_unless_grouped(n_groups: int) -> None:
    """Skip a comparison with transformers' Mamba2 at ``n_groups > 1`` when the installed transformers is older
    than 5.23.0: before it, its gated RMSNorm ran over the whole d_inner instead of per group (mamba_ssm)."""
    import pytest
    import transformers

    from metaplastic.oracles import transformers_mamba2_is_grouped
    if n_groups > 1 and not transformers_mamba2_is_grouped():
        pytest.skip(f"transformers {transformers.__version__} < 5.23 normalises Mamba2's gated output over the "
                    "whole d_inner, not per group as mamba_ssm: not a reference at n_groups > 1")


def edit_config(path: Path, **changes) -> None:
    """Change fields of ``path/config.json`` in place (a value of None removes the field)."""
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path: Path, fn) -> None:
    """Apply ``fn`` to the state dict of ``path/model.safetensors`` and write it back."""
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def copy_dir(src: Path, dst: Path) -> Path:
    """Copy the files of ``src`` into a new folder ``dst``; returns ``dst``."""
    import os
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# Tiny keyword arguments of every mixer, for registry-wide model tests.
TINY_MIXERS = {
    "mamba2": dict(num_heads=4, head_dim=8, state_size=4, n_groups=2),
    "meta_mamba2": dict(num_heads=4, head_dim=8, state_size=4, n_groups=2, importance_rank=3),
    "palimpsa": dict(num_heads=2, head_dim=8, importance_rank=3),
    "gated_deltanet": dict(num_heads=2, head_dim=8, expand_v=1.5),
    "meta_gated_deltanet": dict(num_heads=2, head_dim=8, importance_rank=3),
    "gla": dict(num_heads=2, use_short_conv=True),
    "meta_gla": dict(num_heads=2, importance_rank=3),
    "mesanet": dict(num_heads=2, head_dim=8),
    "longhorn": dict(state_size=4),
    "meta_longhorn": dict(state_size=4, importance_rank=3),
}
