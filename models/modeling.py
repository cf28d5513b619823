"""``MetaplasticForCausalLM``: embeddings → pre-norm residual blocks (a mixer, optionally an MLP) → norm → head.

The state-dict layout is Hugging Face Mamba2's (``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``,
``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight``, ``lm_head.weight``), so converting a Mamba2
checkpoint is a copy plus the new keys of the metaplastic path. ``generate()`` decodes token by token
through :class:`MetaplasticCache`; a left-padded batch (``attention_mask`` with zeros) decodes each row as
that prompt alone, because every mixer leaves its states unchanged at padded tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .cache import MetaplasticCache
from .common import RMSNorm
from .configuration import MetaplasticConfig
from .importance import ImportancePath, getattr_path
from .mixers import build_mixer

try:  # transformers >= 4.52: gradient_checkpointing_enable() checkpoints each block's forward
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = nn.Module


@dataclass
class MetaplasticCausalLMOutput(ModelOutput):
    """``logits [B, T, vocab]`` (float32), ``loss`` when labels were given, ``cache`` when ``use_cache``."""

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    cache: Optional[MetaplasticCache] = None


class GatedMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) ∘ up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MetaplasticBlock(GradientCheckpointingLayer):
    """``h + mixer(norm(h))``, then ``h + mlp(mlp_norm(h))`` when the config has an MLP."""

    def __init__(self, config: MetaplasticConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = build_mixer(config.mixer_for(layer_idx), config.hidden_size,
                                 **config.mixer_kwargs_for(layer_idx))
        self.mlp = None
        if config.intermediate_size:
            self.mlp_norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, cache: Optional[MetaplasticCache] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        mixed = self.mixer(self.norm(hidden_states.to(self.norm.weight.dtype)), cache=cache, layer_idx=self.layer_idx,
                           attention_mask=attention_mask)
        hidden_states = residual + mixed
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.mlp_norm(hidden_states.to(self.mlp_norm.weight.dtype)))
        return hidden_states


class MetaplasticModel(nn.Module):
    """The backbone: ``embeddings``, ``layers``, ``norm_f``."""

    def __init__(self, config: MetaplasticConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MetaplasticBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: Optional[torch.LongTensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                cache: Optional[MetaplasticCache] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attention_mask [B, T]``: 0 marks padding, which leaves every layer's states unchanged."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, cache=cache, attention_mask=attention_mask)
        return self.norm_f(hidden_states)


class MetaplasticPreTrainedModel(PreTrainedModel):
    """transformers' default initialisation for linear, embedding and norm weights; the mixers' own parameters
    (A_log, dt_bias, D, γ, ...) keep the values their constructors gave them."""

    config_class = MetaplasticConfig
    config: MetaplasticConfig
    base_model_prefix = "backbone"
    _no_split_modules = ["MetaplasticBlock"]
    _is_stateful = True
    supports_gradient_checkpointing = GradientCheckpointingLayer is not nn.Module

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' default, then each importance path redrawn from its own law (children are visited
        first, so this wins over the default ``Linear`` init; loaded tensors are left alone)."""
        super()._init_weights(module)
        if isinstance(module, ImportancePath):
            from transformers import initialization as init
            for name, value in module.init_values(module.init).items():
                init.copy_(getattr_path(module, name), value.to(getattr_path(module, name).dtype))


class MetaplasticForCausalLM(MetaplasticPreTrainedModel, GenerationMixin):
    """Causal LM over :class:`MetaplasticModel`; ``logits [B, T, vocab_size]`` in float32."""

    _tied_weights_keys = {"lm_head.weight": "backbone.embeddings.weight"}

    def __init__(self, config: MetaplasticConfig) -> None:
        super().__init__(config)
        self.backbone = MetaplasticModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.backbone.embeddings = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model creates its own MetaplasticCache

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, cache: Optional[MetaplasticCache] = None,
                                      inputs_embeds: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None,
                                      attention_mask: Optional[torch.Tensor] = None, **kwargs) -> dict:
        """After the prompt, feed only the newest token: the cache holds everything before it."""
        if cache is not None and cache.seen_tokens > 0:
            return {"input_ids": input_ids[:, -1:], "cache": cache, "use_cache": use_cache}
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        return {**inputs, "cache": cache, "use_cache": use_cache, "attention_mask": attention_mask}

    def forward(self, input_ids: Optional[torch.LongTensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                cache: Optional[MetaplasticCache] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, attention_mask: Optional[torch.Tensor] = None,
                return_dict: Optional[bool] = None, logits_to_keep: int = 0, **kwargs) -> MetaplasticCausalLMOutput:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab_size]``; with ``use_cache`` the state comes back in
        ``cache``. ``labels`` gives the shifted next-token cross-entropy. ``attention_mask [B, T]`` (or longer:
        its last T columns are used): a 0 marks a padded token, which leaves every state unchanged, so each row
        of a left-padded batch computes what that row alone computes (logits at padded positions mean nothing)."""
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = MetaplasticCache()
        hidden_states = self.backbone(input_ids, inputs_embeds, cache=cache if use_cache else None,
                                      attention_mask=attention_mask)
        if use_cache:
            cache.seen_tokens += hidden_states.shape[1]
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return MetaplasticCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None)


def register_auto_classes() -> None:
    """Idempotent: transformers' ``AutoConfig`` and ``AutoModelForCausalLM`` resolve ``model_type: metaplastic``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    AutoConfig.register(MetaplasticConfig.model_type, MetaplasticConfig, exist_ok=True)
    AutoModelForCausalLM.register(MetaplasticConfig, MetaplasticForCausalLM, exist_ok=True)


register_auto_classes()  # on import of the model, as ``import fla`` registers fla's models
