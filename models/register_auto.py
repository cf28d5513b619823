"""Registers ``MetaplasticConfig`` / ``MetaplasticForCausalLM`` with transformers' Auto classes (on import)."""
from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import MetaplasticConfig
from .modeling import MetaplasticForCausalLM


def register() -> None:
    """Idempotent: ``AutoConfig`` / ``AutoModelForCausalLM`` resolve ``model_type: metaplastic``."""
    try:
        AutoConfig.register(MetaplasticConfig.model_type, MetaplasticConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MetaplasticConfig, MetaplasticForCausalLM)
    except ValueError:
        pass


register()
