"""The authors' MQAR recipe (docs/references.md, "MQAR as the Palimpsa authors ran it"), item by item."""
import math

import pytest
import torch
from torch import nn

from metaplastic.cli import main
from metaplastic.experiments import mqar
from metaplastic.experiments.mqar_recipe import AUTHORS_FIELDS, lr_factor


def _cfg(**kw):
    base = dict(name="t", vocab_size=32, d_model=32, settings=((16, 2),), state_budget=256, train_examples=32,
                val_examples=8, test_examples=8, epochs=3, batch_size=8, lrs=(1e-2,), seeds=(0,),
                models=("palimpsa",), recipe="authors", **{k: v for k, v in AUTHORS_FIELDS.items()})
    base.update(kw)
    return mqar.MQARConfig(**base)


def test_skeleton_tied_head_layernorm_bf16():
    torch.manual_seed(0)
    model = mqar.build_model(_cfg(), "palimpsa")
    assert model.head.weight is model.embed.weight
    assert isinstance(model.norm_f, nn.LayerNorm) and all(isinstance(n, nn.RMSNorm) for n in model.norms)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_init_normal_with_std_d_to_the_minus_half():
    """Every Linear/Conv1d/Embedding weight N(0, 32^-1/2): the pooled sample std within 5% (over 10k draws:
    the relative standard error of a std estimate is 1/√(2n) < 0.8%, so 5% is over 6 standard errors), the
    mean within 0.01 (5 standard errors of 0.177/√10k); biases 0; W_b2 within ±rank^-1/2."""
    torch.manual_seed(0)
    model = mqar.MQARModel("palimpsa", 128, 32, 256, recipe="authors", decay_init="small")
    weights = [m.weight.detach().flatten() for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv1d, nn.Embedding)) and not name.endswith("W_b2")]
    pooled = torch.cat(weights)
    assert pooled.numel() > 10_000
    assert abs(pooled.std().item() / 32 ** -0.5 - 1) < 0.05 and abs(pooled.mean().item()) < 0.01
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    for mixer in model.mixers:
        rank = mixer.importance.W_b1.out_features
        assert mixer.importance.W_b2.weight.abs().max() <= rank ** -0.5
        assert torch.equal(mixer.importance.b_scale, torch.ones_like(mixer.importance.b_scale))


@pytest.mark.parametrize("name", ["mamba2", "gated_deltanet", "palimpsa"])
def test_small_decay(name):
    """'small': A = linspace(0.01, 0.16, H), dt log-spaced 0.1 → 0.001: α_h = exp(−dt_h A_h) (restated)."""
    model = mqar.MQARModel(name, 16, 32, 256, decay_init="small")
    m = model.mixers[0]
    H = m.dt_bias.numel()
    A = [0.01 + (0.16 - 0.01) * h / (H - 1) for h in range(H)]
    dt = [0.1 * (0.001 / 0.1) ** (h / (H - 1)) for h in range(H)]
    expected = torch.tensor([math.exp(-a * d) for a, d in zip(A, dt)], dtype=torch.float64)
    alpha = torch.exp(-torch.nn.functional.softplus(m.dt_bias.double()) * m.A_log.double().exp()).detach()
    torch.testing.assert_close(alpha, expected, atol=1e-7, rtol=0)
    assert 0.998 <= float(alpha.min()) and float(alpha.max()) <= 0.9999  # memories of about 600 to 6000 tokens


def test_optimizer_and_schedule(monkeypatch):
    """AdamW (0.9, 0.999), weight decay on every parameter, no clipping, the lr constant within an epoch and
    cosine over epochs, no warm-up."""
    seen = {}
    real = torch.optim.AdamW

    def spy(params, **kw):
        opt = real(params, **kw)
        seen["opt"] = opt
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("the authors do not clip"))
    lrs = []
    real_step = torch.optim.lr_scheduler.LambdaLR.step

    def record(self, *a, **k):
        lrs.append(self.optimizer.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", record)
    torch.manual_seed(0)
    model = mqar.MQARModel("mamba2", 16, 16, 64)
    x, y = mqar.mqar(16, 16, 2, 16, torch.Generator().manual_seed(0))
    mqar.fit(model, x, y, steps=12, lr=0.1, batch_size=4, seed=0, device=torch.device("cpu"), recipe="authors")
    groups = seen["opt"].param_groups
    assert len(groups) == 1 and groups[0]["betas"] == (0.9, 0.999) and groups[0]["weight_decay"] == 0.1
    assert len(groups[0]["params"]) == len(list(model.parameters()))
    per_epoch = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]
    # lrs[0] is recorded by the scheduler's constructor; lrs[i + 1] is the lr step i ran with
    assert lrs[1:] == pytest.approx([lr for lr in per_epoch for _ in range(4)])
    assert lr_factor("default", 0, 100, 10, 5) == pytest.approx(0.1)  # the default recipe still warms up


def test_early_stopping_on_validation(monkeypatch):
    """A run stops after the first epoch whose validation accuracies all exceed early_stop; test accuracy is
    never looked at while training."""
    calls = []

    def fake_eval(model, x, y, batch_size, device):
        calls.append(x.shape[0])
        return 1.0

    monkeypatch.setattr(mqar, "evaluate", fake_eval)
    out = mqar.train_run(_cfg(epochs=5, test_examples=16), "palimpsa", 16, 1e-2, 0, torch.device("cpu"))
    assert out["stopped_at_epoch"] == 1 and out["steps"] == 4
    assert 16 not in calls  # only validation splits (8 examples) were evaluated


def test_set_recipe_authors_brings_its_data_fields_unless_set(tmp_path):
    args = _args(["--set", "recipe=authors"])
    cfg = mqar.config_from_args(args)
    assert (cfg.filler, cfg.layout, cfg.decay_init, cfg.early_stop, cfg.warmup) == ("zero", "dense", "small", 0.99, 0.0)
    cfg = mqar.config_from_args(_args(["--set", "filler=random", "--set", "recipe=authors"]))
    assert cfg.filler == "random" and cfg.layout == "dense"


def _args(extra):
    import argparse
    parser = argparse.ArgumentParser()
    mqar.add_arguments(parser)
    return parser.parse_args(["--config", "quick", *extra])


def test_authors_recipe_refuses_warmup(tmp_path, capsys):
    assert main(["mqar", "--out", str(tmp_path), "--set", "recipe=authors", "--set", "warmup=0.1"]) == 2
    assert "warmup: the authors' recipe has no warm-up" in capsys.readouterr().err
