"""Per-value Palimpsa on a CPU: one fused C kernel (``cpu_per_value.c``), forward and backward, via ctypes.

It computes exactly what :func:`metaplastic.kernels.chunk_per_value.per_value_scan` computes (the recurrence
is in that module's docstring and at the top of the C source): one (batch, head) pair at a time, token by
token, the ``[V, K]`` states ``M, J`` updated and read in one pass (key column innermost, vectorised), so
nothing of size ``T·V·K`` is materialised. The forward saves the states at every ``C``-th token; the backward
recomputes one chunk of ``C`` tokens from its checkpoint into a small buffer and runs the adjoint recurrence
backwards through it. Single-threaded per call (the ctypes call releases the GIL). Forward and backward are
``torch.library`` custom operators (``metaplastic::per_value_forward``, ``metaplastic::per_value_backward``),
so ``torch.compile`` keeps a model that calls them in one graph.

Build: on first use the source is compiled with the system C compiler (``CC`` of ``sysconfig``, else ``cc``,
else ``gcc``) with :data:`FLAGS` (no ``-ffast-math``: IEEE arithmetic, so NaN and inf propagate) into the
cache folder (``$METAPLASTIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/metaplastic``, else
``~/.cache/metaplastic``), under a name keyed by a hash of the source, compiler, flags and machine. The
library is written beside its final name and renamed in, with a ``.sha256`` file of its contents checked
before every load: a partial or corrupted file is rebuilt, never loaded.

:func:`native_unavailable_reason` says why the kernel cannot run (no compiler, a failed build,
``METAPLASTIC_CPU_KERNEL=0``); callers then use the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor
SOURCE = Path(__file__).with_name("cpu_per_value.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp-simd")
ABI_VERSION = 1
NATIVE_CHUNK = 16  # tokens per checkpoint: the backward recomputes (C+1)·2·V·K numbers at a time
DISABLE_ENV = "METAPLASTIC_CPU_KERNEL"  # "0": never use the kernel
CACHE_ENV = "METAPLASTIC_CACHE_DIR"
_DTYPES = {torch.float32: ("f32", ctypes.c_float), torch.float64: ("f64", ctypes.c_double)}

_LIB: Optional[ctypes.CDLL] = None
_REASON: Optional[str] = None
_TRIED = False


# ------------------------------------------------------------------------------------------- building
def cache_dir() -> Path:
    """The folder of compiled kernels (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaplastic"


def compiler() -> Optional[str]:
    """The C compiler's path: ``sysconfig``'s ``CC``, else ``cc``, else ``gcc`` (None: none found)."""
    cc = sysconfig.get_config_var("CC")
    for name in ([shlex.split(cc)[0]] if cc else []) + ["cc", "gcc"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def _machine() -> str:
    """What ``-march=native`` depends on: the architecture and, on Linux, the CPU model and flags."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    parts.append(line.strip())
                if len(parts) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _key(cc: str) -> str:
    """A hash of the source, the compiler (path and version), the flags and the machine."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), version.encode(), " ".join(FLAGS).encode(),
                 _machine().encode(), str(ABI_VERSION).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _valid(lib_path: Path) -> bool:
    """Whether ``lib_path`` and its ``.sha256`` file exist and agree (checked before loading)."""
    sha = lib_path.with_name(lib_path.name + ".sha256")
    try:
        return sha.read_text().strip() == _digest(lib_path)
    except OSError:
        return False


def _write_beside(final: Path, write) -> None:
    """``write(tmp_path)`` into a fresh file beside ``final``, then rename it in (atomic)."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: str, out: Path) -> None:
    cmd = [cc, *FLAGS, "-o", str(out), str(SOURCE), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")


def build(folder: Optional[Path] = None) -> Path:
    """The compiled library's path, compiling it into ``folder`` (default :func:`cache_dir`) unless a valid
    one is there. ``RuntimeError`` if no compiler exists or the build fails."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (sysconfig CC, cc, gcc)")
    folder = cache_dir() if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / f"cpu_per_value-{_key(cc)}.so"
    if _valid(lib):
        return lib

    def make(tmp: Path) -> None:
        _compile(cc, tmp)
        digest = _digest(tmp)
        _write_beside(lib.with_name(lib.name + ".sha256"), lambda p: p.write_text(digest + "\n"))

    _write_beside(lib, make)
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix, real in _DTYPES.values():
        fwd = getattr(lib, f"pv_forward_{suffix}")
        fwd.argtypes = [i64] * 8 + [ptr] * 8 + [real] + [ptr] * 6
        fwd.restype = None
        bwd = getattr(lib, f"pv_backward_{suffix}")
        bwd.argtypes = [i64] * 8 + [ptr] * 6 + [real] + [ptr] * 14
        bwd.restype = None
    lib.pv_abi_version.restype = ctypes.c_int
    if lib.pv_abi_version() != ABI_VERSION:
        raise RuntimeError(f"the library's ABI version is {lib.pv_abi_version()}, expected {ABI_VERSION}")
    return lib


def load(folder: Optional[Path] = None) -> ctypes.CDLL:
    """Build (or reuse) and load the library (``RuntimeError`` naming why it cannot)."""
    return _bind(ctypes.CDLL(str(build(folder))))


def library() -> Optional[ctypes.CDLL]:
    """The loaded library, built on the first call; None when unavailable (see :func:`native_unavailable_reason`)."""
    global _LIB, _REASON, _TRIED
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    if not _TRIED:
        _TRIED = True
        try:
            _LIB = load()
        except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
            _REASON = f"the CPU per-value kernel could not be built or loaded: {e}"
    return _LIB


@torch.compiler.assume_constant_result  # torch.compile evaluates it once per trace, outside the graph
def native_unavailable_reason() -> Optional[str]:
    """Why the compiled kernel cannot run here (None when it can)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return f"disabled by {DISABLE_ENV}=0"
    return None if library() is not None else _REASON


def native_reason(*xs: Tensor) -> Optional[str]:
    """Why the kernel cannot run on these tensors (None when it can): CPU, one dtype, float32 or float64."""
    reason = native_unavailable_reason()
    if reason is not None:
        return reason
    if any(x.device.type != "cpu" for x in xs):
        return "the CPU per-value kernel needs CPU tensors"
    if len({x.dtype for x in xs}) != 1 or xs[0].dtype not in _DTYPES:
        return f"the CPU per-value kernel needs float32 or float64 tensors of one dtype, got {[x.dtype for x in xs]}"
    return None


# -------------------------------------------------------------------------------------------- calling
def _p(x: Optional[Tensor]):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def _dims(q: Tensor, bv: Tensor, bb: Tensor, g: Tensor, C: int) -> Tuple[int, ...]:
    B, H, T, K = q.shape
    return B * H, H, T, K, bv.shape[-1], bb.shape[-1], g.shape[-1], C


def _forward(q, k, bv, bb, g, M0, J0, Ip, scale: float, C: int, with_var: bool, checkpoints: bool):
    """The kernel's forward on contiguous inputs: ``(o, var or None, M_T, J_T, ckpt or None)``."""
    lib = library()
    suffix, real = _DTYPES[q.dtype]
    B, H, T, K = q.shape
    V = bv.shape[-1]
    o = q.new_empty(B, H, T, V)
    var = q.new_empty(B, H, T, V) if with_var else None
    M_T, J_T = q.new_empty(B, H, V, K), q.new_empty(B, H, V, K)
    ckpt = q.new_empty(B * H, -(-T // C), 2, V, K) if checkpoints else None
    work = q.new_empty(3 * K)
    getattr(lib, f"pv_forward_{suffix}")(*_dims(q, bv, bb, g, C), _p(q), _p(k), _p(bv), _p(bb), _p(g), _p(M0),
                                         _p(J0), _p(Ip), real(scale), _p(o), _p(var), _p(M_T), _p(J_T),
                                         _p(ckpt), _p(work))
    return o, var, M_T, J_T, ckpt


def _contiguous(*xs: Tensor):
    return tuple(x.contiguous() for x in xs)


# The kernel's forward and backward are ``torch.library`` custom operators: ``torch.compile`` traces a call
# to them as one opaque node (its output shapes from the fake implementation) instead of breaking the graph
# at the ctypes call, and autograd reaches the backward through ``register_autograd``.
@torch.library.custom_op("metaplastic::per_value_forward", mutates_args=())
def per_value_forward(q: Tensor, k: Tensor, bv: Tensor, bb: Tensor, g: Tensor, M0: Tensor, J0: Tensor, Ip_h: Tensor,
                      scale: float, C: int, with_var: bool, checkpoints: bool
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The C forward: ``(o [B,H,T,V], var [B,H,T,V] (zeros unless with_var), M_T, J_T [B,H,V,K], ckpt)``;
    ``ckpt`` is ``[B·H, ceil(T/C), 2, V, K]`` with ``checkpoints``, else empty. ``Ip_h``: ``[H]``."""
    q, k, bv, bb, g, M0, J0, Ip_h = _contiguous(q, k, bv, bb, g, M0, J0, Ip_h)
    o, var, M_T, J_T, ckpt = _forward(q, k, bv, bb, g, M0, J0, Ip_h, scale, C, with_var, checkpoints)
    return o, (var if with_var else torch.zeros_like(o)), M_T, J_T, (ckpt if checkpoints else q.new_empty(0))


@per_value_forward.register_fake
def _per_value_forward_fake(q, k, bv, bb, g, M0, J0, Ip_h, scale, C, with_var, checkpoints):
    B, H, T, K = q.shape
    V = bv.shape[-1]
    ckpt = q.new_empty(B * H, -(-T // C), 2, V, K) if checkpoints else q.new_empty(0)
    return (q.new_empty(B, H, T, V), q.new_empty(B, H, T, V), q.new_empty(B, H, V, K), q.new_empty(B, H, V, K),
            ckpt)


@torch.library.custom_op("metaplastic::per_value_backward", mutates_args=())
def per_value_backward(q: Tensor, k: Tensor, bv: Tensor, bb: Tensor, g: Tensor, Ip_h: Tensor, ckpt: Tensor,
                       do: Tensor, dvar: Optional[Tensor], dM_T: Tensor, dJ_T: Tensor, scale: float, C: int
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The C backward from the saved inputs and checkpoints: ``(dq, dk, dbv, dbb, dg, dM0, dJ0, dIp_h [H])``
    (``dvar`` None: the variance was not an output)."""
    B, H, T, K = q.shape
    V = bv.shape[-1]
    suffix, real = _DTYPES[q.dtype]
    do, dM_T, dJ_T = _contiguous(do, dM_T, dJ_T)
    dvar = None if dvar is None else dvar.contiguous()
    dq, dk, dbv, dbb, dg = (torch.empty_like(x) for x in (q, k, bv, bb, g))
    dM0, dJ0 = q.new_empty(B, H, V, K), q.new_empty(B, H, V, K)
    dIp = q.new_empty(B, H)
    work = q.new_empty((C + 1) * 2 * V * K + 7 * K)
    getattr(library(), f"pv_backward_{suffix}")(
        *_dims(q, bv, bb, g, C), _p(q), _p(k), _p(bv), _p(bb), _p(g), _p(Ip_h), real(scale), _p(ckpt),
        _p(do), _p(dvar), _p(dM_T), _p(dJ_T), _p(dq), _p(dk), _p(dbv), _p(dbb), _p(dg), _p(dM0), _p(dJ0),
        _p(dIp), _p(work))
    return dq, dk, dbv, dbb, dg, dM0, dJ0, dIp.sum(0)


@per_value_backward.register_fake
def _per_value_backward_fake(q, k, bv, bb, g, Ip_h, ckpt, do, dvar, dM_T, dJ_T, scale, C):
    B, H, T, K = q.shape
    V = bv.shape[-1]
    return (*(torch.empty_like(x) for x in (q, k, bv, bb, g)), q.new_empty(B, H, V, K), q.new_empty(B, H, V, K),
            q.new_empty(H))


def _setup_context(ctx, inputs, output) -> None:
    q, k, bv, bb, g, M0, J0, Ip_h, scale, C, with_var, checkpoints = inputs
    ctx.save_for_backward(q, k, bv, bb, g, Ip_h, output[4])
    ctx.scale, ctx.C, ctx.with_var = scale, C, with_var


def _backward(ctx, do, dvar, dM_T, dJ_T, dckpt):
    """Gradients of :func:`per_value_forward`'s tensor inputs (the backward builds no graph of its own: a
    second derivative raises, as no autograd formula is registered for :func:`per_value_backward`)."""
    q, k, bv, bb, g, Ip_h, ckpt = ctx.saved_tensors
    grads = per_value_backward(q, k, bv, bb, g, Ip_h, ckpt, do, dvar if ctx.with_var else None, dM_T, dJ_T,
                               ctx.scale, ctx.C)
    return (*grads, None, None, None, None)


per_value_forward.register_autograd(_backward, setup_context=_setup_context)


def native_per_value_scan(q: Tensor, k: Tensor, bv: Tensor, bb: Tensor, g: Tensor, M0: Tensor, J0: Tensor,
                          Ip: Tensor, scale: float, chunk_size: int = NATIVE_CHUNK, with_var: bool = False
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(o, var, M_T, J_T)`` by the C kernel (inputs and outputs as
    :class:`metaplastic.kernels.chunk_per_value.PerValueScan`: ``g [B,H,T,1]`` or ``[B,H,T,K]``, ``bb [B,H,T,1]``
    or ``[B,H,T,V]``, ``Ip [1,H,1,1,1]``; ``var`` zeros unless ``with_var``). The forward keeps checkpoints for
    the backward only when autograd needs them. Needs :func:`native_reason` None."""
    C = max(1, min(int(chunk_size), NATIVE_CHUNK))
    xs = (q, k, bv, bb, g, M0, J0, Ip)
    checkpoints = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    q, k, bv, bb, g, M0, J0 = _contiguous(q, k, bv, bb, g, M0, J0)
    o, var, M_T, J_T, _ = per_value_forward(q, k, bv, bb, g, M0, J0, Ip.reshape(-1).contiguous(), float(scale), C,
                                            bool(with_var), checkpoints)
    return o, var, M_T, J_T
