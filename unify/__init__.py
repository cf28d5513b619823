"""metaplastic: one free-energy objective for linear-attention memories (Palimpsa, ICML 2026).

>>> import metaplastic
>>> spec = metaplastic.registry["palimpsa"]
>>> result = metaplastic.scan(spec.objective, q, k, v, log_decay=g, beta=beta, b=b)
"""
from .objective import Objective, metaplastic
from .registry import ModelSpec, registry
from .scan import ScanResult, scan

__all__ = ["Objective", "metaplastic", "registry", "ModelSpec", "scan", "ScanResult"]
__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Register MetaplasticConfig / MetaplasticForCausalLM with transformers' Auto classes, if available."""
    try:
        from .models import register_auto  # noqa: F401  (models/ registers on import)
    except ImportError:
        pass


_register_auto_classes()
