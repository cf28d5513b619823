"""The scan every mixer calls: the kernels' dispatcher when it exists, the reference scan until then.

``scan(objective, q, k, v, **kwargs)`` has the signature of :func:`metaplastic.scan`
(layout ``[B, T, H, D]``, value-first state dictionaries). Mixers never write a model's update
themselves: they compute gates and call this.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from metaplastic.objective import Objective
from metaplastic.scan import ScanResult

_impl: Optional[Callable[..., ScanResult]] = None


def _pick() -> Callable[..., ScanResult]:
    """``metaplastic.kernels.scan(..., backend="auto")`` if importable, else ``metaplastic.scan``."""
    try:
        from metaplastic.kernels import scan as kernel_scan  # type: ignore[attr-defined]
    except ImportError:
        kernel_scan = None
    if kernel_scan is None:
        from metaplastic.scan import scan as reference_scan
        return reference_scan

    def auto(objective: Objective, q, k, v, **kwargs: Any) -> ScanResult:
        return kernel_scan(objective, q, k, v, backend="auto", **kwargs)
    return auto


def scan(objective: Objective, q, k, v, **kwargs: Any) -> ScanResult:
    """Run the memory recurrence of ``objective`` (see :func:`metaplastic.scan` for the arguments)."""
    global _impl
    if _impl is None:
        _impl = _pick()
    return _impl(objective, q, k, v, **kwargs)
