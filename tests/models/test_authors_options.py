"""The mixer options that reproduce the paper authors' layers, each against a reference nobody here wrote or
against the law docs/authors.md#initialisation-laws states; today's defaults stay as they were."""
import math

import pytest
import torch
from torch import nn

from metaplastic import MetaplasticConfig, MetaplasticForCausalLM, build_mixer
from metaplastic.oracles import relative_error, transformers_mamba2_is_grouped

transformers = pytest.importorskip("transformers")
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref  # noqa: E402
from transformers import Mamba2Config  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402

from helpers import assert_close  # noqa: E402


class WholeInnerGatedNorm(nn.Module):
    """fla's reference gated RMSNorm, gate first, one group over the whole d_inner (the authors' norm)."""

    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = weight, eps

    def forward(self, hidden_states, gate=None):
        return gated_rms_norm_ref(hidden_states, self.weight, None, z=gate, eps=self.eps, group_size=None,
                                  norm_before_gate=False)


@pytest.mark.skipif(not transformers_mamba2_is_grouped(), reason="transformers < 5.23: its Mamba2 is not a "
                    "reference at n_groups > 1")
@pytest.mark.parametrize("name", ["mamba2", "meta_mamba2"])
def test_norm_over_whole_d_inner_equals_transformers_with_flas_ungrouped_norm(name):
    cfg = Mamba2Config(vocab_size=10, hidden_size=16, num_hidden_layers=1, num_heads=4, head_dim=8, state_size=6,
                       n_groups=2, expand=2, conv_kernel=4, chunk_size=4)
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    ref.norm = WholeInnerGatedNorm(ref.norm.weight, cfg.layer_norm_epsilon)
    kw = dict(num_heads=4, head_dim=8, state_size=6, n_groups=2, conv_kernel=4,
              layer_norm_epsilon=cfg.layer_norm_epsilon)
    ours = build_mixer(name, 16, norm_per_group=False, **kw).eval()
    per_group = build_mixer(name, 16, **kw).eval()
    for mixer in (ours, per_group):
        missing, unexpected = mixer.load_state_dict(ref.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("importance.") for k in missing)
    h = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(h)
        assert_close(ours(h), expected, rtol=1e-5)  # γ = 0 for meta_mamba2: Mamba2's function
        assert relative_error(per_group(h), expected) > 1e-2  # the two conventions differ at n_groups > 1
    assert ours.mixer_kwargs["norm_per_group"] is False and "norm_per_group" not in per_group.mixer_kwargs


def test_defaults_are_unchanged_and_recorded_options_round_trip():
    mixer = build_mixer("palimpsa", 32, num_heads=2, head_dim=8)
    assert set(mixer.mixer_kwargs) == {"num_heads", "head_dim", "expand_v", "conv_size", "conv_bias", "norm_eps",
                                       "importance_rank"}
    assert mixer.bs_proj.bias is not None and mixer.importance.W_b2.bias is not None
    assert mixer.importance.gamma is None and mixer.importance.W_b1.out_features == 32
    A = mixer.A_log.exp()
    assert bool(((A >= 1) & (A <= 16)).all())
    authors = build_mixer("palimpsa", 32, num_heads=2, head_dim=8, l2_norm="normalize", bs_bias=False,
                          importance_bias=False, importance_rank="auto", A_init_range=(0, 16),
                          importance_init="paper", expand_k=2, use_gate=False)
    assert authors.bs_proj.bias is None and authors.importance.W_b2.bias is None and authors.g_proj is None
    assert authors.importance.W_b1.out_features == 2  # ceil(32 / 16)
    assert authors.head_k_dim == 16 and authors.scale == 16 ** -0.5
    rebuilt = build_mixer("palimpsa", 32, **authors.mixer_kwargs)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in authors.state_dict().items()}
    assert rebuilt.mixer_kwargs == authors.mixer_kwargs


def test_A_init_ranges():
    """A ~ U(0, 16) for the authors (mean 8, values below 1), U(1, 16) for fla (mean 8.5); 4000 heads put the
    sample mean within ±0.3 (4 standard errors) of its law's."""
    torch.manual_seed(0)
    theirs = build_mixer("palimpsa", 16, num_heads=4000, head_dim=1, A_init_range=(0, 16), importance_rank=1)
    ours = build_mixer("palimpsa", 16, num_heads=4000, head_dim=1, importance_rank=1)
    a_theirs, a_ours = theirs.A_log.exp(), ours.A_log.exp()
    assert abs(a_theirs.mean().item() - 8.0) < 0.3 and abs(a_ours.mean().item() - 8.5) < 0.3
    assert a_theirs.min() < 1.0 <= a_ours.min() and a_theirs.max() <= 16 and a_ours.max() <= 16
    mamba = build_mixer("mamba2", 16, num_heads=4, head_dim=8, state_size=4)
    assert torch.equal(mamba.A_log.exp().round(), torch.arange(1.0, 5.0))  # transformers' A = 1..H
    drawn = build_mixer("mamba2", 16, num_heads=4, head_dim=8, state_size=4, A_init_range=(0, 16)).A_log.exp()
    assert bool(((drawn > 0) & (drawn < 16)).all())


def test_authors_preset_builds_their_shapes_and_laws():
    cfg = MetaplasticConfig.authors_preset("palimpsa", hidden_size=768, num_heads=16, head_dim=48, expand_v=1,
                                           num_hidden_layers=1, vocab_size=100, tie_word_embeddings=True)
    assert cfg.intermediate_size == 2048 and cfg.layer_norm_epsilon == 1e-6 and cfg.residual_in_fp32 is False
    torch.manual_seed(0)
    model = MetaplasticForCausalLM(cfg)
    mixer = model.backbone.layers[0].mixer
    imp = mixer.importance
    assert imp.W_b1.out_features == 48 and imp.gamma is None and imp.W_b2.bias is None
    assert mixer.bs_proj.bias is None and mixer.l2_norm == "normalize"
    assert torch.equal(imp.b_scale.detach(), torch.ones(16)) and torch.equal(imp.Ip_log, torch.zeros(16))
    bound = 48 ** -0.5  # b_proj ~ U(±r^{-1/2}) survives transformers' weight init
    w2 = imp.W_b2.weight.detach()
    assert w2.abs().max() <= bound and w2.abs().max() > 0.95 * bound
    assert abs(w2.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert abs(imp.W_b1.weight.std().item() - 0.02) < 0.001
    mm = MetaplasticConfig.authors_preset("meta_mamba2", hidden_size=768, state_size=48, head_dim=96, n_groups=16,
                                          num_hidden_layers=1, vocab_size=100)
    kw = mm.mixer_kwargs
    assert mm.mixer == "meta_mamba2" and mm.intermediate_size == 0 and kw["norm_per_group"] is False
    assert kw["num_heads"] == 16 and kw["importance_gate"] is False
    with pytest.raises(ValueError, match="attn"):
        MetaplasticConfig.authors_preset("palimpsa", attn={"layers": [0]})
    with pytest.raises(ValueError, match="use_l2warp"):
        MetaplasticConfig.authors_preset("meta_mamba2", use_l2warp=True)
