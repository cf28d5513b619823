"""metaplastic: one free-energy objective for linear-attention memories (Palimpsa, ICML 2026).

>>> import metaplastic
>>> spec = metaplastic.registry["palimpsa"]
>>> result = metaplastic.scan(spec.objective, q, k, v, log_decay=g, beta=beta, b=b)

The theory (objective, closed forms, registry, reference scan) loads with the package; the model classes
(``MetaplasticConfig``, ``MetaplasticForCausalLM``, ``convert_checkpoint``, ...) are attributes that load
``metaplastic.models`` on first use. Subpackages: ``metaplastic.models`` (mixers, the causal LM, conversion),
``metaplastic.kernels`` (fast paths: ``metaplastic.kernels.dispatch.scan``), ``metaplastic.derivations``
(sympy). See docs/architecture.md for the layout.
"""
from importlib import import_module

from .errors import UserError
from .objective import Objective, metaplastic
from .readout_solver import ReadoutSolver
from .registry import ModelSpec, registry
from .scan import ScanResult, scan

# Public names of ``metaplastic.models``, by the module that defines them (loaded on first access).
_MODEL_NAMES = {
    "MetaplasticCache": "cache", "MetaplasticConfig": "configuration", "MetaplasticForCausalLM": "modeling",
    "convert_checkpoint": "convert", "convert_mamba2": "convert", "to_metaplastic": "twins",
    "MIXERS": "mixers", "build_mixer": "mixers", "ImportancePath": "importance", "project_importance_": "importance",
    "Mamba2": "mamba2", "MetaMamba2": "mamba2", "Palimpsa": "palimpsa", "GatedDeltaNet": "gated_deltanet",
    "MetaGatedDeltaNet": "gated_deltanet", "GLA": "gla", "MetaGLA": "gla", "MesaNet": "mesanet",
    "LongHorn": "longhorn", "MetaLongHorn": "longhorn",
}

__all__ = ["UserError", "Objective", "metaplastic", "registry", "ModelSpec", "scan", "ScanResult", "ReadoutSolver",
           *_MODEL_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _MODEL_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'metaplastic' has no attribute {name!r}")
    value = getattr(import_module(f"metaplastic.models.{module}"), name)
    globals()[name] = value
    return value


# Registers MetaplasticConfig / MetaplasticForCausalLM with transformers' Auto classes (as ``import fla`` does).
from .models import register_auto  # noqa: E402,F401
