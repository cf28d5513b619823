"""metaplastic: one free-energy objective for linear-attention memories (Palimpsa, ICML 2026).

>>> import metaplastic
>>> spec = metaplastic.registry["palimpsa"]
>>> result = metaplastic.scan(spec.objective, q, k, v, log_decay=g, beta=beta, b=b)

The theory (objective, closed forms, registry, reference scan) loads with the package; the model classes
(``MetaplasticConfig``, ``MetaplasticForCausalLM``, ``convert_checkpoint``, ...) are attributes that load
``metaplastic.models`` on first use. Subpackages: ``metaplastic.models`` (mixers, the causal LM, conversion),
``metaplastic.kernels`` (fast paths: ``metaplastic.kernels.dispatch.scan``), ``metaplastic.derivations``
(sympy). See docs/architecture.md for the layout.

``import metaplastic`` imports neither transformers nor the models (the command line starts in the time of
``import torch``). transformers' Auto classes know ``model_type: metaplastic`` as after ``import fla``: once
the program has imported both metaplastic and transformers, in either order,
``AutoModelForCausalLM.from_pretrained(converted_dir)`` works; importing ``metaplastic.models.modeling`` or
any model name above registers too.
"""
import importlib.abc
import importlib.util
import sys
import warnings
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
    _register_auto_classes()  # a model name in use: transformers' Auto classes know the model too
    globals()[name] = value
    return value


# transformers' Auto classes (AutoConfig, AutoModelForCausalLM) resolve ``model_type: metaplastic`` once the
# model is imported (``metaplastic.models.modeling``, or a model name of this package). ``import metaplastic``
# itself imports no transformers (it would cost seconds at every start of the command line); so that
# ``import metaplastic`` followed by ``AutoModelForCausalLM.from_pretrained(converted_dir)`` works as after
# ``import fla``, the model is imported as soon as the program imports transformers (or now, if it has).
def _register_auto_classes() -> None:
    initializing = [name for name, module in list(sys.modules.items()) if name.startswith("metaplastic.models.")
                    and getattr(getattr(module, "__spec__", None), "_initializing", False)]
    if initializing:  # a model module is being imported: it imports the model, which registers itself
        return
    try:
        import_module("metaplastic.models.modeling")
    except Exception as exc:  # pragma: no cover - never break the program's `import transformers`
        warnings.warn(f"metaplastic: could not register with transformers' Auto classes: {exc}", stacklevel=2)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Runs :func:`_register_auto_classes` right after the first ``import transformers`` of the program."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            _register_auto_classes()
        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(finder, _AfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
