"""``metaplastic bench kernels``: time forward and forward+backward of every backend for the registry models.

Shapes (``B, T, H, K = V``): CPU 2, 1024, 4, 64; CUDA 8, 4096, 16, 128; ``--quick`` 2, 256, 2, 32 (CPU) and
2, 1024, 4, 64 (CUDA). Each timing is the median of ``--reps`` runs after one warm-up (the CPU reference:
``--ref-reps`` runs, no warm-up; it is slow). ``fwd`` runs under ``torch.no_grad()``; ``fwd+bwd`` is a
forward with autograd and the backward of a weighted sum of the outputs. Ratios are speed-ups over the
reference (autograd through :func:`metaplastic.scan`) and, on CUDA, times relative to fla's
``chunk_simple_gla`` (and ``chunk_gated_delta_rule`` for the delta-rule models) measured in the same run.
``saved B/tok/head``: bytes autograd keeps for the backward beyond the inputs, divided by ``B·T·H``
(counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once).

Models with a diagonal posterior are timed with ``b`` head-shared (``[B,T,H]``, column b = H), grouped
(``[B,T,H,G]`` for each ``--groups G``, default 4 and 16, column b = G<G>) and per value channel
(``[B,T,H,V]``, column b = V); every record carries its group count (``groups``: 1, G or V), the date, the
machine, torch's version and the thread count.
The backends of one model are timed round-robin, rep by rep, so that a change in machine load affects them
alike. ``--cuda-graphs`` captures each backend's forward and forward+backward (gradients by
``torch.autograd.grad``) in a CUDA graph after warm-up and times the replays; each record says
``cuda_graphs``. ``--dtype`` sets q, k, v's dtype (gates stay fp32). On a Hopper GPU with Triton ≥ 3.4 and < 3.7.1,
fla's gated chunk backward refuses to run; the benchmark then lifts that refusal for timing only and says so
in each fla record's ``note`` (its gradients may be wrong there; the times are of the same work).
:func:`targets` turns one run's records into the ratios the GPU kernels aim at (``--targets FILE``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import metaplastic
from metaplastic.errors import UserError
from .threads import torch_threads

from .chunk import unsupported_reason
from .dispatch import scan as dispatch_scan
from .dispatch import per_value_reason, triton_chunk_reason

SHAPES = {("cpu", False): (2, 1024, 4, 64, 64), ("cpu", True): (2, 256, 2, 32, 32),
          ("cuda", False): (8, 4096, 16, 128, 128), ("cuda", True): (2, 1024, 4, 64, 64)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="small shapes and fewer repetitions")
    parser.add_argument("--json", metavar="FILE", help="write the records as a JSON list to FILE")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help="registry models (default: on CPU those with a chunked path, on CUDA all)")
    parser.add_argument("--shape", metavar="B,T,H,K,V", help="override the shape")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per fast backend (default 5, quick 3)")
    parser.add_argument("--ref-reps", type=int, default=None, help="timed runs of the reference (default 3)")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk length of the chunked paths")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads while timing (default: torch's own setting)")
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: allow TF32 matmuls (torch and the chunked Triton kernel), as fla's kernels use")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of q, k, v (the gates stay float32; the kernels compute in float32)")
    parser.add_argument("--groups", type=int, nargs="*", default=None, metavar="G",
                        help="also time diagonal-posterior models with grouped importance b [B,T,H,G] "
                             "(default: 4 and 16 where they divide V; G = 1 and G = V are always timed)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="time only these backends (default: every one that covers the settings)")
    parser.add_argument("--targets", metavar="FILE",
                        help="write the target ratios (per-value, grouped, Mamba2 vs fla) as JSON to FILE")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA: capture each backend's forward and forward+backward in a CUDA graph and time "
                             "its replays (launch overhead removed)")
    parser.add_argument("--reference", choices=("auto", "yes", "no"), default="auto",
                        help="time the token-by-token reference (auto: on CPU, and on CUDA with --quick)")


# ------------------------------------------------------------------------------------------- inputs
def make_inputs(name: str, shape: Tuple[int, ...], b_kind: str, device: str, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Dict:
    """Random valid inputs for registry entry ``name`` (unit-norm q, k; decays in [0.9, 1)); q, k, v in
    ``dtype``, the gates in fp32. ``b_kind``: ``"H"`` (``b [B,T,H]``), ``"V"`` (``[B,T,H,V]``) or ``"G<n>"``
    (``[B,T,H,n]``, grouped importance)."""
    spec = metaplastic.registry[name]
    obj = spec.objective
    B, T, H, K, V = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*s):
        return torch.rand(*s, generator=gen)

    x = {"q": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
         "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
         "v": torch.randn(B, T, H, V, generator=gen)}
    if obj.forgetting != "none":
        x["log_decay"] = torch.log(0.9 + 0.0999 * rand(*((B, T, H, K) if obj.forgetting == "vector" else (B, T, H))))
    x["beta"] = rand(B, T, H, V) if spec.beta_per_value else rand(B, T, H)
    if obj.posterior == "diagonal":
        x["b"] = rand(B, T, H) if b_kind == "H" else rand(B, T, H, V if b_kind == "V" else int(b_kind[1:]))
    if obj.posterior == "full":
        x["lam"] = 0.25 + F.softplus(torch.randn(H, K, generator=gen))
    for key in ("q", "k", "v"):
        x[key] = x[key].to(dtype)
    return {key: val.to(device) for key, val in x.items()}


# ------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _Timer:
    """fwd and fwd+bwd closures of one backend on one input set, timed rep by rep (interleaved with the
    other backends of the same model, so that a change of machine load hits all of them alike)."""

    def __init__(self, run: Callable[[Dict], torch.Tensor], inputs: Dict, device: str,
                 cuda_graphs: bool = False) -> None:
        self.run, self.inputs, self.device = run, inputs, device
        self.leaves = {key: val.detach().clone().requires_grad_(val.is_floating_point())
                       for key, val in inputs.items()}
        self.weight: Optional[torch.Tensor] = None
        self.times: Dict[str, List[float]] = {}  # fwd_ms, fwdbwd_ms (eager) and graph_fwd_ms, graph_fwdbwd_ms
        self.cuda_graphs = cuda_graphs
        self.replays: Dict[str, Callable[[], None]] = {}

    def fwd(self) -> None:
        with torch.no_grad():
            self.run(self.inputs)

    def fwdbwd(self) -> None:
        out = self.run(self.leaves)
        if self.weight is None:
            self.weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        if self.cuda_graphs:  # the same work, gradients as fresh tensors (a capture cannot reset .grad)
            leaves = [t for t in self.leaves.values() if t.requires_grad]
            torch.autograd.grad((out * self.weight).sum(), leaves, allow_unused=True)
            return
        (out * self.weight).sum().backward()
        for t in self.leaves.values():
            t.grad = None

    def capture(self) -> None:
        """With ``cuda_graphs``: record fwd and fwd+bwd into CUDA graphs (after warm-up runs on a side
        stream, as a capture requires); :meth:`once` can then time their replays."""
        if not self.cuda_graphs:
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fwd()
                self.fwdbwd()
        torch.cuda.current_stream().wait_stream(side)
        for which, fn in (("fwd", self.fwd), ("fwdbwd", self.fwdbwd)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            self.replays[which] = graph.replay

    def saved_bytes(self) -> int:
        """Bytes of the storages autograd saves for the backward, other than the inputs' own."""
        exclude = {t.untyped_storage().data_ptr() for t in self.leaves.values()}
        seen: Dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in exclude:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.run(self.leaves)
        del out
        return sum(seen.values())

    def once(self, which: str, graph: bool = False) -> None:
        """Time one run of ``which`` (``"fwd"`` or ``"fwdbwd"``): eager, or the replay of its CUDA graph."""
        fn = self.replays[which] if graph else (self.fwd if which == "fwd" else self.fwdbwd)
        _sync(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        key = ("graph_" if graph else "") + which + "_ms"
        self.times.setdefault(key, []).append((time.perf_counter() - start) * 1e3)


def _time_group(records: List[Dict], timers: List[_Timer], reps: List[int], warmups: List[int], bar) -> None:
    """Warm up, count saved bytes, capture CUDA graphs (``--cuda-graphs``), then time ``reps[i]`` runs of each
    timer, round-robin (eager, then the graph's replay); fill ``records``."""
    alive = []
    for rec, timer, warmup in zip(records, timers, warmups):
        try:
            for _ in range(warmup):
                timer.fwd()
                timer.fwdbwd()
            rec["saved_bytes_per_token_head"] = timer.saved_bytes() / rec.pop("_tokens_heads")
        except Exception as exc:  # a backend that fails is reported, not fatal
            rec.pop("_tokens_heads", None)
            rec["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
            alive.append(False)
            if timer.device == "cuda":
                torch.cuda.empty_cache()
            continue
        try:
            timer.capture()
        except Exception as exc:  # noqa: BLE001  (eager times still stand; the record says why no graph)
            timer.replays.clear()
            rec["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        alive.append(True)
    for which in ("fwd", "fwdbwd"):
        for rep in range(max(reps)):
            for ok, timer, n in zip(alive, timers, reps):
                if ok and rep < n:
                    timer.once(which)
                    if which in timer.replays:
                        timer.once(which, graph=True)
    for ok, rec, timer in zip(alive, records, timers):
        if ok:
            rec.update({key: statistics.median(ms) for key, ms in timer.times.items()})
        bar.update()


# ------------------------------------------------------------------------------------------- backends
def _backends(name: str, device: str, b_kind: str, reference: bool, V: int) -> List[str]:
    obj = metaplastic.registry[name].objective
    out = ["reference"] if reference and (device == "cpu" or not b_kind.startswith("G")) else []
    if unsupported_reason(obj) is None:
        out.append("chunk")
    if device == "cuda":
        b = None if b_kind in ("H", "-") else torch.empty(1, 1, 1, V if b_kind == "V" else int(b_kind[1:]))
        if triton_chunk_reason(obj, b, None, V=V) is None:
            out.append("triton_chunk")
        elif b_kind == "V" and per_value_reason(obj) is None:
            out.append("triton_per_value")
        out.append("triton_recurrent")
    return out


def _our_run(name: str, backend: str, chunk_size: int) -> Callable[[Dict], torch.Tensor]:
    spec = metaplastic.registry[name]

    def run(x: Dict) -> torch.Tensor:
        return dispatch_scan(spec.objective, **x, scale=spec.scale_for(x["q"].shape[-1]), backend=backend,
                             chunk_size=chunk_size).output
    return run


def fla_hopper_guard_bypass() -> Optional[str]:
    """fla 0.6 refuses its gated chunk backward on Hopper with Triton ≥ 3.4 and < 3.7.1 (a miscompile of
    ``chunk_bwd_dqkwg``; the forward is fine). For timing only, lift that refusal (the module flag
    ``fla.ops.common.chunk_o.TRITON_ABOVE_3_7_1``) when the installed Triton needs it, and return the note to
    record beside the figures (None when nothing was changed)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0
    except Exception:
        return None
    if chunk_o.TRITON_ABOVE_3_7_1 or not (IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0):
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True
    import triton
    return (f"fla's Hopper guard lifted for timing (Triton {triton.__version__} < 3.7.1): its gated chunk "
            "backward ran the same work with possibly wrong gradients; times only")


def _fla_runs(shape: Tuple[int, ...], device: str, dtype: torch.dtype = torch.float32
              ) -> List[Tuple[str, Callable[[Dict], torch.Tensor], Dict]]:
    """fla's chunk kernels (CUDA only), when importable: (label, run, inputs)."""
    runs = []
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        x = make_inputs("simple_gla", shape, "H", device, dtype=dtype)
        runs.append(("fla chunk_simple_gla", lambda x: chunk_simple_gla(x["q"], x["k"], x["v"], g=x["log_decay"])[0],
                     {key: x[key] for key in ("q", "k", "v", "log_decay")}))
    except Exception:  # pragma: no cover - needs CUDA and fla
        pass
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        x = make_inputs("gated_deltanet", shape, "H", device, dtype=dtype)
        runs.append(("fla chunk_gated_delta_rule",
                     lambda x: chunk_gated_delta_rule(x["q"], x["k"], x["v"], g=x["log_decay"], beta=x["beta"])[0],
                     {key: x[key] for key in ("q", "k", "v", "log_decay", "beta")}))
    except Exception:  # pragma: no cover
        pass
    return runs


# ------------------------------------------------------------------------------------------- the command
def _parse_shape(text: Optional[str], device: str, quick: bool) -> Tuple[int, ...]:
    if text is None:
        return SHAPES[(device, quick)]
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UserError(f"--shape must be five integers B,T,H,K,V, got {text!r}") from None
    if len(shape) != 5 or min(shape) < 1:
        raise UserError(f"--shape must be five positive integers B,T,H,K,V, got {text!r}")
    return shape


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    shape = _parse_shape(args.shape, device, args.quick)
    reps = args.reps if args.reps is not None else (3 if args.quick else 5)
    ref_reps = args.ref_reps if args.ref_reps is not None else 3
    if reps < 1 or ref_reps < 1:
        raise UserError("--reps and --ref-reps must be at least 1")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be positive, got {args.chunk_size}")
    if args.models:
        unknown = [m for m in args.models if m not in metaplastic.registry]
        if unknown:
            raise UserError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(metaplastic.registry)}")
        models = list(args.models)
    elif device == "cpu":
        models = [m for m, s in metaplastic.registry.items() if unsupported_reason(s.objective) is None]
    else:
        models = list(metaplastic.registry)
    if args.cuda_graphs and device != "cuda":
        raise UserError("--cuda-graphs needs --device cuda (CUDA graphs exist on a GPU only)")
    if args.tf32 and device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = getattr(torch, args.dtype)
    dtype_label = args.dtype
    if args.groups is None:
        args.groups = [g for g in (4, 16) if shape[4] % g == 0]
    if any(g < 1 or shape[4] % g for g in args.groups):
        raise UserError(f"--groups must divide V = {shape[4]}, got {args.groups}")
    reference = args.reference == "yes" or (args.reference == "auto" and (device == "cpu" or args.quick))
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    if args.json:
        from metaplastic.safe_io import check_output_location
        check_output_location(args.json, what="--json", kind="file")
    threads = args.threads or torch.get_num_threads()
    card = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({threads} torch threads)"
    B, T, H, K, V = shape
    shape_str = f"B={B},T={T},H={H},K={K},V={V}"

    jobs = []
    for name in models:
        diagonal = metaplastic.registry[name].objective.posterior == "diagonal"
        kinds = ["H"] + [f"G{n}" for n in args.groups if 1 < n < V] + ["V"] if diagonal else ["-"]
        for b_kind in kinds:
            for backend in _backends(name, device, b_kind, reference, V):
                if args.backends is None or backend in args.backends:
                    jobs.append((name, b_kind, backend))
    externals = []
    if device == "cuda":
        fla_note = fla_hopper_guard_bypass()
        externals = _fla_runs(shape, device, dtype)

    records: List[Dict] = []
    bar = tqdm(total=len(jobs) + len(externals), desc="bench kernels", unit="run")
    with torch_threads(args.threads):
        for label, fn, x in externals:
            bar.set_postfix_str(label)
            rec = _new_record(label, "external", "-", device, card, shape_str, B * T * H, dtype_label)
            if label.startswith("fla") and fla_note:
                rec["note"] = fla_note
            _time_group([rec], [_Timer(fn, x, device, args.cuda_graphs)], [reps], [1], bar)
            records.append(rec)
        groups: Dict[Tuple[str, bool], List[str]] = {}
        for name, b_kind, backend in jobs:
            groups.setdefault((name, b_kind), []).append(backend)
        for (name, b_kind), backends in groups.items():
            x = make_inputs(name, shape, b_kind, device, dtype=dtype)
            bar.set_postfix_str(name + (f" b={b_kind}" if "b" in x else ""))
            b_col = b_kind if "b" in x else "-"
            recs = [_new_record(name, be, b_col, device, card, shape_str, B * T * H, dtype_label,
                                groups_of(b_col, V)) for be in backends]
            timers = [_Timer(_our_run(name, be, args.chunk_size), x, device, args.cuda_graphs and be != "reference")
                      for be in backends]
            slow = [be == "reference" for be in backends]
            _time_group(recs, timers, [ref_reps if s_ else reps for s_ in slow],
                        [0 if s_ and device == "cpu" else 1 for s_ in slow], bar)
            records.extend(recs)
    bar.close()
    _add_ratios(records)
    print(f"\nmetaplastic bench kernels on {card}, {shape_str}, {args.dtype}, medians of {reps} runs "
          f"(reference: {ref_reps})" + (", CUDA-graph replays" if args.cuda_graphs else ""))
    print(format_table(records))
    summary = targets(records)
    if summary:
        print("\n" + format_targets(summary, device))
    if args.targets:
        try:
            with open(args.targets, "w") as fh:
                json.dump(summary, fh, indent=1)
        except OSError as exc:
            raise UserError(f"cannot write --targets {args.targets}: {exc.strerror}") from None
    if args.json:
        from metaplastic.safe_io import atomic_write
        atomic_write(args.json, json.dumps(records, indent=1))
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def groups_of(b_kind: str, V: int) -> Optional[int]:
    """The importance-group count of a ``b`` column: ``H`` 1, ``G<n>`` n, ``V`` V, ``-`` None."""
    return {"H": 1, "V": V, "-": None}.get(b_kind, int(b_kind[1:]) if b_kind.startswith("G") else None)


def _machine() -> str:
    """The CPU model (Linux) and architecture, for the records."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _new_record(model: str, backend: str, b: str, device: str, card: str, shape: str, tokens_heads: int,
                dtype_label: str = "float32", groups: Optional[int] = None) -> Dict:
    return {"model": model, "backend": backend, "b": b, "groups": groups, "device": device, "card": card,
            "shape": shape, "machine": _machine(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dtype": dtype_label + ("+tf32" if device == "cuda" and torch.backends.cuda.matmul.allow_tf32 else ""),
            "threads": torch.get_num_threads(), "cpu_kernel": _cpu_kernel(device), "fwd_ms": None,
            "fwdbwd_ms": None, "saved_bytes_per_token_head": None, "error": None, "_tokens_heads": tokens_heads}


def _cpu_kernel(device: str) -> Optional[str]:
    """On a CPU: ``"on"`` when the fused C kernel (``kernels/cpu_per_value.py``) builds, so the ``chunk``
    backend runs per-value ``b`` on it, and grouped ``b`` too at K·V ≤ 4096; else why it does not."""
    if device != "cpu":
        return None
    from .cpu_per_value import native_unavailable_reason
    return native_unavailable_reason() or "on"


def _add_ratios(records: List[Dict]) -> None:
    """``speedup_*``: reference time / this time (same model and b); ``vs_fla_*``: this time / fla's."""
    ref = {(r["model"], r["b"]): r for r in records if r["backend"] == "reference" and r["error"] is None}
    fla = {r["model"]: r for r in records if r["backend"] == "external" and r["error"] is None}
    delta = metaplastic.registry["gated_deltanet"].objective.likelihood
    for r in records:
        base = ref.get((r["model"], r["b"]))
        for key in ("fwd_ms", "fwdbwd_ms"):
            r[f"speedup_{key[:-3]}"] = (base[key] / r[key] if base and r[key] else None)
        if r["backend"] == "external":
            continue
        obj = metaplastic.registry[r["model"]].objective
        other = fla.get("fla chunk_gated_delta_rule" if obj.likelihood == delta else "fla chunk_simple_gla")
        for key in ("fwd_ms", "fwdbwd_ms"):
            r[f"vs_fla_{key[:-3]}"] = (r[key] / other[key] if other and r[key] else None)


def targets(records: List[Dict]) -> List[Dict]:
    """The figures the GPU kernels aim at, from one run's records: fwd+bwd time ratios (and the per-value
    path's saved bytes per token and head), each with its target and whether it was met (None: not measured)."""
    def find(model, backend, b="-"):
        for r in records:
            if r["model"] == model and r["backend"] == backend and r["b"] == b and r["error"] is None:
                return r
        return None

    def ratio(a, b, key="fwdbwd_ms"):
        return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None

    mamba2 = find("mamba2", "triton_chunk")
    fla = find("fla chunk_simple_gla", "external")
    per_value = find("palimpsa", "triton_per_value", "V")
    out = [("per-value Palimpsa saved bytes / token / head", per_value and per_value["saved_bytes_per_token_head"],
            2048)]
    graphs = any(r.get("graph_fwdbwd_ms") for r in records)
    for key, label in (("fwdbwd_ms", ""), ("graph_fwdbwd_ms", ", CUDA graphs"))[:2 if graphs else 1]:
        out += [(f"per-value Palimpsa fwd+bwd ÷ Mamba2 chunked (ours){label}", ratio(per_value, mamba2, key), 3.0),
                (f"Mamba2 chunked fwd+bwd ÷ fla chunk_simple_gla{label}", ratio(mamba2, fla, key), 1.25),
                (f"Palimpsa b [B,T,H] (G = 1) fwd+bwd ÷ Mamba2 chunked{label}",
                 ratio(find("palimpsa", "triton_chunk", "H"), mamba2, key), 1.3)]
        for r in records:
            if r["model"] == "palimpsa" and r["backend"] == "triton_chunk" and r["b"].startswith("G"):
                out.append((f"Palimpsa grouped G = {r['b'][1:]} fwd+bwd ÷ Mamba2 chunked{label}",
                            ratio(r, mamba2, key), 2.5 if r["b"] == "G8" else None))
    return [{"name": name, "value": value, "target": target,
             "met": None if value is None or target is None else bool(value <= target)}
            for name, value, target in out]


def format_targets(summary: List[Dict], device: str) -> str:
    """:func:`targets` as text: one line per figure with its value, target and verdict (met / missed); a
    figure that was not measured says so (the targets compare GPU kernels: on a CPU none is measured)."""
    if all(t["value"] is None for t in summary):
        where = "on a CPU" if device == "cpu" else "in this run"
        return (f"targets: not measured {where} (they compare the Triton kernels with each other and with fla "
                "on a GPU: metaplastic bench kernels --device cuda)")
    lines = ["targets:"]
    for t in summary:
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        target = "no target" if t["target"] is None else f"target ≤ {t['target']:g}"
        verdict = {True: "met", False: "missed", None: ""}[t["met"]]
        lines.append(f"  {t['name']:<58s} {value:>12s}  ({target})  {verdict}".rstrip())
    return "\n".join(lines)


def format_table(records: List[Dict]) -> str:
    """The records as a fixed-width text table."""
    cols = [("model", 20), ("b", 2), ("backend", 17), ("fwd ms", 9), ("fwd+bwd ms", 11), ("fwd ×ref", 9),
            ("f+b ×ref", 9), ("÷fla f+b", 9), ("saved B/tok/head", 17)]
    graphs = any(r.get("graph_fwdbwd_ms") for r in records)
    if graphs:
        cols += [("graph fwd ms", 13), ("graph f+b ms", 13)]

    def fmt(x, digits=1):
        if x is None:
            return "-"
        return f"{x:.{digits}f}" if x < 1000 else f"{x:.0f}"

    lines = ["  ".join(f"{name:>{w}}" if i >= 3 else f"{name:<{w}}" for i, (name, w) in enumerate(cols))]
    lines.append("-" * len(lines[0]))
    for r in records:
        if r["error"]:
            cells = [r["model"], r["b"], r["backend"], "error: " + r["error"]]
            lines.append("  ".join(f"{c:<{w}}" for c, (_, w) in zip(cells[:3], cols)) + "  " + cells[3])
            continue
        cells = [r["model"], r["b"], r["backend"], fmt(r["fwd_ms"]), fmt(r["fwdbwd_ms"]),
                 fmt(r.get("speedup_fwd"), 2), fmt(r.get("speedup_fwdbwd"), 2), fmt(r.get("vs_fla_fwdbwd"), 2),
                 fmt(r["saved_bytes_per_token_head"], 0)]
        if graphs:
            cells += [fmt(r.get("graph_fwd_ms")), fmt(r.get("graph_fwdbwd_ms"))]
        lines.append("  ".join(f"{c:>{w}}" if i >= 3 else f"{c:<{w}}"
                               for i, (c, (_, w)) in enumerate(zip(cells, cols))))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
