"""Every mixer: forward and backward at tiny size, chunked decoding through the cache, the metaplastic twin
at γ = 0, fla-compatible parameter names; on a GPU, Gated DeltaNet and MesaNet against fla's own layers."""
import pytest
import torch

from metaplastic import registry
from metaplastic.models import MIXERS, MetaplasticCache, MetaplasticConfig, MetaplasticForCausalLM, build_mixer
from metaplastic.models import to_metaplastic
from metaplastic.oracles import relative_error

from helpers import assert_close

TINY = {
    "mamba2": dict(num_heads=4, head_dim=8, state_size=4, n_groups=2),
    "meta_mamba2": dict(num_heads=4, head_dim=8, state_size=4, n_groups=2, importance_rank=3),
    "palimpsa": dict(num_heads=2, head_dim=8, importance_rank=3),
    "gated_deltanet": dict(num_heads=2, head_dim=8, expand_v=1.5),
    "meta_gated_deltanet": dict(num_heads=2, head_dim=8, importance_rank=3),
    "gla": dict(num_heads=2, use_short_conv=True),
    "meta_gla": dict(num_heads=2, importance_rank=3),
    "mesanet": dict(num_heads=2, head_dim=8),
    "longhorn": dict(state_size=4),
    "meta_longhorn": dict(state_size=4, importance_rank=3),
}


def test_mixer_catalogue_holds_the_compared_layers():
    assert {"mamba2", "meta_mamba2", "palimpsa", "gated_deltanet", "meta_gated_deltanet", "mesanet",
            "longhorn"} <= set(MIXERS)
    for name, cls in MIXERS.items():
        assert cls.registry_name == name and name in registry


@torch.no_grad()
def _perturb(mixer, seed):
    gen = torch.Generator().manual_seed(seed)
    for name, p in mixer.named_parameters():
        if name.endswith("gamma"):
            p.fill_(0.8)
        elif not name.endswith(("A_log", "dt_bias")):
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("name", list(TINY))
def test_forward_backward_and_cache(name):
    torch.manual_seed(0)
    mixer = build_mixer(name, 16, **TINY[name])
    _perturb(mixer, 1)
    assert mixer.objective == registry[name].objective
    assert mixer.state_size() > 0
    h = torch.randn(2, 7, 16, requires_grad=True)
    y = mixer(h)
    assert y.shape == h.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().max() > 0
    for pname, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # decoding in pieces (3 tokens, then 1, then 3) through the cache equals one pass
    cache = MetaplasticCache()
    with torch.no_grad():
        pieces = [mixer(h[:, a:b].detach(), cache=cache, layer_idx=0) for a, b in ((0, 3), (3, 4), (4, 7))]
    assert_close(torch.cat(pieces, 1), y.detach(), rtol=1e-5)


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet", "gla", "longhorn"])
def test_metaplastic_twin_is_identical_at_gamma_zero_and_trainable(name):
    torch.manual_seed(0)
    mixer = build_mixer(name, 16, **TINY[name])
    _perturb(mixer, 2)
    twin = to_metaplastic(mixer, rank=3)
    assert twin.registry_name == "meta_" + name
    h = torch.randn(2, 6, 16)
    out = twin(h)
    assert_close(out.detach(), mixer(h).detach(), rtol=1e-5)
    (out * torch.randn_like(out)).sum().backward()
    assert twin.importance.gamma.grad.abs().max() > 0
    with torch.no_grad():
        twin.importance.gamma.fill_(1.0)
    assert relative_error(twin(h).detach(), mixer(h).detach()) > 1e-4


def test_lm_with_mixed_layers_and_an_mlp_generates_consistently():
    config = MetaplasticConfig(vocab_size=31, hidden_size=16, num_hidden_layers=3,
                               mixer=["palimpsa", "gated_deltanet", "mesanet"],
                               mixer_kwargs=[TINY["palimpsa"], TINY["gated_deltanet"], TINY["mesanet"]],
                               intermediate_size=24, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MetaplasticForCausalLM(config).eval()
    prompt = torch.randint(0, 31, (2, 4), generator=torch.Generator().manual_seed(0))
    cached = model.generate(prompt, max_new_tokens=5, do_sample=False)
    full = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert cached.tolist() == full.tolist()


def test_fla_parameter_names():
    """Gated DeltaNet, MesaNet and GLA load fla's layer state dicts (instantiating fla layers works on a CPU)."""
    fla_layers = pytest.importorskip("fla.layers")
    ref = fla_layers.GatedDeltaNet(hidden_size=16, num_heads=2, head_dim=8, expand_v=1.5)
    ours = build_mixer("gated_deltanet", 16, **TINY["gated_deltanet"])
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref = fla_layers.MesaNet(hidden_size=16, num_heads=2, head_dim=8)
    ours = build_mixer("mesanet", 16, **TINY["mesanet"])
    ours.load_state_dict(ref.state_dict(), strict=True)
    lam = torch.nn.functional.softplus(ours.lambda_params) + 0.25
    assert torch.allclose(lam, torch.ones_like(lam))  # fla's initial λ = 1
    ref = fla_layers.GatedLinearAttention(hidden_size=16, num_heads=2, use_short_conv=True)
    build_mixer("gla", 16, **TINY["gla"]).load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's layers need a GPU (Triton)")
@pytest.mark.parametrize("name,tol", [
    # fla's chunked kernels call tl.dot on float32 without an input precision: Triton's default there is TF32
    # (10-bit mantissa, rounding at 2^-11 = 4.9e-4), hence 1e-3; our side computes in IEEE float32.
    ("gated_deltanet", 1e-3),
    pytest.param("mesanet", 1e-3, marks=pytest.mark.xfail(
        strict=False, reason="fla's MesaNet layer solves by CG with N steps; measured 2.9e-3 relative on an H200 "
                             "against the exact solve")),
])
def test_layers_equal_fla_on_gpu(name, tol, ieee_fp32):
    """Our layers (exact solve for MesaNet) against fla's on a GPU, where fla's layers run."""
    fla_layers = pytest.importorskip("fla.layers")
    torch.manual_seed(0)
    kw = dict(hidden_size=64, num_heads=2, head_dim=32)
    ref = (fla_layers.GatedDeltaNet(**kw, expand_v=1) if name == "gated_deltanet"
           else fla_layers.MesaNet(**kw)).cuda().eval()
    ours = build_mixer(name, 64, num_heads=2, head_dim=32, **({"expand_v": 1.0} if name == "gated_deltanet" else {}))
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours = ours.cuda().eval()
    h = torch.randn(2, 64, 64, device="cuda")
    with torch.no_grad():
        expected = ref(h)[0].float()
        got = ours(h).float()
    assert_close(got, expected, rtol=tol)


def test_importance_projection_keeps_gamma_non_negative():
    """After an optimizer step that pushes γ below zero, project_importance_ cuts it back to 0 (b ≥ 0)."""
    from metaplastic.models import project_importance_
    mixer = build_mixer("meta_mamba2", 16, num_heads=4, head_dim=8, state_size=4)
    gamma = mixer.importance.gamma
    with torch.no_grad():
        gamma.copy_(torch.tensor([-0.5, 0.0, 0.25, -1e-3]))
    project_importance_(mixer)
    assert torch.equal(gamma.detach(), torch.tensor([0.0, 0.0, 0.25, 0.0]))
