"""The registry: every model as settings of the one objective.

``metaplastic.registry["mamba2"].objective`` is all the scan, the kernels and the derivations need to run
or derive Mamba2's memory; the rest of a spec is documentation (citation, read-out scale, which limit of
docs/theory.md#the-limits relates it to Palimpsa, how the model parameterises its gates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Tuple, Union

from .objective import Objective, metaplastic

INV_SQRT_K = "K^-1/2"


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    objective: Objective
    citation: str
    scale: Union[float, str] = 1.0  # a number, or "K^-1/2"
    relation: str = ""  # how it relates to Palimpsa, naming the limit
    limits: Tuple[str, ...] = ()  # theorem names of metaplastic.derivations that connect it
    gates: str = ""  # docs/theory.md#parameterisations: how the model's layer produces α, β, b
    beta_per_value: bool = False  # β is [B,T,H,V] (one rate per value row) in the model
    base: str = ""  # for a diagonal-posterior entry: the point-posterior model it reduces to at b ≡ 0

    def scale_for(self, K: int) -> float:
        """The default read-out scale for key size ``K``."""
        return 1.0 / math.sqrt(K) if self.scale == INV_SQRT_K else float(self.scale)


def _specs() -> Tuple[ModelSpec, ...]:
    la = Objective(likelihood="dot", posterior="point", solver="exact", transition="exact", forgetting="none")
    sgla = Objective(likelihood="dot", posterior="point", solver="exact", transition="exact", forgetting="scalar")
    gla = Objective(likelihood="dot", posterior="point", solver="exact", transition="exact", forgetting="vector")
    delta = Objective(likelihood="regression", posterior="point", solver="gradient",
                      transition="exact", forgetting="none")
    gdn = Objective(likelihood="regression", posterior="point", solver="gradient",
                    transition="exact", forgetting="scalar")
    longhorn = Objective(likelihood="regression", posterior="point", solver="exact",
                         transition="diagonal", forgetting="none")
    mesa = Objective(likelihood="regression", posterior="full", solver="exact", transition="exact", forgetting="scalar")
    palimpsa = Objective(likelihood="dot_diag", posterior="diagonal", solver="exact",
                         transition="exact", forgetting="scalar")
    return (
        ModelSpec("linear_attention", la, "Katharopoulos et al., Transformers are RNNs, ICML 2020", INV_SQRT_K,
                  "Palimpsa with b ≡ 0, no forgetting (limits 1, 2)", ("palimpsa_to_mamba2", "metaplastic_identity"),
                  "α ≡ 1, β ≡ 1"),
        ModelSpec("simple_gla", sgla, "Sun et al., RetNet, 2023; Yang et al., GLA, ICML 2024", INV_SQRT_K,
                  "Palimpsa with b ≡ 0 (limit 1); Palimpsa with head-shared b is simple GLA read with q ⊘ I (limit 7)",
                  ("palimpsa_to_mamba2", "metaplastic_identity", "headshared_importance_is_gla"),
                  "α = exp(g) per head, β ≡ 1"),
        ModelSpec("mamba2", sgla, "Dao & Gu, Transformers are SSMs (Mamba2 / SSD), ICML 2024", 1.0,
                  "Palimpsa with b ≡ 0, Ip = 1 (limit 1)", ("palimpsa_to_mamba2", "metaplastic_identity"),
                  "q = C, k = B, v = x, α = exp(Δ·A), β = Δ, A = −exp(A_log), Δ = softplus(dt + dt_bias)"),
        ModelSpec("gla", gla, "Yang et al., Gated Linear Attention, ICML 2024", INV_SQRT_K,
                  "metaplastic(GLA) at b ≡ 0 (limit 2)", ("metaplastic_identity",),
                  "α = exp(gk) per key channel, gk = logsigmoid(W2 W1 h) / gate_logit_normalizer, β ≡ 1"),
        ModelSpec("deltanet", delta, "Schlag et al., 2021; Yang et al., Parallelizing DeltaNet, NeurIPS 2024",
                  INV_SQRT_K, "first-order proximal step (limit 5); metaplastic(DeltaNet) at b ≡ 0 (limit 2)",
                  ("gdn_is_first_order_proximal", "metaplastic_identity"), "β = σ(b_proj h), no forgetting"),
        ModelSpec("gated_deltanet", gdn, "Yang, Kautz & Hatamizadeh, Gated Delta Networks, ICLR 2025", INV_SQRT_K,
                  "first-order proximal step (limit 5); metaplastic(GDN) at b ≡ 0 (limit 2)",
                  ("gdn_is_first_order_proximal", "metaplastic_identity"),
                  "α = exp(−exp(A_log)·softplus(a_proj h + dt_bias)), β = σ(b_proj h)"),
        ModelSpec("longhorn", longhorn, "Liu et al., Longhorn: SSMs are amortized online learners, 2024", 1.0,
                  "exact proximal step with a diagonal transition (limit 4); metaplastic(LongHorn) at b ≡ 0 (limit 2)",
                  ("longhorn_is_diagonal_proximal", "metaplastic_identity"),
                  "q = C, k = B, v = x, β = σ(dt_head(dt_low)) per value channel, no forgetting",
                  beta_per_value=True),
        ModelSpec("mesanet", mesa, "von Oswald et al., MesaNet, 2025", 1.0,
                  "full key precision; its diagonal restriction is Palimpsa (limit 6)", ("mesanet_full_to_diagonal",),
                  "α = exp(logsigmoid(a_proj h)), β = σ(b_proj h), λ = softplus(θ) + 0.25"),
        ModelSpec("palimpsa", palimpsa, "Bonnet et al., Learning to Remember, Learn, and Forget in "
                  "Attention-Based Models (Palimpsa), ICML 2026", INV_SQRT_K,
                  "itself: the mean-field regression posterior with target v/b (limit 3)",
                  ("palimpsa_is_meanfield_regression", "palimpsa_to_mamba2", "headshared_importance_is_gla",
                   "mesanet_full_to_diagonal"),
                  "α = exp(−Δ·A), β = σ(bs_proj h), b = σ(low-rank h)·softplus(b_scale)·β", base="mamba2"),
        ModelSpec("meta_mamba2", metaplastic(sgla), "Bonnet et al., 2026 (metaplastic Mamba2)", 1.0,
                  "Palimpsa objective with Mamba2's gates; at γ = 0 (b ≡ 0) it is Mamba2 (limits 1, 2)",
                  ("palimpsa_to_mamba2", "metaplastic_identity"),
                  "as Mamba2; b = γ · Δ · σ(W_b2 W_b1 h) · softplus(b_scale) per value channel", base="mamba2"),
        ModelSpec("meta_gated_deltanet", metaplastic(gdn), "Bonnet et al., 2026 (metaplastic Gated DeltaNet)",
                  INV_SQRT_K, "preconditioned gradient step on a diagonal posterior; at b ≡ 0 it is GDN (limit 2)",
                  ("metaplastic_identity",), "as Gated DeltaNet, plus b", base="gated_deltanet"),
        ModelSpec("meta_gla", metaplastic(gla), "metaplastic GLA (this toolkit, docs/theory.md#limit-2-metaplastic-twins)", INV_SQRT_K,
                  "Palimpsa with per-channel decay; at b ≡ 0 it is GLA (limit 2); b shared in G groups of value "
                  "rows: G GLA reads with q ⊘ J (limit 8)", ("metaplastic_identity", "grouped_importance_is_gla"),
                  "as GLA, plus b = γ · σ(W_b2 W_b1 h) · softplus(b_scale) per value channel or group", base="gla"),
        ModelSpec("meta_longhorn", metaplastic(longhorn), "metaplastic LongHorn (this toolkit, docs/theory.md#closed-forms)", 1.0,
                  "diagonal Kalman step with a diagonal transition; at b ≡ 0 it is LongHorn (limit 2)",
                  ("metaplastic_identity",), "as LongHorn, plus b", beta_per_value=True, base="longhorn"),
    )


class Registry(Mapping[str, ModelSpec]):
    """Name → :class:`ModelSpec`. Unknown names raise ``KeyError`` listing the known ones."""

    def __init__(self, specs: Tuple[ModelSpec, ...]) -> None:
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> ModelSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(self._specs)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def point_entries(self) -> Tuple[ModelSpec, ...]:
        """The entries whose posterior is a point (the ones ``metaplastic()`` converts)."""
        return tuple(s for s in self._specs.values() if s.objective.posterior == "point")


registry = Registry(_specs())
