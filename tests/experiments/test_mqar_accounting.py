"""MQAR model entries: both state accountings, the b ≡ 0 controls (``not_NAME``), per-model mixer options."""
import sys

import pytest
import torch

from metaplastic.cli import main
from metaplastic.experiments import mqar
from metaplastic.experiments.overrides import apply_overrides


def test_floats_and_shape_accountings():
    """@floats: state_size() (precision included) fits the budget, and is the bare name. @shape: the shape of
    the point-posterior baseline (the b ≡ 0 model at matched floats), the precision on top; @width is it too."""
    budget = 256
    point = mqar.MQARModel("mamba2", 16, 32, budget)
    floats = mqar.MQARModel("meta_mamba2@floats", 16, 32, budget)
    bare = mqar.MQARModel("meta_mamba2", 16, 32, budget)
    shape = mqar.MQARModel("meta_mamba2@shape", 16, 32, budget)
    width = mqar.MQARModel("meta_mamba2@width", 16, 32, budget)
    H, K, V = point.memory_shape()
    assert point.state_size() == H * K * V == budget
    assert floats.state_size() <= budget and floats.memory_shape() == bare.memory_shape() == (H, K // 2, V)
    assert shape.memory_shape() == width.memory_shape() == (H, K, V) and shape.state_size() == 2 * H * K * V


def test_the_authors_shapes_at_d_model_128():
    """docs/references.md: Palimpsa, NotPalimpsa and Gated DeltaNet at 8 heads × 16 × 32; MetaMamba2 and
    Mamba2 at 8 heads, N = 16, head dim 32, n_groups 8. Palimpsa carries twice the floats."""
    kw = {"palimpsa": {"num_heads": 8, "expand_v": 2}, "gated_deltanet": {"num_heads": 8},
          "mamba2": {"n_groups": 8}, "meta_mamba2": {"n_groups": 8}}
    shapes = {}
    for entry in ("palimpsa@shape", "not_palimpsa", "gated_deltanet", "mamba2", "meta_mamba2@shape"):
        m, _ = mqar.build_matched_mixer(entry, 128, 8 * 16 * 32, mqar.entry_kwargs(kw, entry))
        shapes[entry] = ((m.num_heads, m.head_k_dim, m.head_v_dim), mqar.entry_state_floats(entry, m))
    assert shapes == {"palimpsa@shape": ((8, 16, 32), 8192), "not_palimpsa": ((8, 16, 32), 4096),
                      "gated_deltanet": ((8, 16, 32), 4096), "mamba2": ((8, 16, 32), 4096),
                      "meta_mamba2@shape": ((8, 16, 32), 8192)}


@pytest.mark.parametrize("entry,mixer,accounting,b_zero", [
    ("mamba2", "mamba2", "", False), ("palimpsa", "palimpsa", "floats", False),
    ("palimpsa@width", "palimpsa", "shape", False), ("not_palimpsa", "palimpsa", "shape", True),
    ("not_palimpsa@floats", "palimpsa", "floats", True), ("not_meta_mamba2", "meta_mamba2", "shape", True)])
def test_parse_entry(entry, mixer, accounting, b_zero):
    e = mqar.parse_entry(entry)
    assert (e.mixer, e.accounting, e.b_zero) == (mixer, accounting, b_zero)


@pytest.mark.parametrize("entry,message", [("not_mamba2", "has no importance path"),
                                           ("not_mesanet", "has no importance rate"),
                                           ("mamba2@shape", "a point-posterior model has no precision"),
                                           ("palimpsa@keys", "unknown accounting"), ("not_nope", "unknown model")])
def test_bad_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        mqar.parse_entry(entry)


def test_not_palimpsa_keeps_palimpsa_shape_at_either_accounting():
    kw = {"palimpsa": {"expand_v": 2}}
    for accounting in ("shape", "floats"):
        a = mqar.MQARModel(f"palimpsa@{accounting}", 16, 32, 256, mixer_kwargs=mqar.entry_kwargs(kw, f"palimpsa@{accounting}"))
        b = mqar.MQARModel(f"not_palimpsa@{accounting}", 16, 32, 256,
                           mixer_kwargs=mqar.entry_kwargs(kw, f"not_palimpsa@{accounting}"))
        H, K, V = a.memory_shape()
        assert b.memory_shape() == (H, K, V) and b.state_size() == H * K * V and a.state_size() == 2 * H * K * V


def test_b_zero_control_is_simple_gla_with_an_input_gate():
    """not_palimpsa's scan output equals fla's naive recurrent simple GLA on the gates the layer hands to its
    scan, with the values scaled by β (b ≡ 0, Ip = 1: μ_t = α μ + β v kᵀ). Tolerance 1e-5: float32 sums
    in two orders."""
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    torch.manual_seed(0)
    model = mqar.MQARModel("not_palimpsa", 16, 32, 256)
    mixer = model.mixers[0]
    module = sys.modules[type(mixer).__module__]
    seen = {}
    original = module.scan

    def capture(objective, q, k, v, **kwargs):
        out = original(objective, q, k, v, **kwargs)
        seen.update(q=q, k=k, v=v, out=out.output, **kwargs)
        return out

    module.scan = capture
    try:
        with torch.no_grad():
            mixer(torch.randn(2, 12, 32))
    finally:
        module.scan = original
    assert torch.count_nonzero(seen["b"]) == 0
    beta = seen["beta"]
    expected, _ = naive_recurrent_simple_gla(seen["q"], seen["k"], seen["v"] * beta[..., None], seen["log_decay"],
                                             scale=seen["scale"])
    torch.testing.assert_close(seen["out"].float(), expected.float(), atol=1e-5, rtol=1e-5)


def test_b_zero_control_stays_at_b_zero_through_training():
    cfg = mqar.MQARConfig("t", vocab_size=16, d_model=16, settings=((16, 2),), state_budget=128, train_examples=32,
                          val_examples=8, test_examples=8, epochs=2, batch_size=8, lrs=(1e-2,), seeds=(0,),
                          models=("not_meta_mamba2",))
    out = mqar.train_run(cfg, "not_meta_mamba2", 16, 1e-2, 0, torch.device("cpu"))
    for m in out["model"].mixers:
        assert torch.count_nonzero(m.importance.gamma) == 0
        assert not any(p.requires_grad for p in m.importance.parameters())


def test_mixer_kwargs_most_specific_key_wins():
    kw = {"palimpsa": {"expand_v": 2, "num_heads": 2}, "palimpsa@floats": {"expand_v": 4},
          "not_palimpsa": {"num_heads": 4}, "gated_deltanet": {"num_heads": 8}}
    assert mqar.entry_kwargs(kw, "palimpsa") == {"expand_v": 4, "num_heads": 2}
    assert mqar.entry_kwargs(kw, "palimpsa@shape") == {"expand_v": 2, "num_heads": 2}
    assert mqar.entry_kwargs(kw, "not_palimpsa@floats") == {"expand_v": 4, "num_heads": 4}
    assert mqar.entry_kwargs(kw, "mamba2") == {}


def test_mixer_kwargs_from_the_command_line_merge_over_the_config():
    base = mqar.CONFIGS["decide"]
    cfg = apply_overrides(base, ['mixer_kwargs={"palimpsa": {"expand_v": 1}, "mesanet": {"num_heads": 2}}'])
    assert cfg.mixer_kwargs["palimpsa"] == {"num_heads": 1, "expand_v": 1}  # num_heads kept from the config
    assert cfg.mixer_kwargs["mesanet"] == {"num_heads": 2} and cfg.mixer_kwargs["gated_deltanet"] == {"num_heads": 1}
    assert base.mixer_kwargs["palimpsa"] == {"num_heads": 1, "expand_v": 2}  # the config itself is unchanged
    m, kwargs = mqar.build_matched_mixer("palimpsa@shape", 32, 256, mqar.entry_kwargs(cfg.mixer_kwargs, "palimpsa@shape"))
    assert (m.num_heads, m.head_k_dim, m.head_v_dim) == (1, 16, 16) and kwargs["expand_v"] == 1


@pytest.mark.parametrize("value,message", [
    ('{"palimpsa": {"nope": 1}}', "mixer_kwargs of 'palimpsa'"),
    ('{"nope": {"expand_v": 2}}', "mixer_kwargs: unknown model 'nope'"),
    ('{"gated_deltanet": {"num_heads": 2, "head_dim": 64}}', "no size of mixer 'gated_deltanet' fits"),
    ('{"palimpsa": 3}', "mixer_kwargs.palimpsa: expected a JSON object")])
def test_bad_mixer_kwargs_exit_2_before_training(value, message, tmp_path, capsys):
    assert main(["mqar", "--config", "quick", "--out", str(tmp_path), "--set", f"mixer_kwargs={value}",
                 "--set", 'models=["palimpsa", "gated_deltanet"]']) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
