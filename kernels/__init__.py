"""Fast paths of the memory recurrence: the chunked torch path, Triton kernels, and the dispatcher.

>>> from metaplastic.kernels import scan
>>> result = scan(objective, q, k, v, log_decay=g, beta=beta, b=b, backend="auto")

``scan`` has the signature and result of :func:`metaplastic.scan` plus ``backend`` and ``chunk_size``.
The Triton modules (``fused_recurrent``, ``chunk_triton``) import triton, so they load only when used.
"""
from .chunk import chunk_scan
from .dispatch import BACKENDS, scan, select_backend

__all__ = ["scan", "select_backend", "BACKENDS", "chunk_scan", "fused_recurrent_scan", "chunk_triton_scan"]


def __getattr__(name: str):
    if name == "fused_recurrent_scan":
        from .fused_recurrent import fused_recurrent_scan
        return fused_recurrent_scan
    if name == "chunk_triton_scan":
        from .chunk_triton import chunk_triton_scan
        return chunk_triton_scan
    raise AttributeError(f"module 'metaplastic.kernels' has no attribute {name!r}")
