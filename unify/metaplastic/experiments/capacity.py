"""Memory capacity without training: write N key→value pairs, read every key back.

For each model of the registry, the memory (``metaplastic.scan`` with the model's objective) receives N
unit-norm associations ``(k_n, v_n)``, one per token, with *fixed* gates (constant over time). After the
N writes, every key is used as a query and the read-out (``closed_forms.readout``, the same code the scan
uses) is compared by cosine with the N stored values. *Recall* is the fraction of keys whose read-out is
nearest to their own value; the *capacity* is the largest N of the grid such that recall ≥ 0.9 there
and at every smaller N of the grid (0 if the smallest N already fails).

Every model has the same memory matrix, ``V × K`` (default K = V = 32), one head. The metaplastic
models also carry the per-synapse precision ``I``; with the constant, head-shared importance rate used
here it depends on the key channel only (docs/theory.md#limit-7-head-shared-importance), i.e. K extra floats. MesaNet carries the
K × K key precision ``H``.

Gates, all constant over the sequence, from a small grid per model (the setting with the largest
capacity, ties broken by the mean recall over N, is reported; the whole grid runs as heads of one scan):

- decay ``α ∈ {1, 0.98, 0.95}`` (models with forgetting); ``meta_mamba2`` and ``meta_gated_deltanet`` are
  pinned to the decay that was best for ``mamba2`` / ``gated_deltanet`` ("at equal decay");
- write rate ``β``: 1 for the dot-product models (a constant β only rescales their read-out, which a
  cosine ignores); ``β ∈ {0.05, 0.1, 0.25, 0.5, 1}`` for Gated DeltaNet, ``β ∈ {0.25, 0.5, 1, 2, 4, 8}``
  for its metaplastic twin, ``β ∈ {0.1, 0.5, 2, 8, 32}`` for LongHorn (``ε = β/(1+β)``); MesaNet β = 1;
- importance rate ``b ∈ {0.01, 0.1, 1, 10, 100, 10³, 10⁴}`` (diagonal posteriors; b > 0, otherwise the precision
  never moves and the model *is* its base, limit 2) with prior precision ``Ip = 1``. Only the ratio
  b / Ip matters (scaling both scales ``I`` and, for the delta rule, is a change of β), so Ip = 1 loses
  nothing;
- MesaNet prior key precision ``λ ∈ {0.001, 0.01, 0.1, 1}``.

Two key distributions (values are always uniform on the sphere):

- ``isotropic``: keys uniform on the sphere;
- ``anisotropic``: ``k ∝ g ∘ (j^{-s/2})_j`` with ``g ~ N(0, I)``, channel ``j = 1..K``, then normalised;
  the channel variances follow the power law ``j^{-s}`` (default ``s = 2``).

All models and grid settings see the same random keys and values (common random numbers), float64.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .. import closed_forms
from metaplastic.kernels.threads import torch_threads
from ..registry import registry
from ..scan import scan

DEFAULT_MODELS = ("mamba2", "meta_mamba2", "gated_deltanet", "meta_gated_deltanet", "longhorn", "mesanet",
                  "palimpsa")
DISTRIBUTIONS = ("isotropic", "anisotropic")
THRESHOLD = 0.9
DECAYS = (1.0, 0.98, 0.95)
IMPORTANCE = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
QUICK_N = (4, 8, 12, 16, 24, 32, 40, 48, 64, 96, 128)
FULL_N = tuple(range(2, 33, 2)) + tuple(range(36, 97, 4)) + (112, 128, 160, 192)

# Which model's best decay a metaplastic twin is pinned to ("at equal decay").
PINNED_DECAY = {"meta_mamba2": "mamba2", "meta_gated_deltanet": "gated_deltanet"}
BETAS = {"gated_deltanet": (0.05, 0.1, 0.25, 0.5, 1.0), "meta_gated_deltanet": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
         "deltanet": (0.05, 0.1, 0.25, 0.5, 1.0), "longhorn": (0.1, 0.5, 2.0, 8.0, 32.0),
         "meta_longhorn": (0.1, 0.5, 2.0, 8.0, 32.0)}
LAMBDAS = (0.001, 0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Setting:
    """Constant gates of one run: ``α = decay``, ``β``, ``b``, ``Ip``, MesaNet's ``λ`` (same for all channels)."""

    decay: float = 1.0
    beta: float = 1.0
    b: float = 0.0
    prior_precision: float = 1.0
    lam: float = 1.0


def grid(name: str, pinned_decay: Optional[float] = None) -> List[Setting]:
    """The settings tried for registry model ``name`` (see the module docstring)."""
    obj = registry[name].objective
    if obj.forgetting == "none":
        decays: Sequence[float] = (1.0,)
    elif pinned_decay is not None:
        decays = (pinned_decay,)
    else:
        decays = DECAYS
    betas = BETAS.get(name, (1.0,))
    bs = IMPORTANCE if obj.posterior == "diagonal" else (0.0,)
    lams = LAMBDAS if obj.posterior == "full" else (1.0,)
    return [Setting(d, be, b, 1.0, la) for d in decays for be in betas for b in bs for la in lams]


def make_pairs(distribution: str, trials: int, n: int, K: int, V: int, power: float,
               generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm keys ``[trials, n, K]`` and values ``[trials, n, V]`` (float64)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown key distribution {distribution!r}; known: {', '.join(DISTRIBUTIONS)}")
    keys = torch.randn(trials, n, K, generator=generator, dtype=torch.float64)
    if distribution == "anisotropic":
        keys = keys * torch.arange(1, K + 1, dtype=torch.float64).pow(-power / 2)
    values = torch.randn(trials, n, V, generator=generator, dtype=torch.float64)
    return (torch.nn.functional.normalize(keys, dim=-1), torch.nn.functional.normalize(values, dim=-1))


def _gates(name: str, settings: Sequence[Setting], trials: int, T: int, K: int) -> Dict[str, object]:
    """Keyword arguments of ``scan`` for constant gates, one head per setting."""
    obj = registry[name].objective
    col = lambda field: torch.tensor([getattr(s, field) for s in settings], dtype=torch.float64)  # noqa: E731
    H = len(settings)
    per_token = lambda x: x.view(1, 1, H).expand(trials, T, H)  # noqa: E731
    kwargs: Dict[str, object] = {"beta": per_token(col("beta")), "prior_precision": col("prior_precision"),
                                 "scale": registry[name].scale_for(K)}
    if obj.forgetting == "scalar":
        kwargs["log_decay"] = per_token(col("decay").log())
    elif obj.forgetting == "vector":
        kwargs["log_decay"] = per_token(col("decay").log())[..., None].expand(trials, T, H, K)
    if obj.posterior == "diagonal":
        kwargs["b"] = per_token(col("b"))
    if obj.posterior == "full":
        kwargs["lam"] = col("lam")[:, None].expand(H, K).contiguous()
    return kwargs


def recall_curve(name: str, settings: Sequence[Setting], keys: torch.Tensor, values: torch.Tensor,
                 n_grid: Sequence[int]) -> torch.Tensor:
    """Recall ``[len(settings), len(n_grid)]``: after writing the first N pairs, the fraction of those N keys
    whose read-out is nearest (cosine) to their own value, averaged over trials.

    ``keys [trials, Nmax, K]``, ``values [trials, Nmax, V]``. The pairs are written in segments between the
    N of the grid, each segment starting from the previous final state (one sequence, read at each N).
    """
    obj = registry[name].objective
    trials, _, K = keys.shape
    H = len(settings)
    state = None
    start = 0
    out = torch.zeros(H, len(n_grid), dtype=torch.float64)
    for j, n in enumerate(n_grid):
        if n > start:
            seg = slice(start, n)
            k = keys[:, seg, None, :].expand(-1, -1, H, -1)
            v = values[:, seg, None, :].expand(-1, -1, H, -1)
            res = scan(obj, k, k, v, initial_state=state, output_final_state=True,
                       **_gates(name, settings, trials, n - start, K))
            state, start = res.final_state, n
        # read the N keys back from the state after N writes: queries [trials, H, N, K]
        kwargs = _gates(name, settings, trials, 1, K)
        lam = kwargs.get("lam")
        read_gates = closed_forms.Gates(alpha=None, beta=None, b=None, Ip=None,
                                        lam=None if lam is None else lam[:, None, :])
        q = keys[:, None, :n, :].expand(-1, H, -1, -1)
        o = _read(obj, state, q, read_gates, kwargs["scale"])
        cos = torch.einsum("bhnv,bmv->bhnm", torch.nn.functional.normalize(o, dim=-1), values[:, :n])
        hit = cos.argmax(-1) == torch.arange(n)
        out[:, j] = hit.double().mean(dim=(0, 2))
    return out


def _read(obj, state: Dict[str, torch.Tensor], q: torch.Tensor, gates: closed_forms.Gates, scale: float,
          max_elements: int = 1 << 22) -> torch.Tensor:
    """``closed_forms.readout`` of the states ``[trials, H, ...]`` at the queries ``q [trials, H, N, K]``,
    in blocks of queries (the broadcast read-out is ``[trials, H, N, V, K]``: keep it small)."""
    trials, H, N, K = q.shape
    V = state["G" if "G" in state else "mu" if "mu" in state else "S"].shape[-2]
    block = max(1, max_elements // (trials * H * V * K))
    expanded = {key: x[:, :, None] for key, x in state.items()}
    outs = [closed_forms.readout(obj, expanded, q[:, :, i:i + block], gates, scale)[0] for i in range(0, N, block)]
    return torch.cat(outs, dim=2)


def capacity_of(n_grid: Sequence[int], recall: Sequence[float], threshold: float = THRESHOLD) -> int:
    """Largest N of the grid with recall ≥ threshold there and at every smaller N (0 if none)."""
    cap = 0
    for n, r in zip(n_grid, recall):
        if r < threshold:
            break
        cap = n
    return cap


def state_floats(name: str, K: int, V: int) -> int:
    """Floats of recurrent memory per head in this experiment (constant head-shared b: ``I`` is K floats)."""
    post = registry[name].objective.posterior
    return V * K + (K if post == "diagonal" else K * K if post == "full" else 0)


def run_capacity(models: Sequence[str] = DEFAULT_MODELS, distributions: Sequence[str] = DISTRIBUTIONS,
                 *, dim: int = 32, n_grid: Sequence[int] = QUICK_N, trials: int = 16, power: float = 2.0,
                 seed: int = 0, progress: bool = True, threads: Optional[int] = 1) -> Dict[str, object]:
    """Run the experiment; returns the dictionary written to ``capacity.json``.

    ``threads``: torch CPU threads while it runs (the tensors are tiny: one thread is fastest).

    ``results[distribution][model]`` has ``N``, ``recall`` (best setting), ``capacity``, ``setting``,
    ``state_floats`` and ``grid`` (every setting's capacity).
    """
    for name in models:
        if name not in registry:
            raise ValueError(f"unknown model {name!r}; known: {', '.join(registry)}")
        if registry[name].objective.posterior == "full" and registry[name].objective.forgetting == "vector":
            raise ValueError(f"{name}: vector forgetting with a full posterior is not supported")
    for dist in distributions:
        if dist not in DISTRIBUTIONS:
            raise ValueError(f"unknown key distribution {dist!r}; known: {', '.join(DISTRIBUTIONS)}")
    if dim < 1 or trials < 1:
        raise ValueError(f"dim and trials must be positive, got dim={dim}, trials={trials}")
    if not math.isfinite(power):
        raise ValueError(f"power must be a finite number, got {power}")
    n_grid = sorted(set(int(n) for n in n_grid))
    if not n_grid or n_grid[0] < 1:
        raise ValueError(f"the N grid must hold positive integers, got {n_grid}")
    with torch_threads(threads):
        return _run(models, distributions, dim, n_grid, trials, power, seed, progress)


def _run(models, distributions, dim, n_grid, trials, power, seed, progress) -> Dict[str, object]:
    order = sorted(models, key=lambda m: m in PINNED_DECAY)  # bases first: their twins are pinned to them
    results: Dict[str, Dict[str, object]] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(order) * len(distributions), desc="capacity", disable=not progress)
    for d_idx, dist in enumerate(distributions):
        gen = torch.Generator().manual_seed(seed * 1000 + d_idx)
        keys, values = make_pairs(dist, trials, n_grid[-1], dim, dim, power, gen)
        per_model: Dict[str, object] = {}
        for name in order:
            base = PINNED_DECAY.get(name)
            pinned = None
            if base is not None:
                if base in per_model:
                    pinned = per_model[base]["setting"]["decay"]
                else:  # the base was not asked for: run its grid to find its decay, do not report it
                    base_rec = recall_curve(base, grid(base), keys, values, n_grid)
                    pinned = grid(base)[_best(base_rec, n_grid)].decay
            settings = grid(name, pinned)
            rec = recall_curve(name, settings, keys, values, n_grid)
            best = _best(rec, n_grid)
            per_model[name] = {
                "N": list(n_grid), "recall": [round(float(r), 4) for r in rec[best]],
                "capacity": capacity_of(n_grid, rec[best].tolist()), "setting": asdict(settings[best]),
                "state_floats": state_floats(name, dim, dim),
                "grid": [{"setting": asdict(s), "capacity": capacity_of(n_grid, rec[i].tolist())}
                         for i, s in enumerate(settings)],
            }
            bar.set_postfix_str(f"{dist}/{name}: capacity {per_model[name]['capacity']}")
            bar.update(1)
        results[dist] = {name: per_model[name] for name in models}
    bar.close()
    return {"config": {"models": list(models), "distributions": list(distributions), "K": dim, "V": dim,
                       "trials": trials, "power_s": power, "seed": seed, "threshold": THRESHOLD,
                       "seconds": round(time.perf_counter() - started, 1)},
            "results": results}


def _best(rec: torch.Tensor, n_grid: Sequence[int]) -> int:
    """Index of the setting with the largest capacity, ties broken by mean recall."""
    scores = [(capacity_of(n_grid, r.tolist()), float(r.mean())) for r in rec]
    return max(range(len(scores)), key=lambda i: scores[i])


def plot_capacity(result: Dict[str, object], path: Path) -> Path:
    """``capacity.png``: one panel per distribution, recall against N, one curve per model."""
    from .plotting import curve_panels
    cfg = result["config"]
    panels = {}
    for dist, per_model in result["results"].items():
        title = dist if dist == "isotropic" else f"{dist} (s = {cfg['power_s']:g})"
        panels[title] = {name: (r["N"], r["recall"]) for name, r in per_model.items()}
    return curve_panels(path, panels, xlabel="N associations written", ylabel="recall (nearest value by cosine)",
                        title=f"Memory capacity without training, K = V = {cfg['K']}, {cfg['trials']} trials",
                        hline=THRESHOLD, logx=True)


def summary_table(result: Dict[str, object]) -> str:
    """A markdown table: capacity per model and distribution, with the chosen setting."""
    dists = list(result["results"])
    models = list(result["results"][dists[0]])
    lines = ["| model | " + " | ".join(f"capacity ({d})" for d in dists) + " | best setting per distribution |",
             "|---|" + "---|" * len(dists) + "---|"]
    for m in models:
        caps = [str(result["results"][d][m]["capacity"]) for d in dists]
        sets = "; ".join(_fmt_setting(m, result["results"][d][m]["setting"]) for d in dists)
        lines.append(f"| {m} | " + " | ".join(caps) + f" | {sets} |")
    return "\n".join(lines)


def _fmt_setting(name: str, s: Dict[str, float]) -> str:
    obj = registry[name].objective
    parts = []
    if obj.forgetting != "none":
        parts.append(f"α={s['decay']:g}")
    if s["beta"] != 1.0 or name in BETAS:
        parts.append(f"β={s['beta']:g}")
    if obj.posterior == "diagonal":
        parts.append(f"b={s['b']:g}")
    if obj.posterior == "full":
        parts.append(f"λ={s['lam']:g}")
    return ",".join(parts) or "-"


def recall_at(result: Dict[str, object], dist: str, name: str, n: int) -> Optional[float]:
    """Recall of ``name`` at N = n (None if n is not on the grid)."""
    r = result["results"][dist][name]
    return r["recall"][r["N"].index(n)] if n in r["N"] else None


# --------------------------------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class CapacityConfig:
    """The arguments of :func:`run_capacity` as a named config; every field can be set with ``--set``."""

    name: str
    models: Tuple[str, ...] = DEFAULT_MODELS
    distributions: Tuple[str, ...] = DISTRIBUTIONS
    dim: int = 32
    n_grid: Tuple[int, ...] = FULL_N
    trials: int = 64
    power: float = 2.0
    seed: int = 0
    importance_groups: Optional[int] = None  # recorded; needs mixers that take importance_groups
    threads: Optional[int] = 1


CONFIGS: Dict[str, CapacityConfig] = {
    "quick": CapacityConfig("quick", n_grid=QUICK_N, trials=16),  # under a minute
    "full": CapacityConfig("full"),
}


def importance_groups_supported() -> bool:
    """Whether the mixers of this installation take ``importance_groups``."""
    import inspect
    from metaplastic.models.mixers import MIXERS
    return "importance_groups" in inspect.signature(MIXERS["palimpsa"].__init__).parameters


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None,
                        help="quick (a coarse N grid, 16 trials: under a minute) or full (default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config field, VALUE as JSON (repeatable): --set dim=16 "
                             "--set 'n_grid=[4, 8, 16]'")
    parser.add_argument("--importance-groups", type=int, metavar="G",
                        help="importance_groups of the mixers with an importance path (recorded in the outputs)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help=f"registry models (default: {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--quick", action="store_true", help="the quick config (same as --config quick)")
    parser.add_argument("--out", default="capacity_out", help="output folder (default: capacity_out)")
    parser.add_argument("--dim", type=int, default=None, help="K = V, the memory is V×K (default 32)")
    parser.add_argument("--trials", type=int, default=None, help="random draws per N (default 16 quick, 64 full)")
    parser.add_argument("--power", type=float, default=None,
                        help="s of the anisotropic keys: channel j scaled by j^(-s/2) (default 2)")
    parser.add_argument("--seed", type=int, default=None)


def config_from_args(args: argparse.Namespace) -> CapacityConfig:
    """The named config with ``--set`` and the flags applied (``ValueError`` naming the bad key)."""
    from dataclasses import replace
    from .overrides import apply_overrides
    if args.power is not None and not math.isfinite(args.power):
        raise ValueError(f"--power must be a finite number, got {args.power}")
    for flag, value in (("--dim", args.dim), ("--trials", args.trials), ("--importance-groups", args.importance_groups)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    name = args.config or ("quick" if args.quick else "full")
    cfg = apply_overrides(CONFIGS[name], args.overrides)
    flags = {"models": tuple(args.models) if args.models else None, "dim": args.dim, "trials": args.trials,
             "power": args.power, "seed": args.seed, "importance_groups": args.importance_groups}
    cfg = replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    for name_ in cfg.models:
        if name_ not in registry:
            raise ValueError(f"models: unknown model {name_!r}; known: {', '.join(registry)}")
    if not math.isfinite(cfg.power):
        raise ValueError(f"power must be a finite number, got {cfg.power}")
    for key in ("dim", "trials"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be positive, got {getattr(cfg, key)}")
    if cfg.importance_groups is not None:
        if cfg.importance_groups < 1:
            raise ValueError(f"importance_groups must be positive, got {cfg.importance_groups}")
        if not importance_groups_supported():
            raise ValueError("importance_groups is not supported by this installation")
    return cfg


def run(args: argparse.Namespace) -> int:
    from metaplastic.errors import UserError
    from .overrides import config_for_run
    cfg = config_for_run(args, config_from_args)
    try:
        result = run_capacity(cfg.models, cfg.distributions, dim=cfg.dim, n_grid=cfg.n_grid, trials=cfg.trials,
                              power=cfg.power, seed=cfg.seed, threads=cfg.threads)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    result["config"].update(name=cfg.name, importance_groups=cfg.importance_groups)
    from .plotting import save_run
    save_run(result, args.out, "capacity", plot_capacity, summary_table)
    return 0
