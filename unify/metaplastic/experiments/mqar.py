"""Multi-Query Associative Recall: train two-layer models of matched state to convergence, over seeds.

    metaplastic mqar --config quick|study|paper [--set KEY=VALUE ...] [--importance-groups G] [--out DIR]

Data: :mod:`metaplastic.experiments.mqar_data` (Zoology's layout, random filler by default). Three splits
per sequence length, generated the same way from disjoint random streams: *train* (drawn from the run's
seed), *validation* and *test* (fixed across seeds).

Model (:class:`MQARModel`): embedding, ``n_layers`` blocks ``h = h + mixer(RMSNorm(h))`` (mixer-only layers,
as in the paper's MQAR study), a final RMSNorm and a linear head.

**State accounting.** A model name alone (``meta_mamba2``) is sized by *matched floats*: the largest mixer
whose ``state_size()`` — every float of recurrent memory per sequence and layer, the precision ``I`` or
``H`` included, as the paper counts — fits ``state_budget``. ``NAME@width`` (``meta_mamba2@width``) is sized
by *matched key width*: the largest mixer whose memory matrix ``H·K·V`` fits the budget, so it has the
head dims and state size ``N`` of its point-posterior twin and carries its precision on top (≈ 2× floats).

**Initialisation rule** (``decay_init="usable"``, the same for every model): each head's decay at zero
pre-activation, ``α = exp(log_decay)``, is drawn with ``1 − α`` log-uniform in ``[1 − hi, 1 − lo]``
(``decay_range = (lo, hi)``, default (0.9, 0.999): memories of 10 to 1000 tokens). It is set through the
parameter the decay is computed from: ``dt_bias`` (given ``A_log``) for decays ``exp(−softplus(x + dt_bias)
· exp(A_log))`` (Mamba2, Gated DeltaNet, Palimpsa and their twins), the bias of ``a_proj`` for ``α =
σ(a_proj h)`` (MesaNet; PyTorch's default bias starts it near 0.5). Mixers without a decay (LongHorn) keep
their own initialisation. ``decay_init="native"`` keeps every mixer's own initialisation. The metaplastic
twins' gate starts at ``γ = gamma_init`` (1: the importance path is on; 0: the model starts as its twin).

**Training**: AdamW (weight decay 0.1 on matrices), linear warm-up then cosine decay, gradient clipping at
1, cross-entropy on the query positions only, ``epochs`` passes over the training mixture of a sequence
length's pair counts. The training loss is stored as a curve (``curve_points`` window means). A run is
**converged** when its final training loss — the mean over the last 10% of the steps — is at most
``converged_loss`` (nats per query; chance is ``ln(vocab_size / 2)``). Accuracy = exact match of the
arg-max token on the query positions.

**Learning rate**: chosen per model on the *validation* split: every lr of ``lrs`` is trained with the
first ``lr_select_seeds`` seeds; the lr with the highest mean validation accuracy (over those seeds and
every setting) is kept, the remaining seeds are trained at it, and the *test* accuracy of every seed at
that lr is reported (mean, sample standard deviation, min, max). Test accuracy is never computed for the
other learning rates. ``torch.manual_seed(seed)`` sets the initialisation and the seed draws the training
data and its order: a run is reproducible from its seed (same machine and torch build).
"""
from __future__ import annotations

import argparse
import inspect
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.importance import project_importance_
from ._threads import torch_threads
from .mqar_data import FILLERS, IGNORE, check_setting, mqar

DEFAULT_MODELS = ("mamba2", "meta_mamba2", "gated_deltanet", "meta_gated_deltanet", "longhorn", "mesanet",
                  "palimpsa")
ACCOUNTINGS = {"": "matched floats", "width": "matched key width"}
DECAY_INITS = ("usable", "native")


@dataclass(frozen=True)
class MQARConfig:
    """One experiment. ``settings``: (sequence length, number of pairs), trained on (mixed per sequence
    length) and tested. Every field can be set with ``--set KEY=VALUE`` (JSON)."""

    name: str
    vocab_size: int
    d_model: int
    settings: Tuple[Tuple[int, int], ...]
    state_budget: int  # floats of recurrent memory per sequence and layer (see the accountings)
    train_examples: int  # per setting
    val_examples: int  # per setting
    test_examples: int  # per setting
    epochs: int
    batch_size: int
    lrs: Tuple[float, ...]
    seeds: Tuple[int, ...]
    models: Tuple[str, ...] = DEFAULT_MODELS
    # (sequence length, pairs) tested only, beyond training (more pairs, longer gaps): each on the model
    # trained at the longest training length not above its own
    test_settings: Tuple[Tuple[int, int], ...] = ()
    lr_select_seeds: int = 1  # the first seeds train every lr; the lr is chosen on their validation accuracy
    converged_loss: float = 0.1  # final training loss (nats per query) at or below which a run is converged
    filler: str = "random"  # non-query positions: "random" (Zoology) or "zero"
    decay_init: str = "usable"  # "usable": α at initialisation in decay_range for every mixer; "native"
    decay_range: Tuple[float, float] = (0.9, 0.999)
    gamma_init: int = 1  # γ of the metaplastic twins at initialisation: 1 (path on) or 0 (starts as the twin)
    importance_groups: Optional[int] = None  # passed to the mixers with an importance path (when supported)
    n_layers: int = 2
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.1
    curve_points: int = 50  # points of the stored training-loss curve
    smoke: bool = False  # a smoke test: labelled as such in its outputs, not a result
    jobs: int = 1  # worker processes, one model each at a time (CPU: ``jobs × threads`` cores)
    threads: Optional[int] = 1  # torch threads on a CPU (tiny models are overhead-bound); None: torch's default


CONFIGS: Dict[str, MQARConfig] = {
    # A smoke test (about a minute on an idle 2-core CPU): checks that everything runs; too short to be a result.
    "quick": MQARConfig("quick", vocab_size=32, d_model=16, settings=((32, 2), (32, 4)), state_budget=128,
                        train_examples=256, val_examples=64, test_examples=128, epochs=2, batch_size=32,
                        lrs=(3e-3,), seeds=(0, 1),
                        models=("mamba2", "meta_mamba2", "gated_deltanet", "palimpsa", "mesanet"),
                        converged_loss=0.5, smoke=True),
    # Converged, 3 seeds, on a 2-core CPU (two worker processes of one thread): d_model 32, 256 floats of state
    # per layer, Zoology's random filler, trained on 2 to 8 pairs at T = 32 for 24 epochs (5400 steps of 16
    # sequences: at 12 epochs the metaplastic twins had not converged on every seed), lr chosen on validation
    # from {1e-2, 2e-2}; tested on the trained settings and beyond them: longer gaps (T = 64, 8 pairs) and
    # more pairs per state float (T = 64, 16 pairs).
    "study": MQARConfig("study", vocab_size=64, d_model=32, settings=((32, 2), (32, 4), (32, 8)),
                        test_settings=((64, 8), (64, 16)), state_budget=256, train_examples=1200,
                        val_examples=200, test_examples=500, epochs=24, batch_size=16, lrs=(1e-2, 2e-2),
                        seeds=(0, 1, 2),
                        models=("mamba2", "meta_mamba2", "meta_mamba2@width", "gated_deltanet", "palimpsa"),
                        converged_loss=0.25, jobs=2),
    # The paper's setting (REFERENCES.md), for a GPU: d_model 128, (512, 128) and (1024, 256), vocab 8192,
    # 100k train / 3k test, 60 epochs, lr 1e-3..1e-2, 8 seeds; both accountings for the metaplastic models.
    "paper": MQARConfig("paper", vocab_size=8192, d_model=128, settings=((512, 128), (1024, 256)),
                        state_budget=16384, train_examples=100_000, val_examples=3_000, test_examples=3_000,
                        epochs=60, batch_size=64, lrs=(1e-3, 3e-3, 1e-2), seeds=tuple(range(8)),
                        models=DEFAULT_MODELS + ("meta_mamba2@width", "meta_gated_deltanet@width",
                                                 "palimpsa@width"),
                        lr_select_seeds=2, converged_loss=0.1, threads=None),
}


# ----------------------------------------------------------------------------------------- models


def split_name(entry: str) -> Tuple[str, str]:
    """``"meta_mamba2@width"`` -> ``("meta_mamba2", "width")``; ``"mamba2"`` -> ``("mamba2", "")``."""
    name, _, accounting = entry.partition("@")
    return name, accounting


def importance_groups_supported() -> bool:
    """Whether the mixers of this installation take ``importance_groups``."""
    from metaplastic.models.mixers import MIXERS
    return "importance_groups" in inspect.signature(MIXERS["palimpsa"].__init__).parameters


def _candidate_kwargs(name: str, d_model: int) -> List[List[Dict[str, Any]]]:
    """Families of mixer kwargs, each in increasing state size (only the memory's size changes)."""
    if name in ("mamba2", "meta_mamba2"):
        return [[dict(head_dim=max(d_model // 4, 8), expand=2, state_size=n) for n in range(1, 257)]]
    if name in ("longhorn", "meta_longhorn"):
        return [[dict(expand=2, state_size=n) for n in range(1, 257)]]
    # heads of key size head_dim (values: head_dim · expand_v); 4 heads preferred, as the mixers' default
    return [[dict(num_heads=h, head_dim=d) for d in range(1, 257)] for h in (4, 2, 8, 1)]


def matrix_floats(mixer: nn.Module) -> int:
    """Floats of the memory matrix alone, ``H·K·V`` (the precision not counted)."""
    return int(mixer.num_heads * mixer.head_k_dim * mixer.head_v_dim)


def build_matched_mixer(entry: str, d_model: int, budget: int,
                        extra: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The mixer of ``entry`` (``NAME`` or ``NAME@width``) whose size (``state_size()`` or, for ``@width``,
    ``matrix_floats``) is the largest not above ``budget``; ``extra`` kwargs are passed to every candidate."""
    from metaplastic.models.mixers import MIXERS, build_mixer
    name, accounting = split_name(entry)
    if name not in MIXERS:
        raise ValueError(f"unknown model {name!r}; known mixers: {', '.join(MIXERS)}")
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"{entry!r}: unknown accounting @{accounting}; use NAME (matched floats) or NAME@width")
    size_of = matrix_floats if accounting == "width" else (lambda m: int(m.state_size()))
    best: Optional[Tuple[int, Dict[str, Any]]] = None
    for family in _candidate_kwargs(name, d_model):
        for kwargs in family:
            try:
                size = size_of(build_mixer(name, d_model, **kwargs, **(extra or {})))
            except ValueError:  # a shape this mixer refuses (e.g. heads not dividing)
                continue
            if size > budget:
                break
            if best is None or size > best[0]:
                best = (size, kwargs)
    if best is None:
        raise ValueError(f"no size of mixer {name!r} fits a state budget of {budget} floats at d_model={d_model}")
    return build_mixer(name, d_model, **best[1], **(extra or {})), best[1]


@torch.no_grad()
def usable_decay_(mixer: nn.Module, lo: float, hi: float) -> bool:
    """Set each head's decay at zero pre-activation so that ``1 − α`` is log-uniform in ``[1 − hi, 1 − lo]``
    (torch's global generator). Returns False when the mixer has no decay parameter it knows (left as is).

    ``dt_bias`` and ``A_log`` ``[H]``: ``α = exp(−softplus(dt_bias)·exp(A_log))``, so ``dt_bias =
    softplus⁻¹(−log α / exp(A_log))``. ``a_proj`` with a bias and no ``dt_bias``: ``α = σ(bias)``."""
    from metaplastic.models.common import inverse_softplus
    dt_bias, A_log = getattr(mixer, "dt_bias", None), getattr(mixer, "A_log", None)
    a_proj = getattr(mixer, "a_proj", None)
    if dt_bias is not None and A_log is not None:
        n = dt_bias.numel()
    elif dt_bias is None and isinstance(a_proj, nn.Linear) and a_proj.bias is not None:
        n = a_proj.bias.numel()
    else:
        return False
    one_minus = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(1 - hi), math.log(1 - lo)))
    alpha = 1 - one_minus
    if dt_bias is not None:
        delta = -torch.log(alpha) / A_log.detach().double().exp()
        dt_bias.copy_(inverse_softplus(delta).to(dt_bias.dtype))
    else:
        a_proj.bias.copy_(torch.log(alpha / one_minus).to(a_proj.bias.dtype))
    return True


class MQARModel(nn.Module):
    """Embedding, ``n_layers × (h + mixer(RMSNorm(h)))``, RMSNorm, linear head. ``ids [B, T] -> logits [B, T, vocab]``.

    ``mixer``: ``NAME`` or ``NAME@width`` (see the module docstring); ``decay_range``: None keeps the
    mixers' own initialisation, ``(lo, hi)`` applies :func:`usable_decay_`; ``gamma_init``: γ of the
    importance path's gate (1: :meth:`ImportancePath.reset_parameters` ``"paper"``, 0: ``"identity"``)."""

    def __init__(self, mixer: str, vocab_size: int, d_model: int, state_budget: int, n_layers: int = 2,
                 decay_range: Optional[Tuple[float, float]] = (0.9, 0.999), gamma_init: int = 1,
                 importance_groups: Optional[int] = None) -> None:
        super().__init__()
        name, _ = split_name(mixer)
        extra: Dict[str, Any] = {}
        if importance_groups is not None and _uses_importance(name):
            extra["importance_groups"] = importance_groups
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        built = [build_matched_mixer(mixer, d_model, state_budget, extra) for _ in range(n_layers)]
        self.mixers = nn.ModuleList(m for m, _ in built)
        self.mixer_kwargs = dict(built[0][1], **extra)
        for m in self.mixers:
            if decay_range is not None:
                usable_decay_(m, *decay_range)
            if getattr(m, "importance", None) is not None:
                m.importance.reset_parameters("paper" if gamma_init else "identity")
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def state_size(self) -> int:
        """Floats of recurrent memory per sequence, one layer (precision included)."""
        return int(self.mixers[0].state_size())

    def memory_shape(self) -> Tuple[int, int, int]:
        """``(H, K, V)`` of one layer's memory."""
        m = self.mixers[0]
        return int(m.num_heads), int(m.head_k_dim), int(m.head_v_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))


def _uses_importance(name: str) -> bool:
    from metaplastic.registry import registry
    return bool(registry[name].objective.uses_importance_rate)


def _posterior(name: str) -> str:
    from metaplastic.registry import registry
    return registry[name].objective.posterior


# --------------------------------------------------------------------------------------- validation


def validate_config(cfg: MQARConfig) -> None:
    """Raise ``ValueError`` naming the first bad field of ``cfg`` (before any training)."""
    from metaplastic.models.mixers import MIXERS
    positive = ("vocab_size", "d_model", "state_budget", "train_examples", "val_examples", "test_examples",
                "epochs", "batch_size", "n_layers", "curve_points", "lr_select_seeds")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")
    if not cfg.settings:
        raise ValueError("settings: at least one (sequence length, pairs) is needed")
    for seq_len, pairs in cfg.settings:
        try:
            check_setting(seq_len, pairs, cfg.vocab_size)
        except ValueError as exc:
            raise ValueError(f"settings: {exc}") from None
    train_lens = sorted({s for s, _ in cfg.settings})
    for seq_len, pairs in cfg.test_settings:
        try:
            check_setting(seq_len, pairs, cfg.vocab_size)
        except ValueError as exc:
            raise ValueError(f"test_settings: {exc}") from None
        if seq_len < train_lens[0]:
            raise ValueError(f"test_settings: ({seq_len}, {pairs}) is shorter than every training length "
                             f"({train_lens[0]} and up); it is tested on the model trained at the longest "
                             f"training length not above its own")
        if (seq_len, pairs) in set(map(tuple, cfg.settings)):
            raise ValueError(f"test_settings: ({seq_len}, {pairs}) is also a training setting")
    if not cfg.lrs or any(lr <= 0 or not math.isfinite(lr) for lr in cfg.lrs):
        raise ValueError(f"lrs: learning rates must be positive, got {list(cfg.lrs)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"seeds: need distinct seeds, got {list(cfg.seeds)}")
    if not cfg.models:
        raise ValueError("models: at least one model is needed")
    for entry in cfg.models:
        name, accounting = split_name(entry)
        if name not in MIXERS:
            raise ValueError(f"models: unknown model {name!r}; known: {', '.join(MIXERS)}")
        if accounting not in ACCOUNTINGS:
            raise ValueError(f"models: {entry!r} has an unknown accounting; use NAME or NAME@width")
        if accounting == "width" and _posterior(name) == "point":
            raise ValueError(f"models: {entry!r}: a point-posterior model has no precision, @width equals {name!r}")
    if not 0 < cfg.converged_loss:
        raise ValueError(f"converged_loss must be positive, got {cfg.converged_loss}")
    if cfg.filler not in FILLERS:
        raise ValueError(f"filler must be one of {', '.join(FILLERS)}, got {cfg.filler!r}")
    if cfg.decay_init not in DECAY_INITS:
        raise ValueError(f"decay_init must be one of {', '.join(DECAY_INITS)}, got {cfg.decay_init!r}")
    lo, hi = cfg.decay_range
    if not 0 < lo < hi < 1:
        raise ValueError(f"decay_range must satisfy 0 < lo < hi < 1, got {list(cfg.decay_range)}")
    if cfg.gamma_init not in (0, 1):
        raise ValueError(f"gamma_init must be 0 or 1, got {cfg.gamma_init}")
    if cfg.importance_groups is not None:
        if cfg.importance_groups < 1:
            raise ValueError(f"importance_groups must be positive, got {cfg.importance_groups}")
        if not importance_groups_supported():
            raise ValueError("importance_groups is not supported by this installation")
    if not 0 <= cfg.warmup < 1:
        raise ValueError(f"warmup must be in [0, 1), got {cfg.warmup}")
    if cfg.jobs < 1:
        raise ValueError(f"jobs must be positive, got {cfg.jobs}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads must be positive, got {cfg.threads}")


# --------------------------------------------------------------------------------------- training


def _split(cfg: MQARConfig, seq_len: int, pairs: int, n: int, stream: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(stream)
    return mqar(n, seq_len, pairs, cfg.vocab_size, gen, filler=cfg.filler)


def trained_at(cfg: MQARConfig, seq_len: int) -> int:
    """The training length whose model a setting of length ``seq_len`` is tested on: the longest one not
    above ``seq_len``."""
    return max(s for s, _ in cfg.settings if s <= seq_len)


def datasets(cfg: MQARConfig, seq_len: int, seed: int) -> Dict[str, Any]:
    """``train`` (the mixture of ``seq_len``'s pair counts, drawn from ``seed``), ``val`` and ``test`` (one
    split per pair count, fixed across seeds), and ``beyond``: the test splits of the ``test_settings``
    tested on this length's model, keyed ``(length, pairs)``. All come from disjoint generator streams."""
    pairs = [p for s, p in cfg.settings if s == seq_len]
    parts = [_split(cfg, seq_len, p, cfg.train_examples, 1_000_003 * seed + 7 * seq_len + p) for p in pairs]
    return {"train": (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])),
            "val": {p: _split(cfg, seq_len, p, cfg.val_examples, 10**12 + 7_919 * p + seq_len) for p in pairs},
            "test": {p: _split(cfg, seq_len, p, cfg.test_examples, 2 * 10**12 + 7_919 * p + seq_len) for p in pairs},
            "beyond": {(L, p): _split(cfg, L, p, cfg.test_examples, 3 * 10**12 + 7_919 * p + L)
                       for L, p in cfg.test_settings if trained_at(cfg, L) == seq_len}}


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device) -> float:
    """Exact-match accuracy of the arg-max prediction over the query positions (labels != -100); ``model``
    returns logits ``[B, T, vocab]`` or an output with ``.logits``."""
    model.eval()
    correct, total = 0, 0
    for i in range(0, len(inputs), batch_size):
        x, y = inputs[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        logits = model(x)
        pred = getattr(logits, "logits", logits).argmax(-1)
        mask = y != IGNORE
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / max(total, 1)


def loss_curve(losses: Sequence[float], points: int) -> List[float]:
    """Means of ``losses`` over ``min(points, len)`` consecutive windows of (nearly) equal length."""
    n = len(losses)
    points = max(1, min(points, n))
    edges = [round(i * n / points) for i in range(points + 1)]
    return [sum(losses[a:b]) / (b - a) for a, b in zip(edges[:-1], edges[1:])]


def final_loss(losses: Sequence[float]) -> float:
    """The mean training loss over the last 10% of the steps (at least one step)."""
    k = max(1, len(losses) // 10)
    return sum(losses[-k:]) / k


def is_converged(final: float, threshold: float) -> bool:
    """A run is converged when its final training loss is finite and at most ``threshold``."""
    return math.isfinite(final) and final <= threshold


def build_model(cfg: MQARConfig, entry: str) -> MQARModel:
    """The model of ``entry`` with ``cfg``'s sizes and initialisation rules (seed torch before calling)."""
    return MQARModel(entry, cfg.vocab_size, cfg.d_model, cfg.state_budget, cfg.n_layers,
                     decay_range=cfg.decay_range if cfg.decay_init == "usable" else None,
                     gamma_init=cfg.gamma_init, importance_groups=cfg.importance_groups)


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, steps: int, lr: float,
        batch_size: int, seed: int, device: torch.device, warmup: float = 0.1, weight_decay: float = 0.1,
        bar: Optional[tqdm] = None, label: str = "") -> List[float]:
    """Train the parameters of ``model`` that require grad for ``steps`` steps on ``(x_train, y_train)``
    (``[N, T]`` ids and aligned labels, -100 ignored): AdamW (``weight_decay`` on matrices), linear warm-up
    over a ``warmup`` fraction then cosine decay, clipping at 1, γ ≥ 0 after each step; batches from
    successive random permutations drawn from ``seed``. Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warm))
    order_gen = torch.Generator().manual_seed(seed + 17)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    losses: List[float] = []
    model.train()
    while len(losses) < steps:
        order = torch.randperm(len(x_train), generator=order_gen)
        for i in range(0, len(order), batch_size):
            if len(losses) == steps:
                break
            idx = order[i:i + batch_size]
            x, y = x_train[idx].to(device), y_train[idx].to(device)
            logits = model(x)
            logits = getattr(logits, "logits", logits)
            loss = loss_fn(logits.flatten(0, 1).float(), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            project_importance_(model)  # γ ≥ 0: the importance rate b stays non-negative
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix_str(f"{label} loss={losses[-1]:.3f}")
    return losses


def train_run(cfg: MQARConfig, entry: str, seq_len: int, lr: float, seed: int, device: torch.device,
              data: Optional[Dict[str, Any]] = None, bar: Optional[tqdm] = None) -> Dict[str, Any]:
    """Train one model on the mixture of ``seq_len``'s settings. Returns the trained ``model``, its
    validation accuracy per pair count, the loss curve, the final loss and the converged flag."""
    data = data if data is not None else datasets(cfg, seq_len, seed)
    x_train, y_train = data["train"]
    torch.manual_seed(seed)
    model = build_model(cfg, entry).to(device)
    total = math.ceil(len(x_train) / cfg.batch_size) * cfg.epochs
    started = time.perf_counter()
    losses = fit(model, x_train, y_train, steps=total, lr=lr, batch_size=cfg.batch_size, seed=seed, device=device,
                 warmup=cfg.warmup, weight_decay=cfg.weight_decay, bar=bar,
                 label=f"{entry} T={seq_len} lr={lr:g} seed={seed}")
    final = final_loss(losses)
    val = {p: evaluate(model, x, y, cfg.batch_size, device) for p, (x, y) in data["val"].items()}
    return {"model": model, "val": val, "loss_curve": [round(v, 4) for v in loss_curve(losses, cfg.curve_points)],
            "final_loss": round(final, 4), "converged": is_converged(final, cfg.converged_loss),
            "steps": total, "seconds": round(time.perf_counter() - started, 1)}


def spread(values: Sequence[float]) -> Dict[str, float]:
    """``mean``, ``std`` (sample; 0 for one value), ``min``, ``max`` of ``values``."""
    vals = list(values)
    return {"mean": round(statistics.fmean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "min": round(min(vals), 4), "max": round(max(vals), 4)}


def run_mqar(cfg: MQARConfig, device: Optional[str] = None, progress: bool = True) -> Dict[str, Any]:
    """Every model of ``cfg`` (lr selection on validation, then every seed); the dictionary of ``mqar.json``.

    ``results[entry]``: ``model``, ``accounting``, ``state_floats``, ``memory`` (H, K, V), ``mixer_kwargs``,
    ``parameters``, ``lr_selection`` (validation accuracy per lr), ``best_lr``, ``runs`` (per seed and
    sequence length at the best lr: test and validation accuracy, loss curve, final loss, converged),
    ``converged`` ("k/n") and ``settings`` (per setting: test accuracy per seed and its spread)."""
    validate_config(cfg)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        return _run(cfg, dev, progress)


def _run(cfg: MQARConfig, dev: torch.device, progress: bool) -> Dict[str, Any]:
    for entry in cfg.models:  # sizes first: a model that cannot be matched fails before any training
        build_model(cfg, entry)
    started = time.perf_counter()
    label = "smoke test " if cfg.smoke else ""
    if cfg.jobs > 1 and len(cfg.models) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        jobs = min(cfg.jobs, len(cfg.models))
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_model_in_process, cfg, entry, str(dev), progress, i % jobs)
                       for i, entry in enumerate(cfg.models)]
            results = {entry: f.result() for entry, f in zip(cfg.models, futures)}
    else:
        bar = tqdm(total=_steps_per_model(cfg) * len(cfg.models), desc=f"mqar {label}{cfg.name}",
                   disable=not progress, mininterval=5.0)
        results = {entry: run_model(cfg, entry, dev, bar) for entry in cfg.models}
        bar.close()
    return {"config": dict(asdict(cfg), seconds=round(time.perf_counter() - started, 1), device=str(dev),
                           torch=torch.__version__, chance_loss=round(math.log(cfg.vocab_size - cfg.vocab_size // 2), 4)),
            "results": results}


def _steps_per_model(cfg: MQARConfig) -> int:
    """Training steps of one model: every run of the lr selection and of the remaining seeds."""
    seq_lens = sorted({s for s, _ in cfg.settings})
    steps = sum(math.ceil(cfg.train_examples * sum(1 for s, _ in cfg.settings if s == L) / cfg.batch_size)
                * cfg.epochs for L in seq_lens)
    n_select = min(cfg.lr_select_seeds, len(cfg.seeds)) if len(cfg.lrs) > 1 else 0
    return steps * (n_select * len(cfg.lrs) + len(cfg.seeds) - n_select)


def _model_in_process(cfg: MQARConfig, entry: str, device: str, progress: bool, position: int) -> Dict[str, Any]:
    """:func:`run_model` in a worker process of ``--set jobs=N`` (its own progress bar and thread count)."""
    dev = torch.device(device)
    bar = tqdm(total=_steps_per_model(cfg), desc=f"mqar {cfg.name} {entry}", disable=not progress,
               mininterval=5.0, position=position)
    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        out = run_model(cfg, entry, dev, bar)
    bar.close()
    return out


def run_model(cfg: MQARConfig, entry: str, dev: torch.device, bar: Optional[tqdm] = None) -> Dict[str, Any]:
    """One model of ``cfg``: the lr selection on validation, every seed at the chosen lr, the test accuracies;
    the model's entry of ``results`` (see :func:`run_mqar`)."""
    seq_lens = sorted({s for s, _ in cfg.settings})
    n_select = min(cfg.lr_select_seeds, len(cfg.seeds)) if len(cfg.lrs) > 1 else 0
    cache: Dict[Tuple[float, int, int], Dict[str, Any]] = {}
    data = {(seed, L): None for seed in cfg.seeds for L in seq_lens}

    def one(lr: float, seed: int, L: int) -> Dict[str, Any]:
        if data[(seed, L)] is None:
            data[(seed, L)] = datasets(cfg, L, seed)
        cache[(lr, seed, L)] = train_run(cfg, entry, L, lr, seed, dev, data[(seed, L)], bar)
        return cache[(lr, seed, L)]

    selection: Dict[str, float] = {}
    if n_select:
        for lr in cfg.lrs:
            accs = [a for seed in cfg.seeds[:n_select] for L in seq_lens for a in one(lr, seed, L)["val"].values()]
            selection[str(lr)] = round(statistics.fmean(accs), 4)
        best = max(cfg.lrs, key=lambda lr: selection[str(lr)])
        for key in [k for k in cache if k[0] != best]:  # the other lrs are never tested
            del cache[key]
    else:
        best = cfg.lrs[0]
    runs = []
    for seed in cfg.seeds:
        for L in seq_lens:
            out = cache.pop((best, seed, L), None) or one(best, seed, L)
            test = {p: round(evaluate(out["model"], x, y, cfg.batch_size, dev), 4)
                    for p, (x, y) in data[(seed, L)]["test"].items()}
            beyond = {f"{Lb}x{p}": round(evaluate(out["model"], x, y, cfg.batch_size, dev), 4)
                      for (Lb, p), (x, y) in data[(seed, L)]["beyond"].items()}
            model = out.pop("model")
            val = out.pop("val")
            runs.append(dict(seed=seed, seq_len=L, lr=best, test=test, beyond=beyond,
                             val={p: round(a, 4) for p, a in val.items()}, **out))
            data[(seed, L)] = {k: data[(seed, L)][k] for k in ("test", "beyond")}
    name, accounting = split_name(entry)
    H, K, V = model.memory_shape()
    settings = []
    for L, p in cfg.settings:
        accs = [r["test"][p] for r in runs if r["seq_len"] == L]
        settings.append(dict(seq_len=L, pairs=p, trained=True, accuracy=accs, **spread(accs),
                             converged=[r["converged"] for r in runs if r["seq_len"] == L]))
    for L, p in cfg.test_settings:
        at = trained_at(cfg, L)
        accs = [r["beyond"][f"{L}x{p}"] for r in runs if r["seq_len"] == at]
        settings.append(dict(seq_len=L, pairs=p, trained=False, trained_at=at, accuracy=accs, **spread(accs),
                             converged=[r["converged"] for r in runs if r["seq_len"] == at]))
    return {"model": name, "accounting": ACCOUNTINGS[accounting], "state_floats": model.state_size(),
            "memory": {"H": H, "K": K, "V": V}, "mixer_kwargs": model.mixer_kwargs,
            "parameters": sum(p.numel() for p in model.parameters()),
            "lr_selection": selection, "best_lr": best,
            "converged": f"{sum(r['converged'] for r in runs)}/{len(runs)}",
            "settings": settings, "runs": runs}


# ------------------------------------------------------------------------------------ outputs


def _title(result: Dict[str, Any]) -> str:
    cfg = result["config"]
    seeds = len(cfg["seeds"])
    head = "SMOKE TEST, not a result — " if cfg.get("smoke") else ""
    return (f"{head}MQAR ({cfg['name']}): d_model {cfg['d_model']}, state ≤ {cfg['state_budget']} floats/layer, "
            f"{cfg['filler']} filler, {seeds} seed(s), mean ± std")


def plot_mqar(result: Dict[str, Any], path: Path) -> Path:
    """``mqar.png``: test accuracy (best lr on validation; mean ± std over seeds) against the number of
    pairs, one panel per sequence length, and the mean training-loss curves (last panel)."""
    from .plotting import curve_panels
    panels: Dict[str, Dict[str, tuple]] = {}
    for entry, r in result["results"].items():
        for s in r["settings"]:
            where = "" if s.get("trained", True) else f" (model of T = {s['trained_at']})"
            panel = f"test accuracy, T = {s['seq_len']}{where}"
            x, y, e = panels.setdefault(panel, {}).setdefault(entry, ([], [], []))
            x.append(s["pairs"])
            y.append(s["mean"])
            e.append(s["std"])
    losses: Dict[str, tuple] = {}
    for entry, r in result["results"].items():
        curves = [run["loss_curve"] for run in r["runs"]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        losses[entry] = ([(i + 0.5) / n for i in range(n)], mean)
    cfg = result["config"]
    return curve_panels(path, panels, xlabel="key-value pairs", ylabel="accuracy (query positions)",
                        title=_title(result), logx=True,
                        extra=("mean training loss, nats/query (dotted: converged below)", "fraction of training", losses,
                               cfg["converged_loss"]))


def recall_against_groups(results: Sequence[Dict[str, Any]], entry: str) -> List[Dict[str, Any]]:
    """One row per importance-group count G, from ``mqar.json`` results run with different
    ``--importance-groups`` (``importance_groups = None`` is the mixer's default, one rate per value row:
    G = V). Each row: ``groups``, ``state_floats``, ``memory``, ``best_lr``, ``converged`` and ``settings``
    (per setting: ``seq_len``, ``pairs``, ``trained``, ``mean``, ``std``), sorted by G."""
    rows = []
    for result in results:
        r = result["results"][entry]
        groups = result["config"].get("importance_groups") or r["memory"]["V"]
        rows.append({"groups": groups, "state_floats": r["state_floats"], "memory": r["memory"],
                     "best_lr": r["best_lr"], "converged": r["converged"],
                     "settings": [{k: s.get(k, True) for k in ("seq_len", "pairs", "trained", "mean", "std")}
                                  for s in r["settings"]]})
    return sorted(rows, key=lambda row: row["groups"])


def plot_recall_against_groups(rows: Sequence[Dict[str, Any]], entry: str, path: Path, title: str = "") -> Path:
    """Test accuracy (mean ± std over seeds) against the number of importance groups G, one curve per setting
    (rows from :func:`recall_against_groups`)."""
    from .plotting import curve_panels
    curves: Dict[str, tuple] = {}
    for row in rows:
        for s in row["settings"]:
            label = f"T={s['seq_len']}, {s['pairs']} pairs" + ("" if s["trained"] else " (beyond)")
            x, y, e = curves.setdefault(label, ([], [], []))
            x.append(row["groups"])
            y.append(s["mean"])
            e.append(s["std"])
    return curve_panels(path, {f"{entry}: test accuracy against G": curves}, xlabel="importance groups G per head",
                        ylabel="accuracy (query positions)", title=title or f"MQAR, {entry}, matched floats",
                        logx=True)


def summary_table(result: Dict[str, Any]) -> str:
    """A markdown table: per model, the accounting, memory, parameters, lr, converged runs, and the test
    accuracy per setting as mean ± std over seeds."""
    names = list(result["results"])
    settings = [(s["seq_len"], s["pairs"], s.get("trained", True)) for s in result["results"][names[0]]["settings"]]
    cfg = result["config"]
    lines = []
    if cfg.get("smoke"):
        lines.append("**Smoke test: checks that the pipeline runs; not a result.**\n")
    lines += ["| model | accounting | state floats/layer | H×K×V | params | lr (val) | converged | "
              + " | ".join(f"T={L}, {p} pairs" + ("" if trained else " †") for L, p, trained in settings) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(settings)]
    for name in names:
        r = result["results"][name]
        m = r["memory"]
        accs = " | ".join(f"{s['mean']:.3f} ± {s['std']:.3f}" for s in r["settings"])
        lines.append(f"| {name} | {r['accounting']} | {r['state_floats']} | {m['H']}×{m['K']}×{m['V']} | "
                     f"{r['parameters']} | {r['best_lr']:g} | {r['converged']} | {accs} |")
    lines.append(f"\n{len(cfg['seeds'])} seeds; converged = final training loss ≤ {cfg['converged_loss']:g} "
                 f"nats/query (chance {cfg['chance_loss']:g}); {cfg['filler']} filler."
                 + (" † tested only, beyond training (on the model trained at the longest training length not "
                    "above it)." if any(not t for _, _, t in settings) else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick",
                        help="quick (a smoke test, under a minute on a CPU), study (converged, 3 seeds, about "
                             "75 min on a 2-core CPU), paper (a GPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config field, VALUE as JSON (repeatable): --set epochs=6 "
                             "--set 'settings=[[64, 8], [64, 16]]' --set 'models=[\"mamba2\"]'")
    parser.add_argument("--importance-groups", type=int, metavar="G",
                        help="importance_groups of the mixers with an importance path (recorded in the outputs)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="models (NAME or NAME@width; default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the config's)")
    parser.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning rates (default: the config's)")
    parser.add_argument("--epochs", type=int, help="override the config's number of epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: the config's)")
    parser.add_argument("--jobs", type=int, help="worker processes, one model each (default: the config's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="mqar_out", help="output folder (default: mqar_out)")


def config_from_args(args: argparse.Namespace) -> MQARConfig:
    """The named config with ``--set`` and the flags applied, validated (``ValueError`` naming the key)."""
    from .overrides import apply_overrides
    if args.lrs and not all(lr > 0 and math.isfinite(lr) for lr in args.lrs):
        raise ValueError(f"--lrs must be positive and finite, got {args.lrs}")
    for flag, value in (("--epochs", args.epochs), ("--threads", args.threads), ("--jobs", args.jobs),
                        ("--importance-groups", args.importance_groups)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    cfg = apply_overrides(CONFIGS[args.config], args.overrides)
    flags = {"models": tuple(args.models) if args.models else None,
             "seeds": tuple(args.seeds) if args.seeds else None,
             "lrs": tuple(args.lrs) if args.lrs else None, "epochs": args.epochs, "threads": args.threads,
             "jobs": args.jobs,
             "importance_groups": args.importance_groups}
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    validate_config(cfg)
    return cfg


def run(args: argparse.Namespace) -> int:
    from metaplastic.errors import UserError
    from .overrides import config_for_run
    cfg = config_for_run(args, config_from_args, args.device)
    try:
        result = run_mqar(cfg, args.device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from .plotting import save_run
    save_run(result, args.out, "mqar", plot_mqar, summary_table)
    return 0
