"""``metaplastic bench models``: a Mamba2 language model and its metaplastic conversion, timed in one run.

One random-weight Hugging Face Mamba2 checkpoint (default: d_model 256, 4 layers, 8 heads × 64, N = 64,
vocabulary 1024) is run, forward and forward+backward, by

- ``transformers``: transformers' ``Mamba2ForCausalLM`` (the yardstick of every ratio);
- ``mamba2``: our ``MetaplasticForCausalLM`` with ``mamba2`` mixers holding the same weights;
- ``meta_mamba2 b=V``: its conversion (``meta_mamba2``, identity init, b per value channel);
- ``meta_mamba2 b=G<n>``: the conversion with ``importance_groups = n`` (where the mixer has that option).

The models are timed round-robin, rep by rep, after warm-up, with torch pinned to ``--threads`` (default 1);
each figure is the median of ``--reps``. ``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` is the
backward of the mean squared logit. Wall time and process CPU time are both recorded (on a shared machine
the CPU time is the steadier of the two); ``ratio_*`` is a model's time over transformers' in the same run.
The converted models' logits are checked against transformers' (identity init: equal up to rounding).
"""
from __future__ import annotations

import argparse
import datetime
import inspect
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from metaplastic.errors import UserError
from metaplastic.kernels.threads import torch_threads

DEFAULT_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_heads=8, head_dim=64, state_size=64, n_groups=1,
                     expand=2, conv_kernel=4, tie_word_embeddings=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing (default 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs of each model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first (default 1)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--layers", type=int, default=DEFAULT_SHAPE["num_hidden_layers"])
    parser.add_argument("--d-model", type=int, default=DEFAULT_SHAPE["hidden_size"])
    parser.add_argument("--heads", type=int, default=DEFAULT_SHAPE["num_heads"])
    parser.add_argument("--state-size", type=int, default=DEFAULT_SHAPE["state_size"])
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    parser.add_argument("--groups", type=int, nargs="*", default=[1, 8],
                        help="importance_groups values to time besides b per value (default 1 8)")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list to FILE")


# --------------------------------------------------------------------------------------------- models
def _supports_groups() -> bool:
    from .mamba2 import MetaMamba2
    return "importance_groups" in inspect.signature(MetaMamba2.__init__).parameters


def _grouped_copy(converted, groups: int):
    """The converted model with ``importance_groups = groups``: every weight copied, the importance path
    at its identity initialisation."""
    import copy

    from .modeling import MetaplasticForCausalLM
    config = copy.deepcopy(converted.config)
    config.mixer_kwargs = {**config.mixer_kwargs, "importance_groups": groups}
    model = MetaplasticForCausalLM(config)
    state = {key: val for key, val in converted.state_dict().items() if ".importance." not in key}
    model.load_state_dict(state, strict=False)
    return model.eval()


def build_models(workdir: Path, shapes: Dict, groups: Sequence[int], device: str) -> Dict[str, object]:
    """``{label: model}`` (all float32, eval mode, on ``device``) and ``{label: skip reason}`` entries."""
    from .bench import build_checkpoint
    from .convert import converted_model, load_source_model, open_checkpoint, point_model
    build_checkpoint(workdir / "mamba2", shapes=shapes)
    ckpt = open_checkpoint(workdir / "mamba2")
    source, _ = load_source_model(ckpt)
    models: Dict[str, object] = {"transformers": source, "mamba2": point_model(ckpt)}
    rank = min(64, shapes["hidden_size"])
    models["meta_mamba2 b=V"] = converted_model(ckpt, "identity", rank)
    for g in groups:
        label = f"meta_mamba2 b=G{g}"
        if not _supports_groups():
            models[label] = "skipped: this installation's meta_mamba2 has no importance_groups option"
            continue
        try:
            models[label] = _grouped_copy(models["meta_mamba2 b=V"], g)
        except Exception as exc:  # an unsupported group count is reported, not fatal
            models[label] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return {k: (m.to(device) if not isinstance(m, str) else m) for k, m in models.items()}


# --------------------------------------------------------------------------------------------- timing
class _Timer:
    def __init__(self, model, ids: torch.Tensor, device: str) -> None:
        self.model, self.ids, self.device = model, ids, device
        self.times: Dict[str, List[float]] = {"fwd": [], "fwdbwd": [], "fwd_cpu": [], "fwdbwd_cpu": []}

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def fwd(self) -> None:
        with torch.no_grad():
            self.model(self.ids)

    def fwdbwd(self) -> None:
        logits = self.model(self.ids).logits
        logits.float().square().mean().backward()
        self.model.zero_grad(set_to_none=True)

    def once(self, which: str) -> None:
        fn: Callable[[], None] = self.fwd if which == "fwd" else self.fwdbwd
        self._sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self._sync()
        self.times[which].append((time.perf_counter() - wall) * 1e3)
        self.times[which + "_cpu"].append((time.process_time() - cpu) * 1e3)


def _environment(device: str, threads: int) -> Dict[str, object]:
    import transformers
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}",
            "card": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
            "device": device, "dtype": "float32"}


def benchmark(shapes: Dict, batch: int, seq_len: int, groups: Sequence[int], device: str, threads: int,
              reps: int, warmup: int, progress: bool = True) -> List[Dict[str, object]]:
    """Build, check and time the models; one record per model (see the module docstring)."""
    from tqdm.auto import tqdm
    env = _environment(device, threads)
    shape = (f"d_model={shapes['hidden_size']},layers={shapes['num_hidden_layers']},heads={shapes['num_heads']}x"
             f"{shapes['head_dim']},N={shapes['state_size']},vocab={shapes['vocab_size']},B={batch},T={seq_len}")
    with tempfile.TemporaryDirectory(prefix="metaplastic-bench-models-") as tmp, torch_threads(threads):
        models = build_models(Path(tmp), shapes, groups, device)
    ids = torch.randint(0, shapes["vocab_size"], (batch, seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    records: List[Dict[str, object]] = []
    timers: Dict[str, _Timer] = {}
    with torch_threads(threads), torch.no_grad():
        reference = models["transformers"](ids).logits.float()
    for label, model in models.items():
        rec = {"model": label, **env, "shape": shape, "fwd_ms": None, "fwdbwd_ms": None, "fwd_cpu_ms": None,
               "fwdbwd_cpu_ms": None, "max_abs_logit_diff": None, "error": None}
        records.append(rec)
        if isinstance(model, str):
            rec["error"] = model
            continue
        with torch_threads(threads), torch.no_grad():
            rec["max_abs_logit_diff"] = (model(ids).logits.float() - reference).abs().max().item()
        timers[label] = _Timer(model, ids, device)
    bar = tqdm(total=2 * (warmup + reps) * len(timers), desc="bench models", disable=not progress)
    with torch_threads(threads):
        for which in ("fwd", "fwdbwd"):
            for _ in range(warmup):
                for timer in timers.values():
                    (timer.fwd if which == "fwd" else timer.fwdbwd)()
                    bar.update()
            for _ in range(reps):
                for timer in timers.values():
                    timer.once(which)
                    bar.update()
    bar.close()
    for rec in records:
        timer = timers.get(rec["model"])
        if timer is not None:
            for key, values in timer.times.items():
                rec[key + "_ms"] = statistics.median(values)
    base = next(r for r in records if r["model"] == "transformers")
    for rec in records:
        for key in ("fwd", "fwdbwd", "fwd_cpu", "fwdbwd_cpu"):
            mine, ref = rec[key + "_ms"], base[key + "_ms"]
            rec[f"ratio_{key}"] = mine / ref if mine and ref else None
    return records


def format_table(records: List[Dict[str, object]]) -> str:
    """The records as a fixed-width text table."""
    head = (f"{'model':<22} {'fwd ms':>9} {'f+b ms':>9} {'fwd ×tf':>8} {'f+b ×tf':>8} {'cpu fwd ×tf':>12} "
            f"{'cpu f+b ×tf':>12} {'max|Δlogit|':>12}")
    lines = [head, "-" * len(head)]

    def f(x, d=1):
        return "-" if x is None else f"{x:.{d}f}"
    for r in records:
        if r["error"]:
            lines.append(f"{r['model']:<22} {r['error']}")
            continue
        lines.append(f"{r['model']:<22} {f(r['fwd_ms']):>9} {f(r['fwdbwd_ms']):>9} {f(r['ratio_fwd'], 2):>8} "
                     f"{f(r['ratio_fwdbwd'], 2):>8} {f(r['ratio_fwd_cpu'], 2):>12} {f(r['ratio_fwdbwd_cpu'], 2):>12} "
                     f"{r['max_abs_logit_diff']:>12.2e}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    for name in ("threads", "reps", "batch", "seq_len", "layers", "d_model", "heads", "state_size", "vocab"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be non-negative, got {args.warmup}")
    if any(g < 1 for g in args.groups):
        raise UserError(f"--groups must be positive integers, got {args.groups}")
    head_dim = 2 * args.d_model // args.heads
    if head_dim * args.heads != 2 * args.d_model:
        raise UserError(f"--heads={args.heads} must divide 2·d_model = {2 * args.d_model}")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: directory {parent} does not exist")
    shapes = dict(DEFAULT_SHAPE, hidden_size=args.d_model, num_hidden_layers=args.layers, num_heads=args.heads,
                  head_dim=head_dim, state_size=args.state_size, vocab_size=args.vocab)
    records = benchmark(shapes, args.batch, args.seq_len, args.groups, args.device, args.threads, args.reps,
                        args.warmup)
    print(f"\nmetaplastic bench models on {records[0]['card']}, {records[0]['shape']}, {args.threads} thread(s), "
          f"medians of {args.reps}; ×tf = time / transformers' Mamba2ForCausalLM in the same run")
    print(format_table(records))
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(records, indent=1))
        tmp.replace(path)
        print(f"wrote {len(records)} records to {args.json}")
    bad = [r["model"] for r in records if r["max_abs_logit_diff"] is not None and not (r["max_abs_logit_diff"] <= 1e-3)]
    if bad:
        print(f"logits differ from transformers' for: {', '.join(bad)}")
        return 1
    return 0
