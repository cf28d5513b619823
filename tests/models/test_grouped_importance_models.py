"""``importance_groups`` on the mixers and in ``MetaplasticConfig`` (docs/theory.md#limit-8-grouped-importance).

Yardsticks: a grouped model equals the per-value model whose importance rows are repeated within each group
(so the grouped fast path is checked against the per-value path, which materialises every precision), and
cached decoding equals the full forward.
"""
import pytest
import torch

from metaplastic.models.configuration import MetaplasticConfig
from metaplastic.models.mixers import build_mixer
from metaplastic.models.modeling import MetaplasticForCausalLM

from helpers import assert_close

MIXERS = {"palimpsa": dict(hidden_size=16, num_heads=2, head_dim=8),
          "meta_mamba2": dict(hidden_size=8, num_heads=2, head_dim=8, state_size=8, expand=2),
          "meta_gla": dict(hidden_size=16, num_heads=2, expand_k=1.0)}


def open_importance(mixer):
    """Make the importance path matter: γ = 1 (MetaMamba2's identity init has γ = 0) and a larger b."""
    with torch.no_grad():
        if mixer.importance.gamma is not None:
            mixer.importance.gamma.fill_(1.0)
        mixer.importance.b_scale.fill_(3.0)
        mixer.importance.W_b2.weight.normal_(0, 1.0)
        mixer.importance.W_b2.bias.normal_(0, 1.0)
    return mixer


@pytest.mark.parametrize("name", list(MIXERS))
def test_default_is_one_rate_per_value_channel_and_not_recorded(name):
    kw = dict(MIXERS[name])
    mixer = build_mixer(name, kw.pop("hidden_size"), **kw)
    H, V = mixer.num_heads, mixer.head_v_dim
    assert mixer.importance.W_b2.out_features == H * V
    assert "importance_groups" not in mixer.mixer_kwargs  # configs of existing checkpoints stay as they are


@pytest.mark.parametrize("name", list(MIXERS))
def test_grouped_mixer_equals_per_value_mixer_with_repeated_rates(name):
    kw = dict(MIXERS[name])
    hidden = kw.pop("hidden_size")
    torch.manual_seed(0)
    grouped = open_importance(build_mixer(name, hidden, importance_groups=2, **kw)).double()
    H, V = grouped.num_heads, grouped.head_v_dim
    assert grouped.importance.W_b2.out_features == H * 2 and grouped.mixer_kwargs["importance_groups"] == 2
    per_value = build_mixer(name, hidden, **kw).double()
    state = grouped.state_dict()
    for key in ("importance.W_b2.weight", "importance.W_b2.bias"):  # rows [H·G] -> [H·V], repeated per group
        w = state[key]
        state[key] = w.view(H, 2, *w.shape[1:]).repeat_interleave(V // 2, dim=1).reshape(H * V, *w.shape[1:])
    per_value.load_state_dict(state)
    x = torch.randn(2, 11, hidden, dtype=torch.float64)
    assert_close(grouped(x), per_value(x), rtol=1e-10, msg="grouped vs per-value mixer")
    b = grouped.importance(x, torch.ones(2, 11, H, dtype=torch.float64))
    assert b.shape == (2, 11, H, 2)


def test_groups_that_do_not_divide_the_value_width_are_refused_by_name():
    with pytest.raises(ValueError, match=r"importance_groups=3 .*head_v_dim=8"):
        build_mixer("palimpsa", 16, num_heads=2, head_dim=8, importance_groups=3)
    with pytest.raises(ValueError, match="importance_groups"):
        MetaplasticConfig(importance_groups=0)


@pytest.mark.parametrize("name", list(MIXERS))
def test_config_importance_groups_reaches_the_mixers_and_survives_saving(name, tmp_path):
    kw = dict(MIXERS[name])
    hidden = kw.pop("hidden_size")
    cfg = MetaplasticConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, mixer=name, mixer_kwargs=kw,
                            importance_groups=2)
    model = MetaplasticForCausalLM(cfg)
    for layer in model.backbone.layers:
        assert layer.mixer.importance.groups == 2
    model.save_pretrained(tmp_path)
    again = MetaplasticForCausalLM.from_pretrained(tmp_path)
    assert again.config.importance_groups == 2
    assert again.backbone.layers[1].mixer.importance.W_b2.out_features == 2 * 2
    assert MetaplasticConfig().importance_groups is None


@pytest.mark.parametrize("name", list(MIXERS))
def test_cached_greedy_generation_equals_full_forward_with_two_groups(name):
    kw = dict(MIXERS[name])
    hidden = kw.pop("hidden_size")
    torch.manual_seed(1)
    cfg = MetaplasticConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=2, mixer=name, mixer_kwargs=kw,
                            importance_groups=2)
    model = MetaplasticForCausalLM(cfg).double().eval()
    for layer in model.backbone.layers:
        open_importance(layer.mixer)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        full = model(out, use_cache=False).logits
        # the cache, token by token, gives the full forward's logits
        cached = model(out[:, :7], use_cache=True)
        steps = [cached.logits]
        for t in range(7, out.shape[1]):
            cached = model(out[:, t:t + 1], cache=cached.cache, use_cache=True)
            steps.append(cached.logits)
    assert torch.equal(out[:, 7:], full[:, 6:-1].argmax(-1))
    inc = torch.cat(steps, 1)
    # the mixers compute their gates and read-out in float32 (as the paper's layers): float32 rounding
    assert_close(inc, full, rtol=1e-5, msg="cached vs full logits")


def test_state_size_counts_one_precision_vector_per_group():
    """M is V·K floats per head; the precision is G·K (one K-vector per group) for G < V, V·K per value row."""
    per_value = build_mixer("palimpsa", 16, num_heads=2, head_dim=8)
    grouped = build_mixer("palimpsa", 16, num_heads=2, head_dim=8, importance_groups=2)
    assert per_value.state_size() == 2 * (8 * 8 + 8 * 8)
    assert grouped.state_size() == 2 * (8 * 8 + 2 * 8)
