"""LoRA through PEFT on a ``MetaplasticForCausalLM``: which modules to adapt, and a ``LoraConfig`` built from them.

A mixer's projections are its ``nn.Linear`` children outside the importance path (:func:`mixer_projections`):

| mixer | projections (``target_modules``: ``mixer.<name>``) |
|---|---|
| ``mamba2``, ``meta_mamba2`` | ``in_proj``, ``out_proj`` |
| ``gated_deltanet``, ``meta_gated_deltanet`` | ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, ``g_proj`` (with the output gate), ``o_proj`` |
| ``gla``, ``meta_gla`` | ``q_proj``, ``k_proj``, ``v_proj``, ``g_proj`` (with the output gate), ``gk_proj.0``, ``gk_proj.1``, ``o_proj`` |
| ``palimpsa`` | ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``bs_proj``, ``g_proj``, ``o_proj`` |
| ``mesanet`` | ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj``, ``o_proj`` |
| ``longhorn``, ``meta_longhorn`` | ``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` |

The importance path (``mixer.importance``: ``W_b1``, ``W_b2``, ``b_scale``, ``γ``) is not LoRA-adapted: with
``train_importance=True`` PEFT trains it whole (``modules_to_save``), and ``merge_and_unload()`` puts the trained
copy in place. Call :func:`metaplastic.models.importance.project_importance_` after each optimiser step to keep
γ ≥ 0, as ``metaplastic finetune`` does.
"""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from .importance import ImportancePath


def mixer_projections(mixer: nn.Module) -> List[str]:
    """Names (relative to ``mixer``) of its ``nn.Linear`` modules outside its importance path, in module order."""
    inside = {name for name, module in mixer.named_modules() if isinstance(module, ImportancePath)}
    return [name for name, module in mixer.named_modules()
            if isinstance(module, nn.Linear) and not any(name == p or name.startswith(p + ".") for p in inside)]


def lora_target_modules(model: nn.Module, mlp: bool = False) -> List[str]:
    """PEFT ``target_modules`` for ``model`` (a ``MetaplasticForCausalLM``): ``mixer.<projection>`` for every
    projection of its mixers (:func:`mixer_projections`), plus ``mlp.gate_proj``, ``mlp.up_proj``,
    ``mlp.down_proj`` when ``mlp`` and the blocks have an MLP. PEFT matches each as a suffix of a module name."""
    targets: List[str] = []
    for layer in model.backbone.layers:
        for name in mixer_projections(layer.mixer):
            if f"mixer.{name}" not in targets:
                targets.append(f"mixer.{name}")
        if mlp and getattr(layer, "mlp", None) is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                if f"mlp.{name}" not in targets:
                    targets.append(f"mlp.{name}")
    if not targets:
        raise ValueError("the model has no mixer projections to adapt")
    return targets


def lora_config(model: nn.Module, r: int = 8, alpha: int = 16, dropout: float = 0.0, *, mlp: bool = False,
                train_importance: bool = False, target_modules: Optional[List[str]] = None, **kwargs):
    """A ``peft.LoraConfig`` (task ``CAUSAL_LM``) on :func:`lora_target_modules` (or ``target_modules``); with
    ``train_importance`` every importance path trains in full (``modules_to_save=["importance"]``). Other
    keyword arguments go to ``LoraConfig``."""
    from peft import LoraConfig
    if train_importance and not any(isinstance(m, ImportancePath) for m in model.modules()):
        raise ValueError("train_importance=True, but the model has no importance path")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                      target_modules=target_modules or lora_target_modules(model, mlp=mlp),
                      modules_to_save=["importance"] if train_importance else None, **kwargs)
