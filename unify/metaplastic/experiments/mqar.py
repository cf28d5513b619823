"""Multi-Query Associative Recall: train two-layer models of matched state to convergence, over seeds.

    metaplastic mqar --config quick|study|decide|paper [--set KEY=VALUE ...] [--importance-groups G] [--out DIR]

Data: :mod:`metaplastic.experiments.mqar_data` (Zoology's layout, random filler by default). Three splits
per sequence length and filler, generated the same way from disjoint random streams: *train* (drawn from
the run's seed), *validation* and *test* (fixed across seeds).

Model (:class:`MQARModel`): embedding, ``n_layers`` blocks ``h = h + mixer(RMSNorm(h))`` (mixer-only layers,
as in the paper's MQAR study), a final norm and a head; the recipe (:mod:`.mqar_recipe`) sets the rest.

**State accountings** (a model entry is ``NAME``, ``NAME@floats``, ``NAME@shape`` or ``not_NAME[@...]``):

- ``NAME@floats`` (*matched floats*; ``NAME`` alone means this): the largest mixer whose ``state_size()`` —
  every float of recurrent memory per sequence and layer, the precision ``I`` (or MesaNet's ``K×K``)
  included — fits ``state_budget``;
- ``NAME@shape`` (*matched shape*, the Palimpsa authors' accounting; ``@width`` is another name for it): the
  largest mixer whose memory matrix ``H·K·V`` fits the budget, i.e. the heads × key dim × value dim that its
  ``b ≡ 0`` baseline gets at matched floats, with the precision on top (≈ 2× floats);
- ``not_NAME@A`` (a metaplastic ``NAME``): the same layer as ``NAME@A``, with the same shape, and ``b ≡ 0``:
  its importance gate ``γ`` (``importance_gate=True`` where the mixer makes the gate optional) is held at 0
  and the importance path is frozen, so the precision stays at its prior and the layer is its point-posterior
  limit (for Palimpsa: simple GLA with an input gate, the authors' NotPalimpsa). Its state is ``H·K·V``
  floats, so ``not_NAME`` alone is ``not_NAME@shape``.

Point-posterior models have one accounting (``H·K·V`` floats). ``mixer_kwargs`` (``--set
'mixer_kwargs={"palimpsa": {"expand_v": 2}}'``, merged over the config's) passes options to the mixers; the
keys of an entry, most specific last: ``NAME``, ``NAME@A``, then for ``not_NAME@A`` also ``not_NAME`` and
``not_NAME@A``. Options that fix a size (``num_heads``, ``head_dim``, ``state_size``...) override the search.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.importance import project_importance_
from metaplastic.kernels.threads import torch_threads
from .mqar_data import FILLERS, IGNORE, LAYOUTS, check_setting, mqar
from .mqar_entries import _posterior, _uses_importance, parse_entry, split_name
from .mqar_recipe import AUTHORS_FIELDS, RECIPES, authors_init_, lr_factor, optimizer, small_decay_

DEFAULT_MODELS = ("mamba2", "meta_mamba2", "gated_deltanet", "meta_gated_deltanet", "longhorn", "mesanet",
                  "palimpsa")
# the accounting of an entry, as tables and mqar.json name it (a point posterior's floats are its shape)
ACCOUNTINGS = {"floats": "matched floats", "shape": "matched shape", "": "floats = shape"}
DECAY_INITS = ("usable", "native", "small")


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
    # non-query positions: "random" (Zoology) or "zero"; a list of fillers trains and tests each separately
    filler: Union[str, Tuple[str, ...]] = "random"
    layout: str = "zoology"  # "zoology": every key queried once; "dense": every even slot after the context
    # "usable": α at initialisation in decay_range for every mixer; "native": the mixers' own; "small": the
    # authors' (α ≈ 0.998–0.9998)
    decay_init: str = "usable"
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
    recipe: str = "default"  # "default" or "authors" (skeleton, init, bf16, optimiser, schedule: .mqar_recipe)
    early_stop: Optional[float] = None  # stop a run after the epoch where every validation accuracy exceeds it
    # options per model entry (see the module docstring), merged over the config's by --set
    mixer_kwargs: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # (a, b) model pairs compared per seed at every setting; None: every metaplastic model against every
    # baseline of the run (point posteriors and b ≡ 0 controls)
    comparisons: Optional[Tuple[Tuple[str, str], ...]] = None


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
                        models=("mamba2", "meta_mamba2", "meta_mamba2@shape", "gated_deltanet", "palimpsa"),
                        converged_loss=0.25, jobs=2),
    # Settles the paper's MQAR claim at CPU size (docs/experiments.md, "The decide config"): Palimpsa, its b ≡ 0
    # control and Gated DeltaNet at one shape (1 head × 8 × 16, the authors' accounting), Palimpsa at matched
    # floats keeping the value width (1 × 4 × 16 plus its precision), Mamba2 and MetaMamba2 in the authors'
    # form (n_groups = heads, the same N: 2 × 4 × 16). Every model has H·K = 8, so training at 8 pairs is the
    # authors' density P/(H·K) = 1; beyond training: longer gaps at the same density (T = 64, 8 pairs) and
    # twice it (T = 64, 16 pairs). Both fillers, zero first; 3 seeds; paired verdicts for the named pairs.
    # Sized from measured steps (docs/experiments.md): about 80 min with two worker processes.
    "decide": MQARConfig("decide", vocab_size=64, d_model=32, settings=((32, 4), (32, 8)),
                         test_settings=((64, 8), (64, 16)), state_budget=128, train_examples=1000,
                         val_examples=200, test_examples=500, epochs=24, batch_size=16, lrs=(1e-2,),
                         seeds=(0, 1, 2), filler=("zero", "random"),
                         models=("gated_deltanet", "mamba2", "palimpsa@floats", "meta_mamba2@shape",
                                 "palimpsa@shape", "not_palimpsa"),
                         mixer_kwargs={"palimpsa": {"num_heads": 1, "expand_v": 2},
                                       "palimpsa@floats": {"expand_v": 4},
                                       "gated_deltanet": {"num_heads": 1},
                                       "mamba2": {"head_dim": 16, "expand": 1, "n_groups": 2},
                                       "meta_mamba2": {"head_dim": 16, "expand": 1, "n_groups": 2}},
                         comparisons=(("palimpsa@shape", "not_palimpsa"), ("palimpsa@shape", "gated_deltanet"),
                                      ("palimpsa@floats", "not_palimpsa"), ("palimpsa@floats", "gated_deltanet"),
                                      ("meta_mamba2@shape", "mamba2")),
                         converged_loss=0.25, jobs=2),
    # The Palimpsa authors' setting (docs/references.md#mqar-as-the-palimpsa-authors-ran-it), for a GPU:
    # d_model 128, 2 layers, (512, 128) and (1024, 256), vocab 8192, 100k / 3k / 3k, their recipe (bf16, tied
    # head, per-epoch cosine, ≤ 60 epochs with early stopping on validation), zero filler then random; the five
    # models at 8 heads × 16 × 32 (n_groups 8) plus the matched-floats arms and their b ≡ 0 controls; lr chosen
    # on validation from five values; 5 seeds.
    "paper": MQARConfig("paper", vocab_size=8192, d_model=128, settings=((512, 128), (1024, 256)),
                        state_budget=8 * 16 * 32, train_examples=100_000, val_examples=3_000, test_examples=3_000,
                        epochs=60, batch_size=64, lrs=(1e-3, 2.2e-3, 4.6e-3, 1e-2, 2e-2), seeds=tuple(range(5)),
                        filler=("zero", "random"), recipe="authors", **{k: v for k, v in AUTHORS_FIELDS.items()
                                                                        if k != "filler"},
                        models=("mamba2", "meta_mamba2@shape", "gated_deltanet", "palimpsa@shape", "not_palimpsa",
                                "meta_mamba2@floats", "not_meta_mamba2@floats", "palimpsa@floats",
                                "not_palimpsa@floats"),
                        mixer_kwargs={"mamba2": {"n_groups": 8, "use_bias": True, "use_conv_bias": False},
                                      "meta_mamba2": {"n_groups": 8, "use_bias": True, "use_conv_bias": False},
                                      "gated_deltanet": {"num_heads": 8},
                                      "palimpsa": {"num_heads": 8, "expand_v": 2},
                                      "palimpsa@floats": {"expand_v": 4}},
                        comparisons=(("palimpsa@shape", "not_palimpsa"), ("palimpsa@shape", "gated_deltanet"),
                                     ("meta_mamba2@shape", "mamba2"), ("palimpsa@floats", "not_palimpsa@floats"),
                                     ("palimpsa@floats", "not_palimpsa"), ("palimpsa@floats", "gated_deltanet"),
                                     ("meta_mamba2@floats", "not_meta_mamba2@floats"),
                                     ("meta_mamba2@floats", "mamba2")),
                        lr_select_seeds=2, converged_loss=0.1, threads=None),
}


# ----------------------------------------------------------------------------------------- models


def entry_kwargs(mixer_kwargs: Dict[str, Dict[str, Any]], entry: str) -> Dict[str, Any]:
    """The mixer options of ``entry`` from a config's ``mixer_kwargs``, merged from the least specific key to
    the most: ``NAME``, ``NAME@A``, and for ``not_NAME@A`` also ``not_NAME``, ``not_NAME@A``."""
    e = parse_entry(entry)
    keys = [e.mixer] + ([f"{e.mixer}@{e.accounting}"] if e.accounting else [])
    if e.b_zero:
        keys += [f"not_{e.mixer}", f"not_{e.mixer}@{e.accounting}"]
    out: Dict[str, Any] = {}
    for key in keys:
        out.update(mixer_kwargs.get(key) or {})
    return out


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


def entry_state_floats(entry: str, mixer: nn.Module) -> int:
    """Floats of recurrent state per sequence and layer that carry information: ``state_size()``, except for a
    ``b ≡ 0`` control, whose precision stays at its prior (``H·K·V``)."""
    return matrix_floats(mixer) if parse_entry(entry).b_zero else int(mixer.state_size())


def build_matched_mixer(entry: str, d_model: int, budget: int,
                        extra: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The mixer of ``entry`` (see the module docstring) whose size under its accounting (``state_size()`` for
    ``@floats``, ``matrix_floats`` for ``@shape`` and point posteriors) is the largest not above ``budget``;
    ``extra`` kwargs override every candidate's. A ``not_`` control is built as its metaplastic model (with
    ``importance_gate=True`` where the mixer takes it); the caller holds its γ at 0."""
    from metaplastic.models.mixers import MIXERS, build_mixer
    e = parse_entry(entry)
    extra = dict(extra or {})
    if e.b_zero and "importance_gate" in inspect.signature(MIXERS[e.mixer].__init__).parameters:
        extra["importance_gate"] = True
    size_of = (lambda m: int(m.state_size())) if e.accounting == "floats" else matrix_floats
    best: Optional[Tuple[int, Dict[str, Any]]] = None
    seen = set()
    for family in _candidate_kwargs(e.mixer, d_model):
        for candidate in family:
            kwargs = {**candidate, **extra}
            key = repr(sorted(kwargs.items()))
            if key in seen:
                continue
            seen.add(key)
            try:
                size = size_of(build_mixer(e.mixer, d_model, **kwargs))
            except ValueError:  # a shape this mixer refuses (e.g. heads not dividing)
                continue
            except TypeError as exc:  # an option the mixer does not take
                raise ValueError(f"mixer_kwargs of {entry!r}: {exc}") from None
            if size > budget:
                break
            if best is None or size > best[0]:
                best = (size, kwargs)
    if best is None:
        raise ValueError(f"no size of mixer {entry!r} fits a state budget of {budget} floats at d_model={d_model}"
                         + (f" with mixer_kwargs {extra}" if extra else ""))
    mixer = build_mixer(e.mixer, d_model, **best[1])
    if e.b_zero and getattr(mixer.importance, "gamma", None) is None:
        raise ValueError(f"{entry!r}: the mixer {e.mixer!r} has no importance gate γ to hold b at 0")
    return mixer, best[1]


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
    """Embedding, ``n_layers × (h + mixer(RMSNorm(h)))``, a final norm, a head. ``ids [B, T] -> logits [B, T, vocab]``.

    ``mixer``: a model entry (see the module docstring); ``decay_range``: None keeps the mixers' own
    initialisation, ``(lo, hi)`` applies :func:`usable_decay_`, unless ``decay_init="small"`` (the authors'
    decay, :func:`.mqar_recipe.small_decay_`); ``gamma_init``: γ of the importance path's gate (1:
    :meth:`ImportancePath.reset_parameters` ``"paper"``, 0: ``"identity"``); held at 0 for a ``not_`` control.
    ``mixer_kwargs``: options for every layer's mixer. ``recipe="authors"``: final LayerNorm, head tied to the
    embedding, :func:`.mqar_recipe.authors_init_` (the caller casts to bfloat16); ``"default"``: final RMSNorm,
    an untied head, PyTorch's initialisation."""

    def __init__(self, mixer: str, vocab_size: int, d_model: int, state_budget: int, n_layers: int = 2,
                 decay_range: Optional[Tuple[float, float]] = (0.9, 0.999), gamma_init: int = 1,
                 importance_groups: Optional[int] = None, mixer_kwargs: Optional[Dict[str, Any]] = None,
                 recipe: str = "default", decay_init: str = "usable") -> None:
        super().__init__()
        self.entry = parse_entry(mixer)
        extra: Dict[str, Any] = dict(mixer_kwargs or {})
        if importance_groups is not None and _uses_importance(self.entry.mixer):
            extra["importance_groups"] = importance_groups
        self.embed = nn.Embedding(vocab_size, d_model)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        built = [build_matched_mixer(mixer, d_model, state_budget, extra) for _ in range(n_layers)]
        self.mixers = nn.ModuleList(m for m, _ in built)
        self.mixer_kwargs = dict(built[0][1])
        self.norm_f = nn.LayerNorm(d_model, eps=1e-5) if recipe == "authors" else nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if recipe == "authors":
            self.head.weight = self.embed.weight
            authors_init_(self, d_model)
        for m in self.mixers:
            if decay_init == "small":
                small_decay_(m)
            elif decay_range is not None:
                usable_decay_(m, *decay_range)
            if getattr(m, "importance", None) is not None:
                if recipe == "authors":
                    if m.importance.gamma is not None:
                        with torch.no_grad():
                            m.importance.gamma.fill_(float(gamma_init))
                else:
                    m.importance.reset_parameters("paper" if gamma_init else "identity")
                if self.entry.b_zero:  # b ≡ 0: γ held at 0, the path frozen
                    with torch.no_grad():
                        m.importance.gamma.zero_()
                    m.importance.requires_grad_(False)

    def state_size(self) -> int:
        """Floats of recurrent memory per sequence, one layer (precision included; ``H·K·V`` for a ``b ≡ 0``
        control, whose precision stays at its prior)."""
        return entry_state_floats(self.entry.text, self.mixers[0])

    def memory_shape(self) -> Tuple[int, int, int]:
        """``(H, K, V)`` of one layer's memory."""
        m = self.mixers[0]
        return int(m.num_heads), int(m.head_k_dim), int(m.head_v_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        return self.head(self.norm_f(h))


# --------------------------------------------------------------------------------------- validation


def validate_config(cfg: MQARConfig) -> None:
    """Raise ``ValueError`` naming the first bad field of ``cfg`` (before any training), the sizes of its
    models included (:func:`check_sizes`)."""
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
    if len(set(cfg.models)) != len(cfg.models):
        raise ValueError(f"models: an entry is named twice in {list(cfg.models)}")
    for entry in cfg.models:
        try:
            parse_entry(entry)
        except ValueError as exc:
            raise ValueError(f"models: {exc}") from None
    for key, options in cfg.mixer_kwargs.items():
        try:
            parse_entry(key)
        except ValueError as exc:
            raise ValueError(f"mixer_kwargs: {exc}") from None
        if not isinstance(options, dict):
            raise ValueError(f"mixer_kwargs: the options of {key!r} must be a JSON object, got {options!r}")
    for pair in cfg.comparisons or ():
        a, b = pair
        for entry in pair:
            if entry not in cfg.models:
                raise ValueError(f"comparisons: {entry!r} is not among the models {list(cfg.models)}")
        if a == b:
            raise ValueError(f"comparisons: ({a!r}, {b!r}) compares a model with itself")
    if not 0 < cfg.converged_loss:
        raise ValueError(f"converged_loss must be positive, got {cfg.converged_loss}")
    fillers = fillers_of(cfg)
    if not fillers or len(set(fillers)) != len(fillers) or any(f not in FILLERS for f in fillers):
        raise ValueError(f"filler must be one of {', '.join(FILLERS)} or a list of distinct ones, got {cfg.filler!r}")
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {cfg.layout!r}")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    if cfg.recipe == "authors" and cfg.warmup:
        raise ValueError(f"warmup: the authors' recipe has no warm-up, got {cfg.warmup}")
    if cfg.early_stop is not None and not 0 < cfg.early_stop <= 1:
        raise ValueError(f"early_stop must be in (0, 1] (a validation accuracy) or null, got {cfg.early_stop}")
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
    check_sizes(cfg)


# --------------------------------------------------------------------------------------- training


def fillers_of(cfg: MQARConfig) -> Tuple[str, ...]:
    """The fillers a config trains and tests with, in order (``filler`` is one name or a list)."""
    return (cfg.filler,) if isinstance(cfg.filler, str) else tuple(cfg.filler)


def check_sizes(cfg: MQARConfig) -> None:
    """Size one layer of every model of ``cfg`` (``ValueError`` naming the entry when none fits the budget or
    its ``mixer_kwargs`` are refused), before any training."""
    extra = {"importance_groups": cfg.importance_groups} if cfg.importance_groups is not None else {}
    for entry in cfg.models:
        kwargs = dict(entry_kwargs(cfg.mixer_kwargs, entry))
        if extra and _uses_importance(parse_entry(entry).mixer):
            kwargs.update(extra)
        build_matched_mixer(entry, cfg.d_model, cfg.state_budget, kwargs)


def _split(cfg: MQARConfig, seq_len: int, pairs: int, n: int, stream: int,
           filler: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(stream)
    return mqar(n, seq_len, pairs, cfg.vocab_size, gen, filler=filler or fillers_of(cfg)[0], layout=cfg.layout)


def trained_at(cfg: MQARConfig, seq_len: int) -> int:
    """The training length whose model a setting of length ``seq_len`` is tested on: the longest one not
    above ``seq_len``."""
    return max(s for s, _ in cfg.settings if s <= seq_len)


def datasets(cfg: MQARConfig, seq_len: int, seed: int, filler: Optional[str] = None) -> Dict[str, Any]:
    """``train`` (the mixture of ``seq_len``'s pair counts, drawn from ``seed``), ``val`` and ``test`` (one
    split per pair count, fixed across seeds), and ``beyond``: the test splits of the ``test_settings``
    tested on this length's model, keyed ``(length, pairs)``. All come from disjoint generator streams;
    ``filler`` (default: the config's first) changes only the non-query tokens, so the fillers of a config
    share keys, values and query slots."""
    pairs = [p for s, p in cfg.settings if s == seq_len]
    parts = [_split(cfg, seq_len, p, cfg.train_examples, 1_000_003 * seed + 7 * seq_len + p, filler) for p in pairs]
    return {"train": (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])),
            "val": {p: _split(cfg, seq_len, p, cfg.val_examples, 10**12 + 7_919 * p + seq_len, filler) for p in pairs},
            "test": {p: _split(cfg, seq_len, p, cfg.test_examples, 2 * 10**12 + 7_919 * p + seq_len, filler)
                     for p in pairs},
            "beyond": {(L, p): _split(cfg, L, p, cfg.test_examples, 3 * 10**12 + 7_919 * p + L, filler)
                       for L, p in cfg.test_settings if trained_at(cfg, L) == seq_len}}


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
    """The model of ``entry`` with ``cfg``'s sizes, options, recipe and initialisation rules (seed torch
    before calling); bfloat16 parameters under the authors' recipe."""
    model = MQARModel(entry, cfg.vocab_size, cfg.d_model, cfg.state_budget, cfg.n_layers,
                      decay_range=cfg.decay_range if cfg.decay_init == "usable" else None,
                      gamma_init=cfg.gamma_init, importance_groups=cfg.importance_groups,
                      mixer_kwargs=entry_kwargs(cfg.mixer_kwargs, entry), recipe=cfg.recipe,
                      decay_init=cfg.decay_init)
    return model.to(torch.bfloat16) if cfg.recipe == "authors" else model


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, *, steps: int, lr: float,
        batch_size: int, seed: int, device: torch.device, warmup: float = 0.1, weight_decay: float = 0.1,
        bar: Optional[tqdm] = None, label: str = "", recipe: str = "default",
        on_epoch: Optional[Callable[[int], bool]] = None) -> List[float]:
    """Train the parameters of ``model`` that require grad for up to ``steps`` steps on ``(x_train, y_train)``
    (``[N, T]`` ids and aligned labels, -100 ignored), γ ≥ 0 after each step; batches from successive random
    permutations (epochs) drawn from ``seed``. ``recipe="default"``: AdamW (``weight_decay`` on matrices),
    linear warm-up over a ``warmup`` fraction then cosine decay, clipping at 1; ``"authors"``: AdamW (0.9,
    0.999) with ``weight_decay`` on every parameter, cosine stepped per epoch, no warm-up, no clipping
    (:mod:`.mqar_recipe`). ``on_epoch(epoch)`` is called after each full epoch; True stops the training.
    Returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, recipe, lr, weight_decay)
    warm = max(1, int(warmup * steps))
    per_epoch = math.ceil(len(x_train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(recipe, s, steps, warm, per_epoch))
    order_gen = torch.Generator().manual_seed(seed + 17)
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    losses: List[float] = []
    model.train()
    epoch = 0
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
            if recipe != "authors":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            project_importance_(model)  # γ ≥ 0: the importance rate b stays non-negative
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                if len(losses) % 10 == 0:
                    bar.set_postfix_str(f"{label} loss={losses[-1]:.3f}")
        else:
            epoch += 1
            if on_epoch is not None and len(losses) < steps and on_epoch(epoch):
                break
    return losses


def train_run(cfg: MQARConfig, entry: str, seq_len: int, lr: float, seed: int, device: torch.device,
              data: Optional[Dict[str, Any]] = None, bar: Optional[tqdm] = None) -> Dict[str, Any]:
    """Train one model on the mixture of ``seq_len``'s settings (the data of ``datasets``; default: the first
    filler's). Returns the trained ``model``, its validation accuracy per pair count, the loss curve, the final
    loss, the converged flag, the steps run and the epoch it stopped at (``early_stop``)."""
    data = data if data is not None else datasets(cfg, seq_len, seed)
    x_train, y_train = data["train"]
    torch.manual_seed(seed)
    model = build_model(cfg, entry).to(device)
    total = math.ceil(len(x_train) / cfg.batch_size) * cfg.epochs
    stopped: List[int] = []

    def on_epoch(epoch: int) -> bool:  # early stopping on validation accuracy, never on test
        if cfg.early_stop is None:
            return False
        if all(evaluate(model, x, y, cfg.batch_size, device) > cfg.early_stop for x, y in data["val"].values()):
            stopped.append(epoch)
            return True
        return False

    started = time.perf_counter()
    losses = fit(model, x_train, y_train, steps=total, lr=lr, batch_size=cfg.batch_size, seed=seed, device=device,
                 warmup=cfg.warmup, weight_decay=cfg.weight_decay, bar=bar, recipe=cfg.recipe, on_epoch=on_epoch,
                 label=f"{entry} T={seq_len} lr={lr:g} seed={seed}")
    if bar is not None and len(losses) < total:
        bar.update(total - len(losses))
    final = final_loss(losses)
    val = {p: evaluate(model, x, y, cfg.batch_size, device) for p, (x, y) in data["val"].items()}
    out = {"model": model, "val": val, "loss_curve": [round(v, 4) for v in loss_curve(losses, cfg.curve_points)],
           "final_loss": round(final, 4), "converged": is_converged(final, cfg.converged_loss),
           "steps": len(losses), "seconds": round(time.perf_counter() - started, 1)}
    if cfg.early_stop is not None:
        out["stopped_at_epoch"] = stopped[0] if stopped else None
    return out


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
    from .mqar_compare import comparisons
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
    out = {"config": dict(asdict(cfg), seconds=round(time.perf_counter() - started, 1), device=str(dev),
                          torch=torch.__version__, chance_loss=round(math.log(cfg.vocab_size - cfg.vocab_size // 2), 4)),
           "results": results}
    out["comparisons"] = comparisons(out)
    return out


def _steps_per_model(cfg: MQARConfig) -> int:
    """Training steps of one model: every run of the lr selection and of the remaining seeds."""
    seq_lens = sorted({s for s, _ in cfg.settings})
    steps = len(fillers_of(cfg)) * sum(
        math.ceil(cfg.train_examples * sum(1 for s, _ in cfg.settings if s == L) / cfg.batch_size) * cfg.epochs
        for L in seq_lens)
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
    the model's entry of ``results`` (see :func:`run_mqar`). With several fillers each (filler, length) is
    trained separately; the lr is chosen once per model, on the mean validation accuracy over all of them."""
    seq_lens = sorted({s for s, _ in cfg.settings})
    fillers = fillers_of(cfg)
    units = [(f, L) for f in fillers for L in seq_lens]
    n_select = min(cfg.lr_select_seeds, len(cfg.seeds)) if len(cfg.lrs) > 1 else 0
    cache: Dict[Tuple[float, int, str, int], Dict[str, Any]] = {}
    data: Dict[Tuple[int, str, int], Any] = {(seed, f, L): None for seed in cfg.seeds for f, L in units}

    def one(lr: float, seed: int, f: str, L: int) -> Dict[str, Any]:
        if data[(seed, f, L)] is None:
            data[(seed, f, L)] = datasets(cfg, L, seed, f)
        cache[(lr, seed, f, L)] = train_run(cfg, entry, L, lr, seed, dev, data[(seed, f, L)], bar)
        return cache[(lr, seed, f, L)]

    selection: Dict[str, float] = {}
    if n_select:
        for lr in cfg.lrs:
            accs = [a for seed in cfg.seeds[:n_select] for f, L in units for a in one(lr, seed, f, L)["val"].values()]
            selection[str(lr)] = round(statistics.fmean(accs), 4)
        best = max(cfg.lrs, key=lambda lr: selection[str(lr)])
        for key in [k for k in cache if k[0] != best]:  # the other lrs are never tested
            del cache[key]
    else:
        best = cfg.lrs[0]
    runs = []
    model: Optional[MQARModel] = None
    for seed in cfg.seeds:
        for f, L in units:
            out = cache.pop((best, seed, f, L), None) or one(best, seed, f, L)
            test = {p: round(evaluate(out["model"], x, y, cfg.batch_size, dev), 4)
                    for p, (x, y) in data[(seed, f, L)]["test"].items()}
            beyond = {f"{Lb}x{p}": round(evaluate(out["model"], x, y, cfg.batch_size, dev), 4)
                      for (Lb, p), (x, y) in data[(seed, f, L)]["beyond"].items()}
            model = out.pop("model")
            val = out.pop("val")
            runs.append(dict(seed=seed, seq_len=L, **({"filler": f} if len(fillers) > 1 else {}), lr=best,
                             test=test, beyond=beyond, val={p: round(a, 4) for p, a in val.items()}, **out))
            data[(seed, f, L)] = {k: data[(seed, f, L)][k] for k in ("test", "beyond")}
    assert model is not None
    e = parse_entry(entry)
    H, K, V = model.memory_shape()
    settings = []
    for f in fillers:
        mine = [r for r in runs if r.get("filler", f) == f]
        tag = {"filler": f} if len(fillers) > 1 else {}
        for L, p in cfg.settings:
            at = [r for r in mine if r["seq_len"] == L]
            accs = [r["test"][p] for r in at]
            settings.append(dict(seq_len=L, pairs=p, **tag, trained=True, seeds=[r["seed"] for r in at],
                                 accuracy=accs, **spread(accs), converged=[r["converged"] for r in at]))
        for L, p in cfg.test_settings:
            at = [r for r in mine if r["seq_len"] == trained_at(cfg, L)]
            accs = [r["beyond"][f"{L}x{p}"] for r in at]
            settings.append(dict(seq_len=L, pairs=p, **tag, trained=False, trained_at=trained_at(cfg, L),
                                 seeds=[r["seed"] for r in at], accuracy=accs, **spread(accs),
                                 converged=[r["converged"] for r in at]))
    accounting = ACCOUNTINGS[e.accounting] + (" (b ≡ 0)" if e.b_zero else "")
    return {"model": e.mixer, "accounting": accounting, "b_zero": e.b_zero, "state_floats": model.state_size(),
            "memory": {"H": H, "K": K, "V": V}, "mixer_kwargs": model.mixer_kwargs,
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "lr_selection": selection, "best_lr": best,
            "converged": f"{sum(r['converged'] for r in runs)}/{len(runs)}",
            "settings": settings, "runs": runs}


# ------------------------------------------------------------------------------------ outputs


def _seeds(n: int) -> str:
    """``1 seed``, ``3 seeds``."""
    return f"{n} seed" + ("" if n == 1 else "s")


def _is_smoke(cfg: Dict[str, Any]) -> bool:
    """A smoke test: the config says so, or one seed (no spread: a check that the pipeline runs, not a result)."""
    return bool(cfg.get("smoke")) or len(cfg["seeds"]) == 1


def _accuracy(s: Dict[str, Any]) -> str:
    """A setting's test accuracy: ``mean ± std`` over seeds, the bare value for one seed."""
    return f"{s['mean']:.3f}" if len(s["accuracy"]) == 1 else f"{s['mean']:.3f} ± {s['std']:.3f}"


def _converged(counts: str) -> str:
    """``"k/n"`` (converged runs / runs) as ``k of n``."""
    k, n = counts.split("/")
    return f"{k} of {n}"


def _title(result: Dict[str, Any]) -> str:
    cfg = result["config"]
    seeds = len(cfg["seeds"])
    head = "SMOKE TEST, not a result — " if _is_smoke(cfg) else ""
    fillers = cfg["filler"] if isinstance(cfg["filler"], str) else " and ".join(cfg["filler"])
    recipe = f", {cfg['recipe']} recipe" if cfg.get("recipe", "default") != "default" else ""
    shaped = any("@shape" in m or "@width" in m for m in cfg.get("models", []))
    budget = f"state budget {cfg['state_budget']} floats/layer" + (" (@shape: H×K×V matched instead)" if shaped else "")
    return (f"{head}MQAR ({cfg['name']}): d_model {cfg['d_model']}, {budget}, "
            f"{fillers} filler{recipe}, " + ("1 seed, no spread" if seeds == 1 else f"{seeds} seeds, mean ± std"))


def plot_mqar(result: Dict[str, Any], path: Path) -> Path:
    """``mqar.png``: test accuracy (best lr on validation; mean ± std over seeds) against the number of
    pairs, one panel per sequence length, and the mean training-loss curves (last panel)."""
    from .plotting import curve_panels
    panels: Dict[str, Dict[str, tuple]] = {}
    for entry, r in result["results"].items():
        for s in r["settings"]:
            where = "" if s.get("trained", True) else f" (model of T = {s['trained_at']})"
            filler = f", {s['filler']} filler" if "filler" in s else ""
            panel = f"test accuracy, T = {s['seq_len']}{where}{filler}"
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
                               cfg["converged_loss"]),
                        differences=_difference_panel(result.get("comparisons") or []))


def _difference_panel(rows: Sequence[Dict[str, Any]]) -> Optional[Tuple[str, List[str], Dict[str, tuple]]]:
    """The plot's panel of paired differences: one series per pair, mean ± 2 se per setting, filled where
    decided."""
    if not rows:
        return None
    ticks: List[str] = []
    series: Dict[str, tuple] = {}
    for c in rows:
        T, P = c["setting"]
        tick = f"T={T},{P}" + ("" if c.get("trained", True) else "†") + (f" {c['filler']}" if c.get("filler") else "")
        if tick not in ticks:
            ticks.append(tick)
        x, y, e, d = series.setdefault(f"{c['a']} − {c['b']}", ([], [], [], []))
        x.append(ticks.index(tick))
        y.append(c["mean"])
        e.append(2 * (c["se"] or 0.0))
        d.append(c["verdict"] != "undecided")
    return ("paired differences, mean ± 2 se (filled: decided)", ticks, series)


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
    """A markdown table: per model, the accounting, memory, parameters, lr, converged runs (``k of n``), and the
    test accuracy per setting as mean ± std over seeds (one seed: its value, no spread, and a smoke-test label)."""
    names = list(result["results"])
    settings = [(s["seq_len"], s["pairs"], s.get("trained", True)) for s in result["results"][names[0]]["settings"]]
    cfg = result["config"]
    lines = []
    if _is_smoke(cfg):
        why = "" if cfg.get("smoke") else " (one seed: no spread)"
        lines.append(f"**Smoke test{why}: checks that the pipeline runs; not a result.**\n")
    lines += ["| model | accounting | state floats/layer | H×K×V | params | lr (val) | converged runs | "
              + " | ".join(f"T={L}, {p} pairs" + ("" if trained else " †") for L, p, trained in settings) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(settings)]
    for name in names:
        r = result["results"][name]
        m = r["memory"]
        accs = " | ".join(_accuracy(s) for s in r["settings"])
        lines.append(f"| {name} | {r['accounting']} | {r['state_floats']} | {m['H']}×{m['K']}×{m['V']} | "
                     f"{r['parameters']} | {r['best_lr']:g} | {_converged(r['converged'])} | {accs} |")
    n = len(cfg["seeds"])
    accuracy = "test accuracy of that seed, no spread" if n == 1 else "test accuracy as mean ± std over seeds"
    lines.append(f"\n{_seeds(n)} ({accuracy}); converged runs: of the model's runs (one per seed, filler and "
                 f"training length), those whose final training loss is ≤ {cfg['converged_loss']:g} nats/query "
                 f"(chance {cfg['chance_loss']:g}); {cfg['filler']} filler."
                 + (" † tested only, beyond training (on the model trained at the longest training length not "
                    "above it)." if any(not t for _, _, t in settings) else ""))
    return "\n".join(lines)


def report(result: Dict[str, Any]) -> str:
    """What ``metaplastic mqar`` prints: :func:`summary_table` (one per filler when there are several), then
    the paired comparisons (:func:`.mqar_compare.comparison_table`)."""
    from .mqar_compare import comparison_table
    cfg = result["config"]
    fillers = [cfg["filler"]] if isinstance(cfg["filler"], str) else list(cfg["filler"])
    parts = []
    if len(fillers) == 1:
        parts.append(summary_table(result))
    else:
        for f in fillers:
            sub = {"config": dict(cfg, filler=f),
                   "results": {k: dict(r, settings=[s for s in r["settings"] if s.get("filler") == f])
                               for k, r in result["results"].items()}}
            parts.append(f"**{f} filler**\n\n" + summary_table(sub))
    table = comparison_table(result)
    if table:
        parts.append("**Paired comparisons**\n\n" + table)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default="quick",
                        help="quick (a smoke test, under a minute on a CPU), study (converged, 3 seeds, about "
                             "75 min on a 2-core CPU), decide (both accountings, b ≡ 0 controls, both fillers, "
                             "the authors' recipe; about 100 min on a 2-core CPU), paper (the authors' setting, a GPU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config field, VALUE as JSON (repeatable): --set epochs=6 "
                             "--set 'settings=[[64, 8], [64, 16]]' --set 'models=[\"mamba2\"]' --set recipe=authors "
                             "--set 'mixer_kwargs={\"palimpsa\": {\"expand_v\": 2}}' (merged over the config's)")
    parser.add_argument("--importance-groups", type=int, metavar="G",
                        help="importance_groups of the mixers with an importance path (recorded in the outputs)")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="models: NAME, NAME@floats, NAME@shape, not_NAME (b ≡ 0) (default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="seeds (default: the config's)")
    parser.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning rates (default: the config's)")
    parser.add_argument("--epochs", type=int, help="override the config's number of epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: the config's)")
    parser.add_argument("--jobs", type=int, help="worker processes, one model each (default: the config's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default="mqar_out", help="output folder (default: mqar_out)")


def config_from_args(args: argparse.Namespace) -> MQARConfig:
    """The named config with ``--set`` and the flags applied, validated (``ValueError`` naming the key)."""
    from .overrides import apply_overrides, parse_assignments
    if args.lrs and not all(lr > 0 and math.isfinite(lr) for lr in args.lrs):
        raise ValueError(f"--lrs must be positive and finite, got {args.lrs}")
    for flag, value in (("--epochs", args.epochs), ("--threads", args.threads), ("--jobs", args.jobs),
                        ("--importance-groups", args.importance_groups)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    values = parse_assignments(args.overrides)
    cfg = CONFIGS[args.config]
    if values.get("recipe") == "authors":  # the recipe's data and schedule fields, unless set here too
        cfg = replace(cfg, **{k: v for k, v in AUTHORS_FIELDS.items() if k not in values})
    cfg = apply_overrides(cfg, args.overrides)
    if (args.models or "models" in values) and "comparisons" not in values:
        cfg = replace(cfg, comparisons=None)  # the config's pairs name its own models
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
    save_run(result, args.out, "mqar", plot_mqar, report)
    return 0
