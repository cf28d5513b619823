"""Models built on the shared scan: mixers, the causal LM, its cache, and the checkpoint converter
(Mamba2, Gated DeltaNet).

>>> from metaplastic.models import build_mixer, MetaplasticConfig, MetaplasticForCausalLM, convert_mamba2
"""
from .cache import MetaplasticCache
from .configuration import MetaplasticConfig
from .convert import convert_checkpoint, convert_mamba2
from .gated_deltanet import GatedDeltaNet, MetaGatedDeltaNet
from .gla import GLA, MetaGLA
from .importance import ImportancePath, project_importance_
from .longhorn import LongHorn, MetaLongHorn
from .mamba2 import Mamba2, MetaMamba2
from .mesanet import MesaNet
from .mixers import MIXERS, build_mixer
from .modeling import MetaplasticForCausalLM
from .palimpsa import Palimpsa
from .twins import to_metaplastic
from . import register_auto  # noqa: F401  (registers the Auto classes)

__all__ = ["MIXERS", "build_mixer", "to_metaplastic", "MetaplasticCache", "MetaplasticConfig",
           "MetaplasticForCausalLM", "convert_checkpoint", "convert_mamba2", "Mamba2", "MetaMamba2", "Palimpsa",
           "GatedDeltaNet", "MetaGatedDeltaNet", "GLA", "MetaGLA", "MesaNet", "LongHorn", "MetaLongHorn", "ImportancePath",
           "project_importance_"]
