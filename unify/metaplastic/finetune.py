"""``metaplastic finetune``: fine-tune a metaplastic model, on one process or many (torchrun + FSDP2).

    metaplastic finetune --model DIR --data tokens.npy --out RUN [options]
    metaplastic finetune --nproc-per-node N --model DIR --data tokens.npy --out RUN [options]
    torchrun --nproc_per_node=N -m metaplastic finetune --model DIR --data tokens.npy --out RUN [options]

One code path for all: without torchrun the command starts a one-process group itself, so a single
process runs the same FSDP2 model, the same DCP checkpoints and the same data rule as N processes.
``--nproc-per-node N`` checks every input first, then starts N torchrun-style workers on this machine
(:mod:`metaplastic.finetune_launch`).

- Model: a ``MetaplasticForCausalLM`` directory (``model_type: metaplastic``, e.g. from ``metaplastic
  convert``), loaded in float32. ``--train metaplastic`` trains only the metaplastic path (the parameters of
  every ``ImportancePath``: γ, W_b1, W_b2, b_scale; the buffer Ip_log stays fixed), ``--train all`` everything.
- Sharding: ``fully_shard`` (FSDP2) on every block (the classes of ``model._no_split_modules``) and on the
  root; bf16 parameters with float32 gradient reduction on GPUs (``--precision``). Gradients are reduced
  after every micro-step (sharded float32 accumulation).
- Step: ``G / (W·m)`` micro-steps of ``m`` sequences on each of ``W`` ranks (data rule in
  :mod:`metaplastic.finetune_data`), mean next-token cross-entropy, ``clip_grad_norm_``, AdamW, LambdaLR
  (linear warm-up, then cosine down to ``min_lr_ratio · lr``).
- Output directory: ``metrics.jsonl`` (one line per step), ``checkpoints/step_NNNNNNN/`` (DCP: model,
  optimizer, and a ``trainer`` blob with step, data position, scheduler and every rank's RNG states),
  ``checkpoints/latest`` (the name of the last complete checkpoint), ``model/`` (the final Hugging Face
  export, loadable with ``AutoModelForCausalLM.from_pretrained`` after ``import metaplastic``).
- Safety (:mod:`metaplastic.safe_io`): a checkpoint and the export are written beside their place and renamed
  in (a complete checkpoint is never written in place); ``latest`` is read defensively (falls back to the
  newest complete checkpoint); one run at a time per ``--out`` (a lock beside it); a fresh run into an
  ``--out`` that holds a run is refused unless ``--resume`` or ``--overwrite``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from metaplastic.errors import UserError
from .finetune_data import DTYPES, DataError, PackedSequences, load_tokens
from .finetune_launch import launch, leave_user_error, under_launcher
from .models.importance import project_importance_
from .safe_io import (DirLock, atomic_dir, atomic_write, check_output_location, clean_stale_in, describe,
                      replace_dir, sigterm_as_interrupt, temp_path, writing)

TRAIN_CHOICES = ("metaplastic", "all")


@dataclass
class FinetuneConfig:
    """Everything a run depends on (the CLI options, one to one)."""

    model: str
    data: str
    out: str
    train: str = "metaplastic"
    steps: int = 100
    seq_len: int = 512
    global_batch: int = 8
    micro_batch: Optional[int] = None
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    data_dtype: str = "uint16"
    stop_after: Optional[int] = None
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------- processes

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this module started the process group (and so ends it)


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_processes(device: str) -> Dist:
    """Join torchrun's process group (gloo on CPU, nccl on GPU), or start a one-process group without torchrun."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:  # launched by torchrun: env:// rendezvous
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


# ------------------------------------------------------------------------------------------------- model

def load_model(model_dir: Path) -> nn.Module:
    """The ``MetaplasticForCausalLM`` saved in ``model_dir`` (float32); UserError if it is not one."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"--model {model_dir} is not a model directory (no config.json)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise UserError(f"--model {model_dir}: config.json is not valid JSON ({exc})") from None
    from metaplastic.models.configuration import MetaplasticConfig
    from metaplastic.models.modeling import MetaplasticForCausalLM
    if model_type != MetaplasticConfig.model_type:
        raise UserError(f"--model {model_dir} is a {model_type!r} model, not a metaplastic one "
                        f"(convert it first: metaplastic convert)")
    try:
        return MetaplasticForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {model_dir} could not be loaded: {str(exc).splitlines()[0]}") from None


def metaplastic_parameter_names(model: nn.Module) -> List[str]:
    """Names of the metaplastic path's parameters: those of every ``ImportancePath`` submodule."""
    from metaplastic.models.importance import ImportancePath
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ImportancePath):
            names += [f"{prefix}.{name}" for name, _ in module.named_parameters()]
    return names


def select_trainable(model: nn.Module, train: str) -> List[str]:
    """Set ``requires_grad`` by ``--train`` (``metaplastic`` or ``all``); returns the trainable names."""
    if train not in TRAIN_CHOICES:
        raise UserError(f"--train must be one of {TRAIN_CHOICES}, got {train!r}")
    keep = set(metaplastic_parameter_names(model)) if train == "metaplastic" else None
    if keep is not None and not keep:
        raise UserError("--train metaplastic, but the model has no metaplastic path (no ImportancePath modules)")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(keep is None or name in keep)
        if param.requires_grad:
            names.append(name)
    return names


def shard(model: nn.Module, dev: Dist, precision: str) -> nn.Module:
    """FSDP2: ``fully_shard`` every block (``model._no_split_modules``) and the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(dev.device.type, (dev.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no block classes in _no_split_modules to shard")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


# ------------------------------------------------------------------------------------------ optimisation

class WarmupCosine:
    """LambdaLR multiplier after ``s`` steps: ``(s+1)/warmup`` during warm-up, then a cosine from 1 to
    ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: FinetuneConfig):
    """AdamW (weight decay on matrices only) and its warm-up + cosine LambdaLR."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    return optimizer, scheduler


def _scalar(x: torch.Tensor) -> float:
    """A float from a tensor or a replicated DTensor (what ``clip_grad_norm_`` returns under FSDP2)."""
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


# ------------------------------------------------------------------------------------------- checkpoints

def _rng_state(dev: Dist) -> Dict[str, object]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if dev.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev.device)
    return state


def _set_rng_state(state: Dict[str, object], dev: Dist) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and dev.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], dev.device)


MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "mixer", "intermediate_size")
CHECKPOINT_NAME = re.compile(r"^step_\d{7}$")


def _run_meta(cfg: FinetuneConfig, data: PackedSequences, dev: Dist, model_config=None) -> Dict[str, object]:
    """What a checkpoint must agree on to continue the same run."""
    model = {k: getattr(model_config, k, None) for k in MODEL_FIELDS} if model_config is not None else None
    return {"train": cfg.train, "seq_len": cfg.seq_len, "global_batch": cfg.global_batch, "seed": cfg.seed,
            "num_sequences": data.num_sequences, "world_size": dev.world, "steps": cfg.steps, "model": model}


def _save_failure(exc: BaseException, where: Path) -> Optional[str]:
    """One line for a failed DCP save (None for an interruption, which is re-raised as it is). DCP wraps each
    rank's error in a ``CheckpointException``; torch's zip writer reports a full disk as a ``RuntimeError``."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    inner = [exc] + [f[0] if isinstance(f, tuple) else f for f in (getattr(exc, "failures", None) or {}).values()]
    for err in inner:
        if isinstance(err, OSError):
            return describe(err)
    for err in inner:
        if isinstance(err, Exception):
            try:
                full = shutil.disk_usage(where).free < 2 ** 20
            except OSError:
                full = False
            return "no space left on device" if full else (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, meta: Dict[str, object],
                    dev: Dist, keep: int) -> Path:
    """DCP checkpoint ``root/step_NNNNNNN`` (model, optimizer, trainer blob), then ``root/latest``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = root / f"step_{step:07d}"
    # Every rank writes into the same temporary directory beside `path` (named by rank 0); rank 0 renames it
    # into place once complete, so an existing complete checkpoint is never written in place.
    names = [temp_path(path).name if dev.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    tmp = root / names[0]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rngs: List[object] = [None] * dev.world
    dist.all_gather_object(rngs, _rng_state(dev))
    blob = io.BytesIO()
    torch.save({"step": step, "samples_seen": step * int(meta["global_batch"]), "scheduler": scheduler.state_dict(),
                "rng": rngs, "meta": meta}, blob)
    blob.seek(0)
    failed: Optional[str] = None
    try:
        dcp.save({"model": model_sd, "optim": optim_sd, "trainer": blob}, checkpoint_id=str(tmp))
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        failed = _save_failure(exc, root)
        if failed is None:  # interrupted (SIGINT, SIGTERM): alone, remove what was written; else the next run does
            if dev.world == 1:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    failures: List[object] = [None] * dev.world
    dist.all_gather_object(failures, failed)
    if any(failures):
        if dev.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise UserError(f"cannot write checkpoint {path}: {next(f for f in failures if f)}")
    dist.barrier()
    if dev.rank == 0:  # only a complete checkpoint becomes `latest`
        with writing(f"checkpoint {path}"):
            replace_dir(tmp, path)
        atomic_write(root / "latest", path.name)
        if keep > 0:  # older ones only: later checkpoints of a run resumed from an earlier step stay
            older = sorted(p for p in complete_checkpoints(root) if p.name <= path.name)
            for old in older[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def is_complete(path: Path) -> bool:
    """A checkpoint directory whose DCP metadata was written (the last file DCP writes)."""
    meta = Path(path) / ".metadata"
    return meta.is_file() and meta.stat().st_size > 0


def complete_checkpoints(root: Path) -> List[Path]:
    """The complete ``step_NNNNNNN`` directories of ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name) and p.is_dir() and is_complete(p))


def read_latest(root: Path) -> Tuple[Optional[Path], Optional[str]]:
    """The checkpoint ``root/latest`` names, read defensively: ``(path, note)``.

    If ``latest`` is missing, unreadable, or names nothing complete, the newest complete checkpoint is used
    (``note`` says so); ``(None, note)`` when there is none."""
    latest = root / "latest"
    problem = None
    if latest.exists() or latest.is_symlink():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            name, problem = None, f"cannot be read ({type(exc).__name__})"
        if name is not None:
            if CHECKPOINT_NAME.match(name) and is_complete(root / name):
                return root / name, None
            problem = f"names {name[:40]!r}, which is not a complete checkpoint"
    found = complete_checkpoints(root)
    if problem is None and not found:
        return None, None
    if found:
        head = f"{latest} {problem}" if problem else f"{latest} is missing"
        return found[-1], f"note: {head}; using the newest complete checkpoint {found[-1].name}"
    return None, f"note: {latest} {problem} and there is no complete checkpoint"


def resolve_resume(resume: Optional[str], out: Path) -> Optional[Path]:
    """``--resume`` alone: ``OUT/checkpoints/latest`` (None when there is none yet); ``--resume DIR``: DIR."""
    if resume is None:
        return None
    if resume == "latest":
        path, note = read_latest(out / "checkpoints")
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(note, flush=True)
        return path
    path = Path(resume)
    if not is_complete(path):
        raise UserError(f"--resume {path} is not a DCP checkpoint directory (no complete .metadata)")
    return path


def check_compatible(path: Path, model_sd: Dict[str, object]) -> None:
    """UserError naming the first difference between the model's tensors and those of checkpoint ``path``."""
    import torch.distributed.checkpoint as dcp
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as exc:  # noqa: BLE001  (a corrupt .metadata: say so, on one line)
        raise UserError(f"checkpoint {path}: cannot read its metadata ({type(exc).__name__})") from None
    saved = {k[len("model."):]: v for k, v in stored.items() if k.startswith("model.")}
    missing = sorted(set(model_sd) - set(saved))
    extra = sorted(set(saved) - set(model_sd))
    if missing or extra:
        what = f"the model has {missing[0]!r}, the checkpoint not" if missing else \
            f"the checkpoint has {extra[0]!r}, the model not"
        raise UserError(f"checkpoint {path} does not fit --model: {what} "
                        f"({len(missing)} missing, {len(extra)} extra tensors)")
    for key, value in model_sd.items():
        size = getattr(saved[key], "size", None)
        want = tuple(value.shape) if hasattr(value, "shape") else None
        if size is not None and want is not None and tuple(size) != want:
            raise UserError(f"checkpoint {path} does not fit --model: {key} is {list(size)} in the checkpoint, "
                            f"{list(want)} in the model")


def load_checkpoint(path: Path, model, optimizer, scheduler, meta: Dict[str, object], dev: Dist) -> int:
    """Restore model, optimizer, scheduler and RNG from DCP checkpoint ``path``; returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    head = {"trainer": io.BytesIO()}
    try:
        dcp.load(head, checkpoint_id=str(path))
        head["trainer"].seek(0)
        trainer = torch.load(head["trainer"], weights_only=False)
        saved = trainer["meta"]
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001  (a damaged checkpoint: one line)
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}); resume from another one "
                        "with --resume CKPT") from None
    for key in ("train", "seq_len", "global_batch", "seed", "num_sequences"):
        if saved[key] != meta[key]:
            raise UserError(f"checkpoint {path} was made with {key}={saved[key]}, this run has {meta[key]}: "
                            "it would not continue the same run")
    for key, value in (saved.get("model") or {}).items():
        have = (meta.get("model") or {}).get(key)
        if have is not None and value != have:
            raise UserError(f"checkpoint {path} was made from a model with {key}={value}, --model has {have}")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    check_compatible(path, model_sd)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    schedule = dict(vars(scheduler.lr_lambdas[0]))
    scheduler.load_state_dict(trainer["scheduler"])  # this also restores the saved run's schedule...
    vars(scheduler.lr_lambdas[0]).update(schedule)  # ...but this run's --steps / --warmup shape the rest
    if saved["steps"] != meta["steps"]:
        _say(dev, f"note: checkpoint of a {saved['steps']}-step run; the cosine now ends at step {meta['steps']}")
    if len(trainer["rng"]) == dev.world:
        _set_rng_state(trainer["rng"][dev.rank], dev)
    else:
        _say(dev, f"note: checkpoint has {len(trainer['rng'])} ranks' RNG states, this run {dev.world}: "
                  "RNG not restored")
    return int(trainer["step"])


def export(model, model_class, source_dir: Path, out_dir: Path, dev: Dist) -> Optional[Path]:
    """Gather the full state dict to rank 0 and write a Hugging Face model directory (plus the tokenizer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dev.rank != 0:
        return None
    fresh = model_class.from_pretrained(str(source_dir), dtype=torch.float32)
    fresh.load_state_dict(full, strict=True)
    with atomic_dir(out_dir, replace=True) as tmp:  # this run's own export: replaced as a whole
        fresh.save_pretrained(str(tmp))
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
        except (OSError, ValueError):
            tokenizer = None  # no tokenizer beside the model
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


# ---------------------------------------------------------------------------------------------- training

def validate(cfg: FinetuneConfig, world: int) -> int:
    """Check the batch arithmetic before any process group starts; returns the micro-batch."""
    for name in ("steps", "seq_len", "global_batch", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup", "save_every", "keep_checkpoints", "grad_clip", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    for name in ("lr", "min_lr_ratio", "grad_clip", "weight_decay"):
        if not math.isfinite(getattr(cfg, name)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"--min-lr-ratio must lie in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.stop_after is not None and cfg.stop_after < 0:
        raise UserError(f"--stop-after must not be negative, got {cfg.stop_after}")
    if cfg.global_batch % world:
        raise UserError(f"the world size {world} does not divide --global-batch {cfg.global_batch}")
    per_rank = cfg.global_batch // world
    micro = per_rank if cfg.micro_batch is None else cfg.micro_batch
    if micro < 1 or per_rank % micro:
        raise UserError(f"--micro-batch {micro} does not divide the per-rank batch {per_rank} "
                        f"(--global-batch {cfg.global_batch} / world size {world})")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    return micro


def prepare(cfg: FinetuneConfig, world: Optional[int] = None):
    """Validate ``cfg`` for ``world`` ranks (default: torchrun's ``WORLD_SIZE``) and load what it names:
    ``(model, data, micro_batch, trainable names)``.

    Everything a user can get wrong is checked here, before any process group starts."""
    micro = validate(cfg, world_size_from_env() if world is None else world)
    check_run_dir(cfg)
    model = load_model(Path(cfg.model))
    try:
        tokens = load_tokens(Path(cfg.data), dtype=cfg.data_dtype, tokenizer_dir=Path(cfg.model))
        data = PackedSequences(tokens, cfg.seq_len, cfg.global_batch, seed=cfg.seed,
                               vocab_size=model.config.vocab_size, name=str(cfg.data))
    except DataError as exc:
        raise UserError(str(exc)) from None
    return model, data, micro, select_trainable(model, cfg.train)


RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "model")


def check_run_dir(cfg: FinetuneConfig) -> None:
    """``--out`` must be writable, and hold no run unless ``--resume`` or ``--overwrite`` says what to do."""
    out = check_output_location(cfg.out, what="--out", kind="dir")
    if cfg.resume is not None and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other: continue the run, or start afresh")
    if cfg.resume is None and not cfg.overwrite:
        found = [name for name in RUN_FILES if (out / name).exists()]
        if found:
            raise UserError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume, "
                            "or start afresh with --overwrite (which removes those)")


def remove_previous_run(out: Path) -> None:
    """``--overwrite``: remove the files a previous run wrote into ``out`` (and nothing else)."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class StepLog:
    """Rank 0's record of the run: ``metrics.jsonl`` (every step), a printed line every ``log_every`` steps,
    a tqdm bar. tokens/s is measured over the steps since the last printed line."""

    def __init__(self, cfg: FinetuneConfig, out: Path, start: int, rank: int) -> None:
        from tqdm.auto import tqdm
        self.cfg, self.active, self.path = cfg, rank == 0, out / "metrics.jsonl"
        self.tokens_per_step = cfg.global_batch * cfg.seq_len
        self.bar = tqdm(total=cfg.steps, initial=start, desc="finetune", unit="step", disable=not self.active)
        self.t0, self.steps = time.perf_counter(), 0
        if self.active:
            _truncate_metrics(self.path, start)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, epoch: float, last: bool) -> None:
        self.steps += 1
        tps = self.steps * self.tokens_per_step / max(time.perf_counter() - self.t0, 1e-9)
        if not self.active:
            return
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                  "tokens_seen": step * self.tokens_per_step, "epoch": epoch}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:.0f}")
        if step % self.cfg.log_every == 0 or last:
            self.bar.write(f"step {step}/{self.cfg.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                           f"grad-norm {grad_norm:.3g} | {tps:,.0f} tokens/s")
            self.t0, self.steps = time.perf_counter(), 0

    def close(self) -> None:
        self.bar.close()


def train(cfg: FinetuneConfig) -> Dict[str, object]:
    """Run the fine-tuning described by ``cfg`` on this process's rank; returns ``{"losses", "step", "export"}``
    (losses of the steps this process ran; ``export`` is the model directory on rank 0 once finished)."""
    model, data, micro, trainable = prepare(cfg)
    out, model_class = Path(cfg.out), type(model)
    dev = start_processes(cfg.device)
    # rank 0 locks --out, unless the launcher that started this worker holds the lock for the whole job
    lock = DirLock(out, "--out") if dev.rank == 0 and not under_launcher() else None
    stack = contextlib.ExitStack()
    stack.enter_context(sigterm_as_interrupt())  # SIGTERM cleans up as SIGINT does: partial outputs, the lock
    try:
        flags = [None]
        if lock is not None:
            try:
                lock.acquire()
            except UserError as exc:
                flags = [str(exc)]
        dist.broadcast_object_list(flags, src=0)
        if flags[0]:
            raise UserError(flags[0])
        with writing(f"--out {out}"):
            return _train(cfg, model, data, micro, trainable, out, model_class, dev)
    finally:
        if lock is not None:
            lock.release()
        stack.close()
        if dev.owns_group and not _torchrun_worker():
            dist.destroy_process_group()  # a torchrun worker leaves through run()'s os._exit instead


def _train(cfg: FinetuneConfig, model, data: PackedSequences, micro: int, trainable: List[str], out: Path,
           model_class, dev: Dist) -> Dict[str, object]:
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev.device.type == "cuda" else "fp32")
    torch.manual_seed(cfg.seed)
    model = shard(model, dev, precision)  # fully_shard moves each rank's shards to dev.device
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    meta = _run_meta(cfg, data, dev, getattr(model, "config", None))
    ckpt_root = out / "checkpoints"
    if dev.rank == 0:
        if cfg.overwrite:
            remove_previous_run(out)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for path in clean_stale_in(ckpt_root) + clean_stale_in(out):
            _say(dev, f"note: removed {path.name}, left by a process that was stopped while writing")
    dist.barrier()
    start, resume_from = 0, resolve_resume(cfg.resume, out)
    if resume_from is not None:  # a checkpoint that does not fit is refused before run.json is rewritten
        start = load_checkpoint(resume_from, model, optimizer, scheduler, meta, dev)
        _say(dev, f"resumed from {resume_from} at step {start}")
    elif cfg.resume == "latest":
        _say(dev, f"note: --resume, but {ckpt_root} has no checkpoint yet: starting from step 0")
    if dev.rank == 0:
        atomic_write(out / "run.json", json.dumps({**asdict(cfg), "world_size": dev.world,
                                                  "precision": precision, "trainable": trainable}, indent=1))
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    log, losses = StepLog(cfg, out, start, dev.rank), []
    for step in range(start, end):
        loss, grad_norm = _train_step(model, optimizer, data, step, dev, micro, cfg)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        losses.append(loss)
        log.step(step + 1, loss, lr, grad_norm, data.epoch_of(step + 1), last=step + 1 == end)
        if cfg.save_every > 0 and ((step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps):
            save_checkpoint(ckpt_root, step + 1, model, optimizer, scheduler, meta, dev, cfg.keep_checkpoints)
    log.close()
    exported = None
    if end == cfg.steps:
        exported = export(model, model_class, Path(cfg.model), out / "model", dev)
        _say(dev, f"exported the fine-tuned model to {out / 'model'}")
    else:
        _say(dev, f"stopped after step {end} (--stop-after); continue with --resume")
    dist.barrier()
    return {"losses": losses, "step": end, "export": exported}


def _say(dev: Dist, message: str) -> None:
    if dev.rank == 0:
        print(message, flush=True)


def _train_step(model, optimizer, data: PackedSequences, step: int, dev: Dist, micro: int,
                cfg: FinetuneConfig) -> Tuple[float, float]:
    """One optimizer step over this rank's micro-batches; returns (global mean loss, gradient norm)."""
    accum = cfg.global_batch // (dev.world * micro)
    total = torch.zeros((), device=dev.device)
    for ids in data.batch(step, dev.rank, dev.world, micro):
        ids = ids.to(dev.device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        (loss / accum).backward()  # FSDP2 averages the gradients over ranks
        total += loss.detach() / accum
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    optimizer.step()
    project_importance_(model)  # γ ≥ 0: the importance rate b stays non-negative
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(total)
    return float(total) / dev.world, _scalar(norm)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps ≤ ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short when the run was killed
    atomic_write(path, "".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    d, dflt = FinetuneConfig(model="", data="", out=""), " (default %(default)s)"
    add = parser.add_argument
    add("--model", required=True, help="a metaplastic model directory (e.g. from metaplastic convert)")
    add("--data", required=True, help="token ids (.npy, or .bin of --data-dtype) or a text file (tokenised with "
                                      "the tokenizer saved beside the model)")
    add("--out", required=True, help="run directory: metrics.jsonl, checkpoints/, model/")
    add("--train", choices=TRAIN_CHOICES, default=d.train,
        help="train only the metaplastic path (γ, importance projections, b_scale) or all weights" + dflt)
    add("--steps", type=int, default=d.steps, help="optimizer steps in total" + dflt)
    add("--seq-len", type=int, default=d.seq_len, help="tokens per packed sequence" + dflt)
    add("--global-batch", type=int, default=d.global_batch,
        help="sequences per optimizer step over all ranks; the world size must divide it" + dflt)
    add("--micro-batch", type=int, default=None, help="sequences per forward pass on one rank (default: "
                                                      "global batch / world size, no gradient accumulation)")
    add("--lr", type=float, default=d.lr, help="peak learning rate of AdamW" + dflt)
    add("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="the cosine ends at this fraction of --lr" + dflt)
    add("--warmup", type=int, default=d.warmup, help="linear warm-up steps" + dflt)
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay, matrices only" + dflt)
    add("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm, 0: no clipping" + dflt)
    add("--save-every", type=int, default=d.save_every,
        help="DCP checkpoint every N steps and at the end, 0: none" + dflt)
    add("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="keep the newest N checkpoints, 0: all" + dflt)
    add("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
        help="continue from OUT/checkpoints/latest (or from checkpoint directory CKPT); without a checkpoint "
             "yet, start from step 0")
    add("--log-every", type=int, default=d.log_every, help="print loss and tokens/s every N steps" + dflt)
    add("--seed", type=int, default=d.seed, help="seed of the data order and of torch" + dflt)
    add("--device", choices=("auto", "cpu", "cuda"), default=d.device, help="auto: cuda when available" + dflt)
    add("--precision", choices=("auto", "bf16", "fp32"), default=d.precision,
        help="auto: bf16 parameters with float32 reduction on GPUs, fp32 on CPU" + dflt)
    add("--data-dtype", choices=DTYPES, default=d.data_dtype, help="element type of a .bin file" + dflt)
    add("--stop-after", type=int, default=None, metavar="K",
        help="exit after step K as if preempted (no export); continue later with --resume")
    add("--overwrite", action="store_true",
        help="start afresh in an --out that holds a run: remove its run.json, metrics.jsonl, checkpoints/, model/")
    add("--nproc-per-node", type=int, default=None, metavar="N",
        help="check every input, then start N workers on this machine (as torchrun --standalone would): a user "
             "error is one line and exit code 2, from this command; one machine only (several: torchrun)")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of parsed CLI arguments."""
    fields = FinetuneConfig.__dataclass_fields__
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})


# A torchrun worker other than its node's local rank 0 that meets a user error waits this long before it
# prints: when local rank 0 meets the same error (the usual case: every rank checks the same inputs) it exits
# first and the agent stops the others, so the node's log holds the line once.
PEER_ERROR_GRACE_S = 20.0


def run(args: argparse.Namespace) -> int:
    nproc = getattr(args, "nproc_per_node", None)
    if nproc is not None and _torchrun_worker():
        raise UserError("--nproc-per-node starts workers itself: leave it out under torchrun")
    if nproc is not None:
        return launch(config_from_args(args), nproc, prepare)
    if not _torchrun_worker():
        train(config_from_args(args))
        return 0
    code = 0
    try:
        train(config_from_args(args))
    except (UserError, OSError) as exc:
        code = 2
        try:
            _report_worker_error(exc)
        except KeyboardInterrupt:  # stopped by the agent while waiting for local rank 0, which reported it
            pass
    except Exception as exc:  # noqa: BLE001  (a crash: its traceback, here and in torchrun's error file)
        code = 1
        traceback.print_exc()
        _record_crash(exc)
    # Leave without C++ teardown, whatever the outcome: tearing gloo down at exit sometimes aborted a worker
    # whose job had finished ("terminate called without an active exception", about 1 run in 16 on this
    # machine), and that abort would replace exit code 2 of a user error by a crash.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_worker_error(exc: BaseException) -> None:
    """A worker's user error as the one line the command prints in one process. Under ``--nproc-per-node``
    the worker leaves it to the launcher, which prints it once and exits 2. Under torchrun the worker prints
    it; torchrun itself then reports the worker's exit code 2 in its own words and exits 1 (its launcher does
    so for any failed worker); the line above its report names the problem."""
    message = describe(exc) if isinstance(exc, OSError) else str(exc)
    if under_launcher():
        leave_user_error(message)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        time.sleep(PEER_ERROR_GRACE_S)  # stopped here by the agent when local rank 0 failed too
        message = f"rank {os.environ.get('RANK', '?')}: {message}"
    if not under_launcher():
        print(f"metaplastic finetune: error: {message}", file=sys.stderr, flush=True)


def _record_crash(exc: BaseException) -> None:
    """The exception in torchrun's error file for this worker (``TORCHELASTIC_ERROR_FILE``), which its
    report and the ``--nproc-per-node`` launcher name."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
        with contextlib.suppress(Exception):
            ErrorHandler().record_exception(exc)


def _torchrun_worker() -> bool:
    """True in a process started by torchrun (it sets RANK and LOCAL_RANK)."""
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ
