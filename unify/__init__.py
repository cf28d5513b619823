"""metaplastic: one free-energy objective for linear-attention memories (Palimpsa, ICML 2026).

>>> import metaplastic
>>> spec = metaplastic.registry["palimpsa"]
>>> result = metaplastic.scan(spec.objective, q, k, v, log_decay=g, beta=beta, b=b)
"""
from .errors import UserError
from .objective import Objective, metaplastic
from .readout_solver import ReadoutSolver
from .registry import ModelSpec, registry
from .scan import ScanResult, scan

__all__ = ["UserError", "Objective", "metaplastic", "registry", "ModelSpec", "scan", "ScanResult", "ReadoutSolver"]
__version__ = "0.1.0"


# Registers MetaplasticConfig / MetaplasticForCausalLM with transformers' Auto classes (as ``import fla`` does).
from .models import register_auto  # noqa: E402,F401
