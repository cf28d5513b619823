"""The Triton launches and torch operations a backend makes at a shape, recorded without a GPU.

:func:`record` runs the benchmark's own call (``metaplastic.kernels.bench``: its inputs, its backend choice,
its ``scale``) on ``meta`` tensors standing for CUDA ones (shapes and dtypes, no memory; ``Tensor.is_cuda``
reads True while recording, so every choice made for CUDA tensors is made; the device's compute capability
reads as the ``capability`` asked for, Hopper's by default, so launch settings chosen by capability are those
of that GPU), once under ``torch.no_grad()``
(the timed forward) and once as a forward and the backward of a sum of the output (the timed
forward+backward). Each ``kernel[grid](...)`` is captured instead of launched, with its grid, arguments and
options; every torch operation is captured with the bytes of its tensor inputs and outputs. The
launches are what :mod:`metaplastic.kernels.compile_report` compiles and :mod:`metaplastic.kernels.traffic`
counts: nothing about block sizes, warps or flags is written twice.

A call that the backend hands to the token-by-token reference is noted, not run. Must run with ``TRITON_INTERPRET`` unset (the interpreter replaces
``@triton.jit`` functions by interpreted ones).
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

BENCH_SHAPE = (8, 4096, 16, 128, 128)   # B, T, H, K, V of `metaplastic bench kernels --device cuda`
BENCH_GROUPS = (4, 8, 16)               # grouped b widths: the benchmark's defaults and the GPU check's
TRITON_MODULES = ("chunk_triton", "per_value", "fused_recurrent", "fused_recurrent_bwd")


@dataclass
class TensorInfo:
    """What a compiled kernel sees of a tensor argument: shape, dtype, byte offset in its storage."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    offset_bytes: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    def data_ptr(self) -> int:  # Triton's specialisation reads the alignment of the pointer
        return (1 << 20) + self.offset_bytes


@dataclass
class Launch:
    """One ``kernel[grid](*args, **kwargs)``: the JIT function, its grid and bound arguments."""

    fn: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    phase: str  # "fwd" (no grad), "fwd+grad" (forward that saves for the backward) or "bwd"

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def bound(self) -> Dict[str, Any]:
        """Every parameter of the kernel by name (positional and keyword, defaults filled in)."""
        names = self.fn.arg_names
        out = dict(zip(names, self.args))
        out.update({k: v for k, v in self.kwargs.items() if k in names})
        for p in self.fn.params:
            if p.name not in out and p.default is not None:
                out[p.name] = p.default
        return out

    def options(self) -> Dict[str, Any]:
        names = set(self.fn.arg_names)
        return {k: v for k, v in self.kwargs.items() if k not in names}


@dataclass
class TorchOp:
    """One torch operation outside the Triton kernels: bytes of its tensor inputs and outputs."""

    name: str
    read: int
    written: int
    phase: str


@dataclass
class Recording:
    """What one (model, b, backend, dtype) case ran, forward and forward+backward."""

    model: str
    b_kind: str
    backend: str
    dtype: str
    shape: Tuple[int, ...]
    launches: List[Launch] = field(default_factory=list)
    ops: List[TorchOp] = field(default_factory=list)
    note: Optional[str] = None


class _ReferenceFallback(Exception):
    """The backend handed the call to the token-by-token reference (no Triton kernel)."""


_VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "transpose", "permute", "t", "select", "slice",
             "unsqueeze", "squeeze", "alias", "as_strided", "detach", "split", "unbind", "diagonal",
             "view_as_real", "view_as_complex", "unfold", "narrow", "lift_fresh", "empty", "empty_like",
             "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop"}


_SHAPE_ONLY_OPS = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "rand_like",
                   "randn_like"}  # read only their input's shape and dtype


class _OpCounter(TorchDispatchMode):
    """Counts the bytes every non-view torch op reads (its tensor inputs; none for an op that reads only their
    shape, such as ``new_zeros``) and writes (its outputs)."""

    def __init__(self, rec: Recording, phase: List[str]) -> None:
        super().__init__()
        self.rec, self.phase = rec, phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEW_OPS and not name.startswith("_assert"):
            def nbytes(x):
                tensors = [t for t in torch.utils._pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
                return sum(t.numel() * t.element_size() for t in tensors)
            read = 0 if name in _SHAPE_ONLY_OPS else nbytes((args, kwargs))
            self.rec.ops.append(TorchOp(name, read, nbytes(out), self.phase[0]))
        return out


@contextlib.contextmanager
def _patched(rec: Recording, phase: List[str], capability: Tuple[int, int]) -> Iterator[None]:
    from triton.runtime.jit import JITFunction

    from metaplastic.kernels import chunk_triton, fused_recurrent, fused_recurrent_bwd, nonfinite, per_value  # noqa: F401

    def fallback(*a, **k):
        raise _ReferenceFallback()

    with _patching() as patch:
        patch(JITFunction, "run", _capturing_run(rec, phase))
        patch(torch.Tensor, "is_cuda", property(lambda self: True))  # meta tensors stand for CUDA ones
        patch(chunk_triton, "device_capability", lambda x: capability)  # ... on a device of this capability
        # the benchmark's inputs are finite: the all-finite test runs (its reductions are recorded), reads true
        patch(nonfinite, "read_on_host", lambda flag: True)
        for mod_name in TRITON_MODULES + ("dispatch", "coverage"):
            mod = sys.modules[f"metaplastic.kernels.{mod_name}"]
            if hasattr(mod, "triton_unavailable_reason"):
                patch(mod, "triton_unavailable_reason", lambda device: None)
            if hasattr(mod, "reference_scan") and mod_name != "dispatch":
                patch(mod, "reference_scan", fallback)
        yield


@contextlib.contextmanager
def _patching() -> Iterator[Any]:
    """Yields ``patch(obj, name, value)``, which sets an attribute until the block ends (restored then, in
    reverse order, whatever happens)."""
    saved: List[Tuple[Any, str, Any]] = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        yield patch
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _capturing_run(rec: Recording, phase: List[str]):
    """A ``JITFunction.run`` that appends the launch to ``rec`` instead of compiling and launching it (a
    callable grid is evaluated on the launch's arguments, as Triton does)."""
    def fake_run(self, *args, grid, warmup, **kwargs):
        info = tuple(_info(a) for a in args)
        kw = {k: _info(v) for k, v in kwargs.items()}
        if callable(grid):
            grid = grid({**dict(zip(self.arg_names, args)), **kwargs})
        rec.launches.append(Launch(self, tuple(int(g) for g in grid), info, kw, phase[0]))
    return fake_run


def _info(x):
    if isinstance(x, torch.Tensor):
        return TensorInfo(tuple(x.shape), x.dtype, x.storage_offset() * x.element_size())
    return x


def record(model: str, b_kind: str, backend: str, dtype: torch.dtype = torch.bfloat16,
           shape: Tuple[int, ...] = BENCH_SHAPE, chunk_size: int = 64, tf32: bool = True,
           capability: Tuple[int, int] = (9, 0)) -> Recording:
    """The launches and torch ops of ``bench kernels``' forward and forward+backward of one case
    (``b_kind``: ``"-"``, ``"H"``, ``"G<n>"`` or ``"V"``), at ``shape`` on meta tensors standing for a GPU of
    compute ``capability`` (Hopper's by default, the benchmark's card)."""
    from metaplastic.kernels import bench

    B, T, H, K, V = shape
    tiny = bench.make_inputs(model, (1, 2, H, K, V), b_kind if b_kind != "-" else "H", "cpu", dtype=dtype)
    rec = Recording(model, b_kind, backend, str(dtype).replace("torch.", ""), shape)
    phase = ["fwd"]
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with _patched(rec, phase, capability):
            x = {key: torch.empty((B, T) + tuple(t.shape[2:]) if t.shape[:2] == (1, 2) else tuple(t.shape),
                                  dtype=t.dtype, device="meta") for key, t in tiny.items()}
            x["prior_precision"] = torch.ones(H, device="meta")  # the default 1.0, as the [H] tensor it becomes
            leaves = {key: t.requires_grad_(key != "prior_precision") for key, t in x.items()}
            run = bench._our_run(model, backend, chunk_size)
            with _OpCounter(rec, phase):
                try:
                    with torch.no_grad():
                        run(x)
                    phase[0] = "fwd+grad"
                    out = run(leaves)
                    phase[0] = "loss"
                    cotangent = torch.ones_like(out)  # the benchmark's loss: a weighted sum of the output
                    phase[0] = "bwd"
                    out.backward(cotangent)
                except _ReferenceFallback:
                    rec.note = "falls back to the token-by-token reference here (no Triton kernel)"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return rec


def bench_cases(shape: Tuple[int, ...] = BENCH_SHAPE, groups=BENCH_GROUPS) -> List[Tuple[str, str, str]]:
    """(model, b kind, backend) of every Triton case ``bench kernels --device cuda`` times at ``shape``
    (every registry model; b head-shared, grouped for each of ``groups``, per value)."""
    import metaplastic
    from metaplastic.kernels import bench

    V = shape[4]
    cases = []
    for name in metaplastic.registry:
        diagonal = metaplastic.registry[name].objective.posterior == "diagonal"
        kinds = ["H"] + [f"G{n}" for n in groups if 1 < n < V and V % n == 0] + ["V"] if diagonal else ["-"]
        for b_kind in kinds:
            for backend in bench._backends(name, "cuda", b_kind, False, V):
                if backend.startswith("triton"):
                    cases.append((name, b_kind, backend))
    return cases


def check_models(models: Optional[List[str]]) -> None:
    """``UserError`` naming the ``--models`` that the registry does not hold (None: every model)."""
    if models:
        import metaplastic
        from metaplastic.errors import UserError
        unknown = [m for m in models if m not in metaplastic.registry]
        if unknown:
            raise UserError(f"unknown model(s) {', '.join(unknown)}")


def rerun_without_interpreter(bench_argv: List[str]) -> Optional[int]:
    """Recording and compiling need Triton's own ``@triton.jit`` functions, which the interpreter replaces:
    when it is on (``TRITON_INTERPRET`` set, or triton already imported under it), run
    ``python -m metaplastic.cli bench *bench_argv`` in a fresh process without it and return its exit status;
    None when this process can record."""
    import os
    import subprocess

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not ("triton" in sys.modules and _interpreted()):
        return None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "metaplastic.cli", "bench", *bench_argv], env=env).returncode


def _interpreted() -> bool:
    from metaplastic.kernels.per_value import _pv_fwd_kernel
    return type(_pv_fwd_kernel).__name__ == "InterpretedFunction"


# fla's autotuned tiles are chosen by timing on the card; the recording takes the largest of its Hopper lists
# (fewest re-reads: the case most favourable to fla). The state kernels tune BK, BV over (32, 64) on a card
# with Hopper's shared memory; the other kernels' tiles follow from the configurations they list.
FLA_HOPPER_STATE_TILE = 64
_FLA_STATE_KERNELS = ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh")


def record_fla(shape: Tuple[int, ...] = BENCH_SHAPE, dtype: torch.dtype = torch.bfloat16) -> Recording:
    """fla's ``chunk_simple_gla`` (the Mamba2 recurrence the benchmark times beside ours) recorded as
    :func:`record` records ours: its forward under ``torch.no_grad()``, then a forward and the backward of a
    sum, on meta tensors standing for a Hopper card (fla's ``check_shared_mem`` answers as a Hopper's). fla's
    autotuned kernels take the largest tiles of their lists (:data:`FLA_HOPPER_STATE_TILE` for the state
    kernels). Inputs as the benchmark gives them: q, k, v ``[B,T,H,K]`` in ``dtype``, the log-decay
    ``[B,T,H]`` fp32."""
    import fla
    import fla.ops.common.chunk_o as fla_chunk_o
    from fla.ops.simple_gla import chunk_simple_gla
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    B, T, H, K, V = shape
    rec = Recording(f"fla {fla.__version__} chunk_simple_gla", "-", "fla", str(dtype).replace("torch.", ""), shape)
    phase = ["fwd"]

    def tuned_run(self, *args, **kwargs):
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        config = max(self.configs, key=lambda c: c.kwargs.get("BK", 0) * c.kwargs.get("BV", 0))
        chosen = dict(config.all_kwargs())
        if fn.fn.__name__ in _FLA_STATE_KERNELS:
            chosen.update(BK=FLA_HOPPER_STATE_TILE, BV=FLA_HOPPER_STATE_TILE)
        return self.fn.run(*args, **{**kwargs, **chosen})

    with _patching() as patch:
        patch(JITFunction, "run", _capturing_run(rec, phase))
        patch(Autotuner, "run", tuned_run)
        patch(torch.Tensor, "is_cuda", property(lambda self: True))
        patch(fla_chunk_o, "check_shared_mem", lambda arch="none", tensor_idx=0: True)  # a Hopper's shared memory
        q, k, v = (torch.empty(B, T, H, d, dtype=dtype, device="meta", requires_grad=True) for d in (K, K, V))
        g = torch.empty(B, T, H, dtype=torch.float32, device="meta", requires_grad=True)
        with _OpCounter(rec, phase):
            with torch.no_grad():
                chunk_simple_gla(q, k, v, g=g)
            phase[0] = "fwd+grad"
            out = chunk_simple_gla(q, k, v, g=g)[0]
            phase[0] = "loss"
            cotangent = torch.ones_like(out)
            phase[0] = "bwd"
            out.backward(cotangent)
    return rec
