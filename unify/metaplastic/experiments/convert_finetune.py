"""Convert, then fine-tune: does a converted Mamba2 gain recall from its metaplastic path?

    metaplastic convert-finetune --config quick|study [--set KEY=VALUE ...] [--out DIR]

Per seed:

1. **Source.** A small Mamba2 language model (``MetaplasticForCausalLM`` with ``mamba2`` mixers, no MLP) is
   trained from scratch for ``source_steps`` on MQAR (:mod:`metaplastic.experiments.mqar_data`, the mixture
   of ``settings``, one sequence length), with the MQAR harness's initialisation rule (every decay starts
   in ``decay_range``) and optimiser (:func:`metaplastic.experiments.mqar.fit`). Its final training loss
   and ``converged`` flag (final loss ≤ ``converged_loss``) are recorded.
2. **Conversion** with the library's functions: each mixer through
   :func:`metaplastic.to_metaplastic` (``init="identity"``: γ = 0) and the config through
   :func:`metaplastic.models.convert.twin_config`. The converted model must start equal to the source:
   the largest |logit difference| on test inputs, both models run in float64, must be ≤ ``identity_atol``
   (1e-9), or the run stops; the float32 difference is recorded too.
3. **Fine-tuning**, ``finetune_steps`` each, on fresh data of the training distribution (the same batches
   for every arm): (a) ``converted: metaplastic path`` — only the importance paths' parameters (γ, W_b1,
   W_b2, b_scale) train; (b) ``converted: all weights``; (c) ``source: all weights`` — the Mamba2 source,
   for the same number of steps (the control: more training alone).
4. **Recall** (exact match on the query positions) of the source before fine-tuning and of each arm, on
   the trained settings (*in distribution*) and on ``beyond`` (more pairs, longer sequences, hence longer
   gaps than trained), each a fixed test split.

Reported per arm and setting: mean and sample standard deviation over seeds; γ after fine-tuning.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from metaplastic.kernels.threads import torch_threads
from .mqar import evaluate, final_loss, fit, is_converged, loss_curve, spread, usable_decay_
from .mqar_data import FILLERS, check_setting, mqar

ARMS = ("converted: metaplastic path", "converted: all weights", "source: all weights")
SOURCE = "source (before fine-tuning)"


@dataclass(frozen=True)
class ConvertFinetuneConfig:
    """One experiment; every field can be set with ``--set KEY=VALUE`` (JSON)."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    state_size: int  # Mamba2's N
    head_dim: int  # Mamba2's head dim (d_inner = 2 · d_model)
    settings: Tuple[Tuple[int, int], ...]  # trained on (one sequence length, mixed pair counts)
    beyond: Tuple[Tuple[int, int], ...]  # tested only: more pairs, longer sequences
    train_examples: int  # per setting, for the source and (fresh draws) for the fine-tuning
    test_examples: int  # per setting
    source_steps: int
    finetune_steps: int
    batch_size: int
    source_lr: float
    finetune_lr: float
    seeds: Tuple[int, ...]
    converged_loss: float = 0.5
    filler: str = "random"
    decay_range: Tuple[float, float] = (0.9, 0.999)
    importance_rank: Optional[int] = None  # default: min(64, d_model)
    identity_atol: float = 1e-9  # on the logits, both models run in float64
    smoke: bool = False
    threads: Optional[int] = 1


CONFIGS: Dict[str, ConvertFinetuneConfig] = {
    # A smoke test (a minute or two on a CPU): checks the pipeline and the identity; not a result.
    "quick": ConvertFinetuneConfig("quick", vocab_size=32, d_model=16, n_layers=2, state_size=4, head_dim=8,
                                   settings=((32, 2), (32, 4)), beyond=((64, 4), (64, 8)), train_examples=512,
                                   test_examples=64, source_steps=120, finetune_steps=40, batch_size=32,
                                   source_lr=3e-3, finetune_lr=1e-3, seeds=(0, 1), smoke=True),
    # Mamba2 d_model 32, N = 8, trained on Zoology's random filler at T = 32 with 2 to 8 pairs for 5400 steps
    # (as long as the MQAR study's runs), fine-tuned 600 steps, tested up to T = 128 with 16 pairs; 3 seeds.
    # About a quarter of an hour of one CPU core.
    "study": ConvertFinetuneConfig("study", vocab_size=64, d_model=32, n_layers=2, state_size=8, head_dim=16,
                                   settings=((32, 2), (32, 4), (32, 8)), beyond=((64, 8), (64, 16), (128, 16)),
                                   train_examples=1200, test_examples=300, source_steps=5400,
                                   finetune_steps=600, batch_size=16, source_lr=1e-2, finetune_lr=1e-3,
                                   seeds=(0, 1, 2), converged_loss=0.25),
}


def validate_config(cfg: ConvertFinetuneConfig) -> None:
    """Raise ``ValueError`` naming the first bad field (before any training)."""
    for key in ("vocab_size", "d_model", "n_layers", "state_size", "head_dim", "train_examples",
                "test_examples", "source_steps", "finetune_steps", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")
    if (2 * cfg.d_model) % cfg.head_dim:
        raise ValueError(f"head_dim={cfg.head_dim} must divide 2·d_model = {2 * cfg.d_model}")
    if not cfg.settings:
        raise ValueError("settings: at least one (sequence length, pairs) is needed")
    if len({T for T, _ in cfg.settings}) != 1:
        raise ValueError(f"settings: the trained settings must share one sequence length, got {list(cfg.settings)}")
    for key in ("settings", "beyond"):
        for T, P in getattr(cfg, key):
            try:
                check_setting(T, P, cfg.vocab_size)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
    for key in ("source_lr", "finetune_lr", "converged_loss", "identity_atol"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds: need distinct seeds, got {list(cfg.seeds)}")
    if cfg.filler not in FILLERS:
        raise ValueError(f"filler must be one of {', '.join(FILLERS)}, got {cfg.filler!r}")
    lo, hi = cfg.decay_range
    if not 0 < lo < hi < 1:
        raise ValueError(f"decay_range must satisfy 0 < lo < hi < 1, got {list(cfg.decay_range)}")
    if cfg.importance_rank is not None and cfg.importance_rank < 1:
        raise ValueError(f"importance_rank must be positive, got {cfg.importance_rank}")


# ------------------------------------------------------------------------------------------ pieces


def build_source(cfg: ConvertFinetuneConfig) -> nn.Module:
    """The Mamba2 LM (seed torch first). Its mixers are initialised as in the MQAR harness: PyTorch's
    default initialisation (the LM's ``post_init`` draws every matrix from N(0, 0.02²), which leaves the
    mixers' outputs below the norms' ε at this width) and every decay started in ``decay_range``."""
    from metaplastic.models.configuration import MetaplasticConfig
    from metaplastic.models.modeling import MetaplasticForCausalLM
    from metaplastic.models.mixers import build_mixer
    kwargs = dict(head_dim=cfg.head_dim, state_size=cfg.state_size, expand=2)
    config = MetaplasticConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                               mixer="mamba2", mixer_kwargs=kwargs, use_cache=False)
    model = MetaplasticForCausalLM(config)
    for layer in model.backbone.layers:
        layer.mixer = build_mixer("mamba2", cfg.d_model, **kwargs)
        usable_decay_(layer.mixer, *cfg.decay_range)
    return model


def convert(source: nn.Module, rank: Optional[int], generator: torch.Generator) -> nn.Module:
    """The metaplastic twin of the LM ``source`` (``init="identity"``), through the library's
    :func:`to_metaplastic` (each mixer) and :func:`twin_config` (the config); ``source`` is unchanged."""
    from metaplastic.models.twins import to_metaplastic
    from metaplastic.models.convert import twin_config
    model = copy.deepcopy(source)
    for layer in model.backbone.layers:
        layer.mixer = to_metaplastic(layer.mixer, init="identity", rank=rank, generator=generator)
    model.config = twin_config(source.config, torch.float32, rank)
    return model


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, ids: torch.Tensor,
                         dtype: Optional[torch.dtype] = None) -> float:
    """``max |logits_a − logits_b|`` on ``ids [B, T]``, both in eval mode; with ``dtype``, on copies of both
    models cast to it (float64: two exact computations of one function then agree to about 1e-12, whatever
    their summation order, where float32 rounding alone reaches 1e-5 on the logits of a trained model)."""
    if dtype is not None:
        a, b = copy.deepcopy(a).to(dtype), copy.deepcopy(b).to(dtype)
    a.eval()
    b.eval()
    return float((a(ids).logits.double() - b(ids).logits.double()).abs().max())


def importance_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters of every ``ImportancePath`` (the metaplastic path)."""
    from metaplastic.models.importance import ImportancePath
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ImportancePath):
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
    return names


def set_trainable(model: nn.Module, names: Optional[List[str]]) -> int:
    """``requires_grad`` on the parameters in ``names`` only (None: all); returns the trainable count."""
    keep = None if names is None else set(names)
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(keep is None or name in keep)
        count += p.numel() if p.requires_grad else 0
    return count


def gammas(model: nn.Module) -> List[List[float]]:
    """γ per layer and head (empty for a model without gates)."""
    from metaplastic.models.importance import ImportancePath
    return [[round(g, 4) for g in m.gamma.detach().tolist()] for m in model.modules()
            if isinstance(m, ImportancePath) and m.gamma is not None]


# ------------------------------------------------------------------------------------------ the run


def _split(cfg: ConvertFinetuneConfig, T: int, P: int, n: int, stream: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return mqar(n, T, P, cfg.vocab_size, torch.Generator().manual_seed(stream), filler=cfg.filler)


def _train_mixture(cfg: ConvertFinetuneConfig, stream: int) -> Tuple[torch.Tensor, torch.Tensor]:
    parts = [_split(cfg, T, P, cfg.train_examples, stream + 7 * T + P) for T, P in cfg.settings]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def _recall(model: nn.Module, tests: Dict[str, Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]],
            batch_size: int, device: torch.device) -> Dict[str, Dict[str, float]]:
    return {part: {f"{T},{P}": round(evaluate(model, x, y, batch_size, device), 4) for (T, P), (x, y) in sets.items()}
            for part, sets in tests.items()}


def run_convert_finetune(cfg: ConvertFinetuneConfig, device: Optional[str] = None,
                         progress: bool = True) -> Dict[str, Any]:
    """Every seed of ``cfg``; returns the dictionary written to ``convert_finetune.json``."""
    validate_config(cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        return _run(cfg, dev, progress)


def _run(cfg: ConvertFinetuneConfig, dev: torch.device, progress: bool) -> Dict[str, Any]:
    started = time.perf_counter()
    tests = {"in distribution": {(T, P): _split(cfg, T, P, cfg.test_examples, 2 * 10**12 + 7_919 * P + T)
                                 for T, P in cfg.settings},
             "beyond": {(T, P): _split(cfg, T, P, cfg.test_examples, 2 * 10**12 + 7_919 * P + T)
                        for T, P in cfg.beyond}}
    label = "smoke test " if cfg.smoke else ""
    bar = tqdm(total=(cfg.source_steps + len(ARMS) * cfg.finetune_steps) * len(cfg.seeds),
               desc=f"convert-finetune {label}{cfg.name}", disable=not progress, mininterval=5.0)
    runs = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        source = build_source(cfg).to(dev)
        x, y = _train_mixture(cfg, 1_000_003 * seed)
        losses = fit(source, x, y, steps=cfg.source_steps, lr=cfg.source_lr, batch_size=cfg.batch_size, seed=seed,
                     device=dev, bar=bar, label=f"source seed={seed}")
        src_final = final_loss(losses)
        run: Dict[str, Any] = {"seed": seed, "source": {
            "final_loss": round(src_final, 4), "converged": is_converged(src_final, cfg.converged_loss),
            "loss_curve": [round(v, 4) for v in loss_curve(losses, 50)],
            "parameters": sum(p.numel() for p in source.parameters()),
            "recall": _recall(source, tests, cfg.batch_size, dev)}}
        converted = convert(source, cfg.importance_rank, torch.Generator().manual_seed(seed)).to(dev)
        probe = next(iter(tests["in distribution"].values()))[0][:cfg.batch_size].to(dev)
        diff = max_logit_difference(source, converted, probe, torch.float64)
        if not diff <= cfg.identity_atol:  # also catches NaN
            raise RuntimeError(f"the converted model does not start equal to its source: max |logit difference| "
                               f"{diff:.3e} > {cfg.identity_atol:g} in float64 (seed {seed})")
        run["identity_max_abs_diff"] = diff
        run["identity_max_abs_diff_float32"] = max_logit_difference(source, converted, probe)
        x_ft, y_ft = _train_mixture(cfg, 1_000_003 * seed + 500_009)
        arms: Dict[str, Any] = {}
        for arm in ARMS:
            model = copy.deepcopy(source if arm.startswith("source") else converted)
            names = importance_parameters(model) if arm.endswith("metaplastic path") else None
            trainable = set_trainable(model, names)
            losses = fit(model, x_ft, y_ft, steps=cfg.finetune_steps, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                         seed=seed + 1, device=dev, bar=bar, label=f"{arm} seed={seed}")
            arms[arm] = {"trainable_parameters": trainable, "final_loss": round(final_loss(losses), 4),
                         "loss_curve": [round(v, 4) for v in loss_curve(losses, 50)], "gamma": gammas(model),
                         "recall": _recall(model, tests, cfg.batch_size, dev)}
        run["arms"] = arms
        runs.append(run)
    bar.close()
    summary: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for arm in (SOURCE,) + ARMS:
        per = [r["source"]["recall"] if arm == SOURCE else r["arms"][arm]["recall"] for r in runs]
        summary[arm] = {part: {key: dict(values=[p[part][key] for p in per], **spread([p[part][key] for p in per]))
                               for key in per[0][part]} for part in per[0]}
    return {"config": dict(asdict(cfg), seconds=round(time.perf_counter() - started, 1), device=str(dev),
                           torch=torch.__version__),
            "source_converged": f"{sum(r['source']['converged'] for r in runs)}/{len(runs)}",
            "identity_max_abs_diff": max(r["identity_max_abs_diff"] for r in runs),
            "identity_max_abs_diff_float32": max(r["identity_max_abs_diff_float32"] for r in runs),
            "summary": summary, "runs": runs}


# ------------------------------------------------------------------------------------------ outputs


def plot_convert_finetune(result: Dict[str, Any], path: Path) -> Path:
    """One panel per sequence length: recall (mean ± std over seeds) against pairs, one curve per arm."""
    from .plotting import curve_panels
    trained = {T for T, _ in result["config"]["settings"]}
    panels: Dict[str, Dict[str, tuple]] = {}
    for arm, parts in result["summary"].items():
        for part, sets in parts.items():
            for key, s in sets.items():
                T, P = (int(v) for v in key.split(","))
                panel = f"T = {T} ({'trained' if T in trained else 'beyond'})"
                x, y, e = panels.setdefault(panel, {}).setdefault(arm, ([], [], []))
                x.append(P)
                y.append(s["mean"])
                e.append(s["std"])
    cfg = result["config"]
    head = "SMOKE TEST, not a result — " if cfg.get("smoke") else ""
    return curve_panels(path, dict(sorted(panels.items(), key=lambda kv: int(kv[0].split()[2]))),
                        xlabel="key-value pairs", ylabel="recall (query positions)",
                        title=f"{head}Mamba2 → MetaMamba2 (identity), then {cfg['finetune_steps']} fine-tuning "
                              f"steps; {len(cfg['seeds'])} seed(s), mean ± std", logx=True)


def summary_table(result: Dict[str, Any]) -> str:
    """A markdown table: recall per arm and setting, mean ± std over seeds."""
    summary = result["summary"]
    first = next(iter(summary.values()))
    cols = [(part, key) for part, sets in first.items() for key in sets]
    lines = []
    if result["config"].get("smoke"):
        lines.append("**Smoke test: checks that the pipeline runs; not a result.**\n")
    lines += ["| arm | " + " | ".join(f"T={k.split(',')[0]}, {k.split(',')[1]} pairs ({'in' if p.startswith('in') else 'beyond'})"
                                    for p, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for arm, parts in summary.items():
        lines.append(f"| {arm} | " + " | ".join(f"{parts[p][k]['mean']:.3f} ± {parts[p][k]['std']:.3f}"
                                               for p, k in cols) + " |")
    lines.append(f"\nsource converged: {result['source_converged']} (final training loss ≤ "
                 f"{result['config']['converged_loss']:g}); converted = source at step 0: max |Δlogit| "
                 f"{result['identity_max_abs_diff']:.1e} in float64, "
                 f"{result['identity_max_abs_diff_float32']:.1e} in float32")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick",
                        help="quick (a smoke test, minutes on a CPU) or study (about a quarter of an hour on a CPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config field, VALUE as JSON (repeatable)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="convert_finetune_out", help="output folder (default: convert_finetune_out)")


def config_from_args(args: argparse.Namespace) -> ConvertFinetuneConfig:
    from .overrides import apply_overrides
    cfg = apply_overrides(CONFIGS[args.config], args.overrides)
    validate_config(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from .overrides import config_for_run
    cfg = config_for_run(args, config_from_args, args.device)
    try:
        result = run_convert_finetune(cfg, args.device)
    except RuntimeError as exc:  # the identity check failed: a failed check, exit 1
        import sys
        print(f"metaplastic convert-finetune: check failed: {exc}", file=sys.stderr)
        return 1
    from .plotting import save_run
    save_run(result, args.out, "convert_finetune", plot_convert_finetune, summary_table)
    return 0
