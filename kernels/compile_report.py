"""``metaplastic bench compile``: compile every Triton kernel at the benchmark's configurations, no GPU needed.

The configurations are not listed here: :mod:`metaplastic.kernels.launches` records the launches that
``bench kernels --device cuda`` makes (B=8, T=4096, H=16, K=V=128; every registry model, b head-shared,
grouped and per value; bf16 and fp32 inputs; TF32 on), and each distinct (kernel, signature, constexprs,
options) is compiled exactly as Triton's launcher would (its own argument specialisation) for
``GPUTarget("cuda", 90|80, 32)``. Per configuration the report gives, from Triton's cubin and from
``ptxas -v`` run on the PTX with Triton's own flags (its bundled ``ptxas``; ``ptxas-blackwell`` for sm_90a):
registers per thread, spill stores / loads and stack frame (bytes per thread), Triton's shared memory
(bytes per block), the tensor-core instructions in the PTX (``wgmma``, ``mma``), and an occupancy estimate
from those numbers and the target's limits (below). ``--dump DIR`` writes ``<name>.ptx`` beside
``<name>.json`` (its configuration and ptxas command); ``--json FILE`` the report.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple


# Per-SM limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
TARGETS = {
    "sm_90a": dict(capability=90, regs_per_sm=65536, max_regs_per_thread=255, max_warps_per_sm=64,
                   max_blocks_per_sm=32, smem_per_sm=233472, smem_per_block=232448, smem_reserved_per_block=1024,
                   sms={"H100 SXM / H200": 132}),
    "sm_80": dict(capability=80, regs_per_sm=65536, max_regs_per_thread=255, max_warps_per_sm=64,
                  max_blocks_per_sm=32, smem_per_sm=167936, smem_per_block=166912, smem_reserved_per_block=1024,
                  sms={"A100": 108}),
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=tuple(TARGETS), default="sm_90a", help="the GPU target")
    parser.add_argument("--dump", metavar="DIR", help="write each configuration's PTX and JSON into DIR")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these registry models")
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"],
                        help="q, k, v dtypes recorded (default both)")


# ------------------------------------------------------------------------------------------- configurations
@dataclass
class Config:
    """One distinct compilation: a kernel and everything Triton keys its compiled code on."""

    kernel: str
    module: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict
    attrs: Dict
    options: Dict
    grid: Tuple[int, ...]
    used_by: List[str]

    @property
    def key(self) -> str:
        text = json.dumps([self.module, self.kernel, self.signature, _jsonable(self.constexprs),
                           _jsonable(self.attrs), _jsonable(self.options)], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def describe(self) -> Dict:
        names = self.fn.arg_names
        return {"kernel": self.kernel, "module": self.module,
                "constexprs": {names[p[0]]: _jsonable(v) for p, v in self.constexprs.items()},
                "signature": {k: v for k, v in self.signature.items() if v != "constexpr"},
                "num_warps": self.options["num_warps"], "num_stages": self.options["num_stages"],
                "maxnreg": self.options.get("maxnreg"),
                "grid_at_bench_shape": list(self.grid), "used_by": self.used_by}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def configurations(capability: int, models: Optional[Sequence[str]] = None,
                   dtypes: Sequence[str] = ("bfloat16", "float32"), cases=None) -> List[Config]:
    """The distinct compilations of every launch the benchmark makes (``cases``: (model, b kind, backend)
    triples; default :func:`~metaplastic.kernels.launches.bench_cases`), specialised as Triton's launcher
    specialises them for ``capability``."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from . import launches

    backend = make_backend(GPUTarget("cuda", capability, 32))
    cases = launches.bench_cases() if cases is None else cases
    if models:
        cases = [c for c in cases if c[0] in models]
    found: Dict[str, Config] = {}
    for dtype in dtypes:
        for model, b_kind, be in cases:
            rec = launches.record(model, b_kind, be, dtype=getattr(torch, dtype),
                                  capability=(capability // 10, capability % 10))
            for ln in rec.launches:
                kw = dict(ln.kwargs)
                binder = create_function_from_signature(ln.fn.signature, ln.fn.params, backend)
                bound, spec, opts = binder(*ln.args, **kw)
                options, signature, constexprs, attrs = ln.fn._pack_args(backend, kw, bound, spec, opts)
                opt = {"num_warps": options.num_warps, "num_stages": options.num_stages,
                       "enable_fp_fusion": options.enable_fp_fusion}
                if options.maxnreg is not None:  # a register ceiling the launch asks for
                    opt["maxnreg"] = options.maxnreg
                cfg = Config(ln.name, ln.fn.fn.__module__.split(".")[-1], ln.fn, signature, constexprs, attrs, opt,
                             ln.grid, [])
                cfg = found.setdefault(cfg.key, cfg)
                use = f"{model} b={b_kind} {be} {dtype} {ln.phase}"
                if use not in cfg.used_by:
                    cfg.used_by.append(use)
    return list(found.values())


# ------------------------------------------------------------------------------------------- compile + ptxas
def ptxas_path(capability: int) -> str:
    """Triton's bundled ptxas for the target (Triton's own choice: ``ptxas-blackwell`` from sm_90 on)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(capability).path


def ptxas_command(capability: int, arch: str, ptx_file: str, fp_fusion: bool = True) -> List[str]:
    """``ptxas -v`` as Triton runs it on a kernel's PTX (same flags), writing the cubin to /dev/null."""
    fmad = [] if fp_fusion else ["--fmad=false"]
    return [ptxas_path(capability), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
            ptx_file, "-o", os.devnull]


def parse_ptxas(log: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (one kernel)."""
    out = {}
    for key, rx in PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no '{key}':\n{log}")
        out[key] = int(m.group(1))
    return out


def cubin_resources(cubin: bytes, capability: int, tmp: Path) -> Dict[str, int]:
    """Registers and stack of Triton's own cubin (``cuobjdump --dump-resource-usage``)."""
    path = tmp / "kernel.cubin"
    path.write_bytes(cubin)
    tool = str(Path(ptxas_path(capability)).with_name("cuobjdump"))
    text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}


def occupancy(arch: str, registers: int, shared: int, num_warps: int, programs: int) -> Dict:
    """Blocks and warps per SM from registers, shared memory and warps, and the waves of ``programs``."""
    t = TARGETS[arch]
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {"registers": (t["regs_per_sm"] // regs_per_warp) // num_warps,
              "warps": t["max_warps_per_sm"] // num_warps, "blocks": t["max_blocks_per_sm"]}
    if shared:
        limits["shared_memory"] = t["smem_per_sm"] // (shared + t["smem_reserved_per_block"])
    blocks = min(limits.values())
    out = {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
           "occupancy": round(blocks * num_warps / t["max_warps_per_sm"], 4),
           "limited_by": sorted(k for k, v in limits.items() if v == blocks)}
    for card, sms in t["sms"].items():
        out[f"waves_{card}"] = round(programs / max(1, blocks * sms), 3)
    return out


def tensor_core_ops(ptx: str) -> Dict[str, int]:
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma": len(re.findall(r"\bmma\.sync", ptx))}


def compile_one(cfg: Config, arch: str, tmp: Path) -> Tuple[Dict, str]:
    """Compile ``cfg`` for ``arch``; return its report entry and its PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t = TARGETS[arch]
    src = ASTSource(cfg.fn, cfg.signature, cfg.constexprs, cfg.attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", t["capability"], 32),
                            options={k: v for k, v in cfg.options.items()})
    ptx = kernel.asm["ptx"]
    ptx_file = tmp / "kernel.ptx"
    ptx_file.write_text(ptx)
    cmd = ptxas_command(t["capability"], arch, str(ptx_file), cfg.options["enable_fp_fusion"])
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode:
        raise RuntimeError(f"ptxas failed on {cfg.kernel}:\n{log.stderr}")
    res = parse_ptxas(log.stdout + log.stderr)
    cub = cubin_resources(kernel.asm["cubin"], t["capability"], tmp)
    shared = int(kernel.metadata.shared)
    programs = 1
    for g in cfg.grid:
        programs *= g
    entry = dict(cfg.describe(), id=f"{cfg.kernel}-{cfg.key}", arch=arch, **res,
                 cubin_registers=cub["registers"], cubin_stack_bytes=cub["stack_bytes"],
                 shared_bytes=shared, shared_overflow=shared > t["smem_per_block"],
                 register_ceiling=res["registers"] >= t["max_regs_per_thread"],
                 tensor_core=tensor_core_ops(ptx), programs=programs,
                 **occupancy(arch, res["registers"], shared, cfg.options["num_warps"], programs))
    return entry, ptx


def build_report(arch: str, models=None, dtypes=("bfloat16", "float32"), dump: Optional[str] = None,
                 cases=None, progress: bool = True) -> Dict:
    """Compile every configuration for ``arch``; the report as a dict (``kernels``: one entry each)."""
    import tempfile

    import torch
    import triton
    from tqdm.auto import tqdm

    cfgs = configurations(TARGETS[arch]["capability"], models, dtypes, cases)
    entries = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for cfg in tqdm(cfgs, desc=f"compile {arch}", unit="kernel", disable=not progress):
            entry, ptx = compile_one(cfg, arch, tmp)
            entries.append(entry)
            if dump:
                _write_dump(Path(dump), entry, ptx, arch)
    entries.sort(key=lambda e: (e["module"], e["kernel"], e["id"]))
    t = TARGETS[arch]
    return {"command": "metaplastic bench compile --arch " + arch, "arch": arch,
            "date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
            "ptxas": Path(ptxas_path(t["capability"])).name,
            "bench_shape": {"B": 8, "T": 4096, "H": 16, "K": 128, "V": 128},
            "limits": {k: v for k, v in t.items() if k != "capability"},
            "units": "registers per thread; spill and stack bytes per thread; shared bytes per block",
            "kernels": entries,
            "spilling": sorted({e["id"] for e in entries if e["spill_stores"] or e["spill_loads"]}),
            "shared_overflow": sorted({e["id"] for e in entries if e["shared_overflow"]})}


def _write_dump(folder: Path, entry: Dict, ptx: str, arch: str) -> None:
    from metaplastic.safe_io import atomic_write
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{entry['id']}-{arch}"
    atomic_write(folder / f"{name}.ptx", ptx)
    t = TARGETS[arch]
    meta = dict(entry, ptxas=" ".join(ptxas_command(t["capability"], arch, f"{name}.ptx")).replace(
        ptxas_path(t["capability"]), Path(ptxas_path(t["capability"])).name))
    atomic_write(folder / f"{name}.json", json.dumps(meta, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    from metaplastic.safe_io import check_output_location

    from .launches import check_models, rerun_without_interpreter
    if args.json:
        check_output_location(args.json, what="--json", kind="file")
    if args.dump:
        check_output_location(args.dump, what="--dump", kind="dir")
    check_models(args.models)
    argv = ["compile", "--arch", args.arch, "--dtypes", *args.dtypes]
    argv += ["--dump", args.dump] if args.dump else []
    argv += ["--json", args.json] if args.json else []
    argv += ["--models", *args.models] if args.models else []
    rc = rerun_without_interpreter(argv)
    if rc is not None:
        return rc
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, without its warning
    report = build_report(args.arch, args.models, args.dtypes, args.dump)
    print(format_report(report))
    if args.json:
        from metaplastic.safe_io import atomic_write
        atomic_write(args.json, json.dumps(report, indent=1) + "\n")
    return 0


def format_report(report: Dict) -> str:
    lines = [f"{report['command']} (Triton {report['triton']}, {report['ptxas']}); regs/thread, spill "
             "store/load and stack B/thread, shared B/block, occupancy", ""]
    head = f"{'kernel':<28} {'warps':>5} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} " \
           f"{'wgmma':>5} {'mma':>4} {'occ':>5}  used by (first)"
    lines.append(head)
    for e in report["kernels"]:
        lines.append(f"{e['kernel']:<28} {e['num_warps']:>5} {e['registers']:>4} "
                     f"{e['spill_stores']:>5}/{e['spill_loads']:<5} {e['stack_bytes']:>5} {e['shared_bytes']:>6} "
                     f"{e['tensor_core']['wgmma']:>5} {e['tensor_core']['mma']:>4} {e['occupancy']:>5.2f}  "
                     f"{e['used_by'][0]} (+{len(e['used_by']) - 1})")
    lines.append("")
    lines.append(f"spilling: {len(report['spilling'])} of {len(report['kernels'])}; "
                 f"shared-memory overflow: {len(report['shared_overflow'])}")
    return "\n".join(lines)
