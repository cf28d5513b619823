"""Multi-Query Associative Recall: train two-layer models of matched state size, report accuracy.

    metaplastic mqar --config quick|paper-small|paper [--models ...] [--seeds ...] [--lrs ...] [--out DIR]

Data: :mod:`metaplastic.experiments.mqar_data` (Zoology's layout). Model (:class:`MQARModel`): embedding,
two blocks ``h = h + mixer(RMSNorm(h))`` with mixers from ``metaplastic.models.build_mixer``, a final
RMSNorm and a linear head (mixer-only layers, as in the paper's MQAR study). Each model's mixer is
sized so that its ``state_size()`` (floats of recurrent memory per sequence and layer, precision
included for the metaplastic models) is the largest that fits the config's budget. Metaplastic mixers
start with their importance path on (``reset_parameters("paper")``: γ = 1), since they are trained from
scratch. Training: AdamW (weight decay 0.1), linear warm-up then cosine decay, gradient clipping at 1,
cross-entropy on the query positions only; accuracy = exact match of the arg-max token on the query
positions of a held-out test set, per number of pairs. Each (model, learning rate, seed) is one run;
the best learning rate per model is the one with the highest mean test accuracy over seeds and settings
(as Zoology reports it; there is no separate validation split). ``torch.manual_seed(seed)`` sets the
initialisation and a ``torch.Generator`` seeded from ``seed`` draws the training data and its order, so
a run is reproducible from its seed (on the same machine and torch build).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..models.importance import project_importance_
from tqdm.auto import tqdm

from ._threads import torch_threads
from .mqar_data import IGNORE, check_setting, mqar

DEFAULT_MODELS = ("mamba2", "meta_mamba2", "gated_deltanet", "meta_gated_deltanet", "longhorn", "mesanet",
                  "palimpsa")


@dataclass(frozen=True)
class MQARConfig:
    """One experiment. ``settings``: (sequence length, number of pairs) trained on (mixed) and tested;
    the models are trained once per sequence length on the mixture of its pair counts."""

    name: str
    vocab_size: int
    d_model: int
    settings: Tuple[Tuple[int, int], ...]
    state_budget: int  # floats of recurrent memory per sequence and layer
    train_examples: int  # per setting
    test_examples: int  # per setting
    epochs: int
    batch_size: int
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    models: Tuple[str, ...] = DEFAULT_MODELS
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.1
    threads: Optional[int] = 1  # torch threads on a CPU (tiny models are overhead-bound); None: torch's default


CONFIGS: Dict[str, MQARConfig] = {
    # Under 3 minutes on a 2-core CPU: tiny vocabulary and sequences, one seed, one learning rate (the best
    # of {3e-3, 1e-2} for every model we tried; pass --lrs to sweep).
    "quick": MQARConfig("quick", vocab_size=32, d_model=32, settings=((32, 2), (32, 4), (32, 8)),
                        state_budget=512, train_examples=2000, test_examples=200, epochs=2, batch_size=32,
                        lrs=(1e-2,), seeds=(0,)),
    # Under an hour on a CPU (estimated from per-step timings: ~25-30 min of CPU time): the recipe, reduced.
    "paper-small": MQARConfig("paper-small", vocab_size=128, d_model=64, settings=((64, 4), (64, 8), (64, 16)),
                              state_budget=2048, train_examples=4000, test_examples=500, epochs=2, batch_size=32,
                              lrs=(3e-3, 1e-2), seeds=(0,)),
    # The paper's setting (REFERENCES.md), for a GPU: d_model 128, (512, 128) and (1024, 256), vocab 8192,
    # 100k train / 3k test, 60 epochs, lr 1e-3..1e-2, 8 seeds.
    "paper": MQARConfig("paper", vocab_size=8192, d_model=128, settings=((512, 128), (1024, 256)),
                        state_budget=16384, train_examples=100_000, test_examples=3_000, epochs=60, batch_size=64,
                        lrs=(1e-3, 3e-3, 1e-2), seeds=tuple(range(8)), threads=None),
}


# ----------------------------------------------------------------------------------------- models


def _candidate_kwargs(name: str, d_model: int) -> List[List[Dict[str, Any]]]:
    """Families of mixer kwargs, each in increasing state size (only the memory's size changes)."""
    if name in ("mamba2", "meta_mamba2"):
        return [[dict(head_dim=max(d_model // 4, 8), expand=2, state_size=n) for n in range(1, 257)]]
    if name in ("longhorn", "meta_longhorn"):
        return [[dict(expand=2, state_size=n) for n in range(1, 257)]]
    # heads of key size head_dim (values: head_dim · expand_v); 4 heads preferred, as the mixers' default
    return [[dict(num_heads=h, head_dim=d) for d in range(1, 257)] for h in (4, 2, 8, 1)]


def build_matched_mixer(name: str, d_model: int, budget: int) -> Tuple[nn.Module, Dict[str, Any]]:
    """The mixer ``name`` whose ``state_size()`` is the largest not above ``budget``."""
    from metaplastic.models import MIXERS, build_mixer
    if name not in MIXERS:
        raise ValueError(f"unknown model {name!r}; known mixers: {', '.join(MIXERS)}")
    best: Optional[Tuple[int, Dict[str, Any]]] = None
    for family in _candidate_kwargs(name, d_model):
        for kwargs in family:
            try:
                size = build_mixer(name, d_model, **kwargs).state_size()
            except ValueError:  # a shape this mixer refuses (e.g. heads not dividing)
                continue
            if size > budget:
                break
            if best is None or size > best[0]:
                best = (size, kwargs)
    if best is None:
        raise ValueError(f"no size of mixer {name!r} fits a state budget of {budget} floats at d_model={d_model}")
    return build_mixer(name, d_model, **best[1]), best[1]


class MQARModel(nn.Module):
    """Embedding, ``n_layers × (h + mixer(RMSNorm(h)))``, RMSNorm, linear head. ``ids [B, T] -> logits [B, T, vocab]``."""

    def __init__(self, mixer: str, vocab_size: int, d_model: int, state_budget: int, n_layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        built = [build_matched_mixer(mixer, d_model, state_budget) for _ in range(n_layers)]
        self.mixers = nn.ModuleList(m for m, _ in built)
        self.mixer_kwargs = built[0][1]
        for m in self.mixers:  # trained from scratch: open the metaplastic path (γ = 1)
            if getattr(m, "importance", None) is not None:
                m.importance.reset_parameters("paper")
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def state_size(self) -> int:
        """Floats of recurrent memory per sequence, one layer."""
        return int(self.mixers[0].state_size())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))


# --------------------------------------------------------------------------------------- training


def _datasets(cfg: MQARConfig, seq_len: int, seed: int) -> Tuple[Tuple[torch.Tensor, torch.Tensor],
                                                                  Dict[int, Tuple[torch.Tensor, torch.Tensor]]]:
    """Training mixture for ``seq_len`` (from ``seed``) and one test set per pair count (fixed)."""
    pairs = [p for s, p in cfg.settings if s == seq_len]
    gen = torch.Generator().manual_seed(1_000_003 * seed + seq_len)
    parts = [mqar(cfg.train_examples, seq_len, p, cfg.vocab_size, gen) for p in pairs]
    train = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]))
    test = {p: mqar(cfg.test_examples, seq_len, p, cfg.vocab_size,
                    torch.Generator().manual_seed(7_919 * p + seq_len + 10**9)) for p in pairs}
    return train, test


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    """Exact-match accuracy of the arg-max prediction over the query positions (labels != -100)."""
    model.eval()
    correct, total = 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        pred = model(x).argmax(-1)
        mask = y != IGNORE
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / max(total, 1)


def train_run(cfg: MQARConfig, model_name: str, seq_len: int, lr: float, seed: int, device: torch.device,
              bar: Optional[tqdm] = None) -> Dict[str, Any]:
    """Train one model on the mixture of ``seq_len``'s settings; returns test accuracy per pair count."""
    (x_train, y_train), test = _datasets(cfg, seq_len, seed)
    torch.manual_seed(seed)
    model = MQARModel(model_name, cfg.vocab_size, cfg.d_model, cfg.state_budget).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(x_train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, total, warmup))
    order_gen = torch.Generator().manual_seed(seed + 17)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=order_gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            loss = loss_fn(model(x).flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            project_importance_(model)  # γ ≥ 0: the importance rate b stays non-negative
            sched.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix_str(f"{model_name} L={seq_len} lr={lr:g} seed={seed} loss={loss.item():.3f}")
    acc = {p: evaluate(model, x, y, cfg.batch_size, device) for p, (x, y) in test.items()}
    return {"accuracy": acc, "final_loss": loss.item(), "state_size": model.state_size(),
            "mixer_kwargs": model.mixer_kwargs, "parameters": sum(p.numel() for p in model.parameters())}


def run_mqar(cfg: MQARConfig, device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Every (model, learning rate, seed) of ``cfg``; returns the dictionary written to ``mqar.json``.

    ``results[model]``: ``best_lr``, ``state_size``, ``mixer_kwargs``, ``settings`` (for the best lr: a
    list of ``{seq_len, pairs, accuracy: [per seed], mean}``) and ``by_lr`` (the mean accuracy of every lr).
    """
    from metaplastic.models import build_mixer  # noqa: F401  (fail early, with the import error, if absent)
    for seq_len, pairs in cfg.settings:
        check_setting(seq_len, pairs, cfg.vocab_size)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        return _run(cfg, dev, progress)


def _run(cfg: MQARConfig, dev: torch.device, progress: bool) -> Dict[str, Any]:
    for name in cfg.models:  # sizes first: a model that cannot be matched fails before any training
        build_matched_mixer(name, cfg.d_model, cfg.state_budget)
    seq_lens = sorted({s for s, _ in cfg.settings})
    steps = sum(math.ceil(cfg.train_examples * sum(1 for s, _ in cfg.settings if s == L) / cfg.batch_size)
                for L in seq_lens) * cfg.epochs
    started = time.perf_counter()
    bar = tqdm(total=steps * len(cfg.models) * len(cfg.lrs) * len(cfg.seeds), desc=f"mqar {cfg.name}",
               disable=not progress)
    results: Dict[str, Any] = {}
    for name in cfg.models:
        runs: Dict[float, Dict[Tuple[int, int], List[float]]] = {}
        info: Dict[str, Any] = {}
        for lr in cfg.lrs:
            runs[lr] = {setting: [] for setting in cfg.settings}
            for seed in cfg.seeds:
                for L in seq_lens:
                    out = train_run(cfg, name, L, lr, seed, dev, bar)
                    info = {k: out[k] for k in ("state_size", "mixer_kwargs", "parameters")}
                    for p, a in out["accuracy"].items():
                        runs[lr][(L, p)].append(round(a, 4))
        mean = {lr: sum(sum(a) / len(a) for a in r.values()) / len(r) for lr, r in runs.items()}
        best = max(cfg.lrs, key=lambda lr: mean[lr])
        results[name] = dict(info, best_lr=best, by_lr={str(lr): round(m, 4) for lr, m in mean.items()},
                             settings=[{"seq_len": L, "pairs": p, "accuracy": acc,
                                        "mean": round(sum(acc) / len(acc), 4)}
                                       for (L, p), acc in runs[best].items()])
    bar.close()
    return {"config": dict(asdict(cfg), seconds=round(time.perf_counter() - started, 1), device=str(dev),
                           torch=torch.__version__),
            "results": results}


def plot_mqar(result: Dict[str, Any], path: Path) -> Path:
    """``mqar.png``: mean accuracy (best lr) against the number of pairs, one panel per sequence length."""
    from .plotting import curve_panels
    panels: Dict[str, Dict[str, Tuple[List[int], List[float]]]] = {}
    for name, r in result["results"].items():
        for s in r["settings"]:
            x, y = panels.setdefault(f"sequence length {s['seq_len']}", {}).setdefault(name, ([], []))
            x.append(s["pairs"])
            y.append(s["mean"])
    cfg = result["config"]
    return curve_panels(path, panels, xlabel="key-value pairs", ylabel="accuracy (query positions)",
                        title=f"MQAR ({cfg['name']}): d_model {cfg['d_model']}, state ≤ {cfg['state_budget']} "
                              f"floats/layer, {len(cfg['seeds'])} seed(s)", logx=True)


def summary_table(result: Dict[str, Any]) -> str:
    """A markdown table: mean accuracy per setting (best lr), the lr and the state size."""
    names = list(result["results"])
    settings = [(s["seq_len"], s["pairs"]) for s in result["results"][names[0]]["settings"]]
    lines = ["| model | state floats/layer | best lr | " + " | ".join(f"L={L}, {p} pairs" for L, p in settings) + " |",
             "|---|---|---|" + "---|" * len(settings)]
    for name in names:
        r = result["results"][name]
        accs = " | ".join(f"{s['mean']:.3f}" for s in r["settings"])
        lines.append(f"| {name} | {r['state_size']} | {r['best_lr']:g} | {accs} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick",
                        help="quick (minutes on a CPU), paper-small (under an hour on a CPU), paper (a GPU)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="mixers (default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the config's)")
    parser.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning rates (default: the config's)")
    parser.add_argument("--epochs", type=int, help="override the config's number of epochs")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="mqar_out", help="output folder (default: mqar_out)")


def config_from_args(args: argparse.Namespace) -> MQARConfig:
    """The named config with the command line's overrides."""
    cfg = CONFIGS[args.config]
    overrides: Dict[str, Any] = {}
    if args.models:
        overrides["models"] = tuple(args.models)
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.lrs:
        if not all(lr > 0 and math.isfinite(lr) for lr in args.lrs):
            raise ValueError(f"--lrs must be positive and finite, got {args.lrs}")
        overrides["lrs"] = tuple(args.lrs)
    if args.epochs is not None:
        if args.epochs < 1:
            raise ValueError(f"--epochs must be positive, got {args.epochs}")
        overrides["epochs"] = args.epochs
    return replace(cfg, **overrides)


def run(args: argparse.Namespace) -> int:
    from metaplastic.errors import UserError
    from ..safe_io import check_output_location
    check_output_location(args.out, what="--out", kind="dir")
    try:
        cfg = config_from_args(args)
        from metaplastic.models import build_mixer  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the mixers of metaplastic.models are not available: {exc}") from None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} was asked for but torch sees no CUDA device")
    try:
        result = run_mqar(cfg, args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from .plotting import save_run
    save_run(result, args.out, "mqar", plot_mqar, summary_table)
    return 0
