"""``to_metaplastic``: for every point-posterior mixer (Mamba2, Gated DeltaNet with and without grouped value
heads, LongHorn, GLA) the twin at identity init computes the mixer's outputs (docs/theory.md#limit-2-metaplastic-twins), also after a
save/load round trip; the twin runs ``metaplastic(objective)``; opening γ changes the outputs."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from metaplastic import metaplastic, registry
from metaplastic import MetaplasticConfig, MetaplasticForCausalLM, build_mixer, to_metaplastic
from metaplastic.oracles import relative_error

from helpers import assert_close

HIDDEN = 16
MIXERS = {  # id -> (point-posterior mixer name, kwargs)
    "mamba2": ("mamba2", dict(num_heads=4, head_dim=8, state_size=4, n_groups=2)),
    "gated_deltanet": ("gated_deltanet", dict(num_heads=2, head_dim=8, expand_v=1.5)),
    "gated_deltanet_gva": ("gated_deltanet", dict(num_heads=2, head_dim=8, expand_v=1.0, num_v_heads=4)),
    "gated_deltanet_nogate": ("gated_deltanet", dict(num_heads=2, head_dim=8, use_gate=False)),
    "longhorn": ("longhorn", dict(state_size=4)),
    "gla": ("gla", dict(num_heads=2, use_short_conv=True)),
    "gla_kv_heads": ("gla", dict(num_heads=4, num_kv_heads=2, expand_k=1.0, use_output_gate=False)),
}


@torch.no_grad()
def perturbed(name, kwargs, seed=0):
    torch.manual_seed(seed)
    mixer = build_mixer(name, HIDDEN, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    for pname, p in mixer.named_parameters():
        if not pname.endswith(("A_log", "dt_bias")):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return mixer.eval()


def outputs(mixer, h):
    with torch.no_grad():
        return mixer(h)


@pytest.mark.parametrize("case", list(MIXERS))
def test_identity_twin_equals_the_mixer_and_survives_a_round_trip(case, tmp_path):
    name, kwargs = MIXERS[case]
    mixer = perturbed(name, kwargs)
    h = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(7))
    twin = to_metaplastic(mixer, init="identity", rank=3, generator=torch.Generator().manual_seed(0))
    assert twin.objective == metaplastic(registry[name].objective) and twin.objective.posterior == "diagonal"
    for key, value in mixer.state_dict().items():  # every original weight kept
        assert torch.equal(twin.state_dict()[key], value), key
    expected = outputs(mixer, h)
    assert_close(outputs(twin, h), expected, rtol=1e-5)

    # save/load round trip through safetensors + the recorded kwargs
    save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, str(tmp_path / "twin.safetensors"))
    reloaded = build_mixer(twin.registry_name, HIDDEN, **twin.mixer_kwargs).eval()
    reloaded.load_state_dict(load_file(str(tmp_path / "twin.safetensors")), strict=True)
    assert_close(outputs(reloaded, h), expected, rtol=1e-5)

    # the importance path is live: opening γ moves the outputs, and the round trip keeps that too
    with torch.no_grad():
        twin.importance.gamma.fill_(1.0)
        twin.importance.W_b2.bias.fill_(2.0)
    opened = outputs(twin, h)
    assert relative_error(opened, expected) > 1e-3
    reloaded.load_state_dict(twin.state_dict(), strict=True)
    assert torch.equal(outputs(reloaded, h), opened)


@pytest.mark.parametrize("case", ["mamba2", "gated_deltanet_gva", "longhorn"])
def test_lm_of_twins_equals_lm_of_sources_after_save_pretrained(case, tmp_path):
    """A point-posterior LM, each block's mixer passed through ``to_metaplastic``, saved and reloaded."""
    name, kwargs = MIXERS[case]
    config = MetaplasticConfig(vocab_size=23, hidden_size=HIDDEN, num_hidden_layers=2, mixer=name,
                               mixer_kwargs=kwargs, intermediate_size=20 if name == "gated_deltanet" else 0)
    torch.manual_seed(0)
    source = MetaplasticForCausalLM(config).eval()
    ids = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(ids).logits
    twin_cfg = MetaplasticConfig(**{**config.to_dict(), "mixer": "meta_" + name,
                                    "mixer_kwargs": {**kwargs, "importance_rank": 3}})
    target = MetaplasticForCausalLM(twin_cfg).eval()
    state = {}
    for i, block in enumerate(source.backbone.layers):
        twin = to_metaplastic(block.mixer, rank=3, generator=torch.Generator().manual_seed(i))
        state.update({f"backbone.layers.{i}.mixer.{k}": v for k, v in twin.state_dict().items()})
    state.update({k: v for k, v in source.state_dict().items() if ".mixer." not in k})
    target.load_state_dict(state, strict=True)
    target.save_pretrained(tmp_path / "twin")
    reloaded = MetaplasticForCausalLM.from_pretrained(tmp_path / "twin").eval()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, rtol=1e-5)


def test_refusals():
    with pytest.raises(ValueError, match="point-posterior"):
        to_metaplastic(build_mixer("palimpsa", HIDDEN, num_heads=2, head_dim=8, importance_rank=3))
    with pytest.raises(ValueError, match="init must be one of"):
        to_metaplastic(build_mixer("gated_deltanet", HIDDEN, num_heads=2, head_dim=8), init="random")
    with pytest.raises(ValueError, match="num_v_heads=3"):
        build_mixer("gated_deltanet", HIDDEN, num_heads=2, head_dim=8, num_v_heads=3)
