"""``metaplastic bench convert``: conversion time and peak memory at mamba2-130m shapes (random weights).

Builds a Hugging Face-format checkpoint with the shapes of ``state-spaces/mamba2-130m`` (docs/references.md#mamba2-130m-shapes:
vocab 50288 × 768, 24 layers, 24 heads × 64, N = 128, one group, tied embeddings), then runs, each in a
fresh process so that its peak resident memory is its own:

- ``load+save``: ``safetensors.torch.load_file`` of the checkpoint, then ``save_file`` of the same tensors;
- ``convert``: :func:`metaplastic.convert_mamba2` of the checkpoint.

Reported: wall time of the work (imports excluded; the best of the repeats, which alternate the order of
the two, since disk and page-cache noise dominate on a shared machine), peak RSS (``ru_maxrss``, the largest
over the repeats) and RSS after the imports.
Targets: convert time ≤ 2 × load+save, convert peak RSS ≤ 2.5 × the checkpoint size.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
from tqdm.auto import tqdm

MAMBA2_130M = dict(vocab_size=50288, hidden_size=768, num_hidden_layers=24, num_heads=24, head_dim=64,
                   state_size=128, n_groups=1, expand=2, conv_kernel=4, tie_word_embeddings=True)

_CHILD = r"""
import json, os, resource, sys, time
mode, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
import torch
from safetensors.torch import load_file, save_file
if mode == "convert":
    from metaplastic.models.convert import convert_mamba2
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
before = rss()
t0 = time.perf_counter()
if mode == "convert":
    convert_mamba2(src, out, progress=False)
else:
    state = load_file(os.path.join(src, "model.safetensors"))
    save_file(state, out)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "rss_after_imports": before,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def build_checkpoint(path: Path, seed: int = 0, shapes: Dict[str, object] = MAMBA2_130M) -> int:
    """A random-weight HF Mamba2 checkpoint with ``shapes`` (default mamba2-130m's) in ``path``; returns its
    weight bytes."""
    from transformers import Mamba2Config

    from .checkpoint_io import StreamingSafetensorsWriter
    from .convert import lm_shapes
    from .convert.source_mamba2 import Mamba2Arch, point_config
    path.mkdir(parents=True, exist_ok=True)
    Mamba2Config(**shapes, pad_token_id=0, bos_token_id=0, eos_token_id=0).save_pretrained(path)
    arch = Mamba2Arch(**shapes, use_bias=False, use_conv_bias=True,
                      time_step_limit=(0.0, float("inf")), layer_norm_epsilon=1e-5, residual_in_fp32=True)
    layout = [(name, shape, torch.float32) for name, shape in lm_shapes(point_config(arch)).items()]
    gen = torch.Generator().manual_seed(seed)
    with StreamingSafetensorsWriter(path / "model.safetensors", layout) as writer:
        for name, shape, _ in tqdm(layout, desc="build checkpoint", leave=False):
            writer.write(name, _random_weight(name, shape, gen))
    return writer.total_bytes


def _random_weight(name: str, shape, gen: torch.Generator) -> torch.Tensor:
    """Random values on the scale of Mamba2's initialisation (norms 1, A ∈ [1, 16], Δ ∈ [1e-3, 0.1])."""
    from .common import inverse_softplus
    if name.endswith(("norm.weight", "norm_f.weight", ".D")):
        return torch.ones(shape)
    if name.endswith("A_log"):
        return torch.log(1 + 15 * torch.rand(shape, generator=gen))
    if name.endswith("dt_bias"):
        return inverse_softplus(torch.exp(torch.empty(shape).uniform_(math.log(1e-3), math.log(0.1), generator=gen)))
    if name.endswith("conv1d.bias"):
        return torch.zeros(shape)
    fan_in = shape[-1] if len(shape) == 2 else (shape[-1] if len(shape) == 3 else 1)
    std = 0.02 if "embeddings" in name else fan_in ** -0.5
    return std * torch.randn(shape, generator=gen)


def _run_child(mode: str, src: Path, out: Path) -> Dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else ''}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark(workdir: Path, repeats: int = 3, shapes: Dict[str, object] = MAMBA2_130M) -> Dict[str, object]:
    """Build the checkpoint in ``workdir`` and time ``repeats`` runs of each (best time, largest peak)."""
    import shutil
    src = workdir / "mamba2-random"
    size = build_checkpoint(src, shapes=shapes)
    runs: Dict[str, list] = {"load_save": [], "convert": []}
    for i in tqdm(range(repeats), desc="bench convert"):
        for mode in (("load_save", "convert") if i % 2 == 0 else ("convert", "load_save")):  # alternate order
            out = workdir / ("copy.safetensors" if mode == "load_save" else "converted")
            runs[mode].append(_run_child(mode, src, out))
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    best = {mode: {"seconds": min(r["seconds"] for r in rs), "peak_rss": max(r["peak_rss"] for r in rs),
                   "rss_after_imports": max(r["rss_after_imports"] for r in rs)} for mode, rs in runs.items()}
    conv, base = best["convert"], best["load_save"]
    return {
        "checkpoint_bytes": size, "repeats": repeats, "load_save": base, "convert": conv,
        "time_ratio": conv["seconds"] / base["seconds"],
        "peak_over_size": conv["peak_rss"] / size,
        "peak_above_imports_over_size": (conv["peak_rss"] - conv["rss_after_imports"]) / size,
        "load_save_peak_over_size": base["peak_rss"] / size,
        "targets": {"time_ratio": 2.0, "peak_over_size": 2.5},
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--workdir", help="where to build the checkpoint (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    from metaplastic.errors import UserError
    from metaplastic.safe_io import atomic_write, check_output_location, writing
    if args.repeats < 1:
        raise UserError(f"--repeats must be positive, got {args.repeats}")
    if args.json:
        check_output_location(args.json, what="--json", kind="file")
    if args.workdir:
        check_output_location(args.workdir, what="--workdir", kind="dir")
        with writing(f"--workdir {args.workdir}"):
            Path(args.workdir).mkdir(parents=True, exist_ok=True)
            result = benchmark(Path(args.workdir), args.repeats)
    else:
        with tempfile.TemporaryDirectory(prefix="metaplastic-bench-") as tmp:
            result = benchmark(Path(tmp), args.repeats)
    mb = 1 / 2 ** 20
    c, b = result["convert"], result["load_save"]
    print(f"checkpoint: mamba2-130m shapes, {result['checkpoint_bytes'] * mb:.0f} MiB float32")
    print(f"load+save : {b['seconds']:.2f} s, peak RSS {b['peak_rss'] * mb:.0f} MiB "
          f"({result['load_save_peak_over_size']:.2f}x size)")
    print(f"convert   : {c['seconds']:.2f} s, peak RSS {c['peak_rss'] * mb:.0f} MiB "
          f"(imports alone {c['rss_after_imports'] * mb:.0f} MiB)")
    print(f"time ratio convert / load+save = {result['time_ratio']:.2f} (target <= 2)")
    print(f"peak RSS / checkpoint size     = {result['peak_over_size']:.2f} (target <= 2.5); "
          f"above the imports: {result['peak_above_imports_over_size']:.2f}")
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=2))
    ok = result["time_ratio"] <= 2.0 and result["peak_over_size"] <= 2.5
    return 0 if ok else 1
