"""Registers ``MetaplasticConfig`` / ``MetaplasticForCausalLM`` with transformers' Auto classes (on import).

Importing :mod:`metaplastic.models.modeling` does the same (and ``import metaplastic`` does it as soon as the
program imports transformers): this module is the explicit spelling.
"""
from .modeling import register_auto_classes as register

register()
