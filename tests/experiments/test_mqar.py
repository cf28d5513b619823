"""The MQAR harness: state accountings, initialisation rules, convergence flag, lr selection, end to end."""
import json
import math
import sys

import pytest
import torch

from metaplastic.cli import main
from metaplastic.experiments import mqar


def _tiny(**kw):
    base = dict(name="tiny", vocab_size=16, d_model=16, settings=((16, 2), (16, 4)), state_budget=128,
                train_examples=32, val_examples=8, test_examples=8, epochs=1, batch_size=16, lrs=(1e-2,),
                seeds=(0,), models=("mamba2",), smoke=True)
    base.update(kw)
    return mqar.MQARConfig(**base)


# ----------------------------------------------------------------------------- state accountings

def test_matched_floats_and_matched_key_width():
    """Matched floats: state_size() (precision included) fits the budget. Matched key width: the memory
    matrix H·K·V fits it, so the metaplastic twin has its point-posterior twin's shape and twice its floats."""
    budget = 256
    point = mqar.MQARModel("mamba2", 16, 32, budget)
    floats = mqar.MQARModel("meta_mamba2", 16, 32, budget)
    width = mqar.MQARModel("meta_mamba2@width", 16, 32, budget)
    H, K, V = point.memory_shape()
    assert point.state_size() == H * K * V <= budget
    assert floats.state_size() <= budget and floats.memory_shape()[1] < K  # a smaller N pays for the precision
    assert width.memory_shape() == (H, K, V) and width.state_size() == 2 * H * K * V
    pal = mqar.MQARModel("palimpsa@width", 16, 32, budget)
    h, k, v = pal.memory_shape()
    assert h * k * v <= budget < 2 * budget and pal.state_size() == 2 * h * k * v


# ----------------------------------------------------------------------------- initialisation rules

def _decay_at_zero_input(mixer):
    """α = exp(log_decay) that the mixer hands to its scan for a zero input, [H] (captured, not recomputed)."""
    module = sys.modules[type(mixer).__module__]
    if not hasattr(module, "scan"):
        pytest.skip("the mixer's module does not call a module-level scan")
    seen = {}
    original = module.scan

    def capture(objective, q, k, v, **kwargs):
        seen["g"] = kwargs["log_decay"]
        return original(objective, q, k, v, **kwargs)

    module.scan = capture
    try:
        with torch.no_grad():
            mixer(torch.zeros(1, 2, mixer.hidden_size))
    finally:
        module.scan = original
    return seen["g"][0, 0].double().exp()


@pytest.mark.parametrize("name", ["mamba2", "meta_mamba2", "gated_deltanet", "palimpsa", "mesanet"])
def test_every_decay_starts_in_the_usable_range(name):
    torch.manual_seed(0)
    model = mqar.MQARModel(name, 16, 32, 256, decay_range=(0.9, 0.999))
    for mixer in model.mixers:
        alpha = _decay_at_zero_input(mixer)
        assert bool(((alpha >= 0.9 - 1e-6) & (alpha <= 0.999 + 1e-6)).all()), alpha


def test_mesanet_native_decay_starts_near_one_half():
    """Without the rule MesaNet's α = σ(a_proj h) starts near σ(0) = 0.5 (PyTorch's default bias)."""
    torch.manual_seed(0)
    model = mqar.MQARModel("mesanet", 16, 32, 256, decay_range=None)
    alpha = _decay_at_zero_input(model.mixers[0])
    assert bool((alpha < 0.8).all()), alpha


@pytest.mark.parametrize("gamma_init", [0, 1])
def test_gamma_init(gamma_init):
    model = mqar.MQARModel("meta_mamba2", 16, 32, 256, gamma_init=gamma_init)
    for m in model.mixers:
        assert torch.equal(m.importance.gamma, torch.full_like(m.importance.gamma, float(gamma_init)))


# ----------------------------------------------------------------------------- convergence flag

def test_final_loss_is_the_mean_of_the_last_tenth():
    assert mqar.final_loss([5.0] * 90 + [0.1] * 10) == pytest.approx(0.1)
    assert mqar.final_loss([3.0] * 18 + [1.0, 2.0]) == pytest.approx(1.5)
    assert mqar.final_loss([0.7, 0.2]) == pytest.approx(0.2)  # at least one step


@pytest.mark.parametrize("final,threshold,expected", [(0.05, 0.1, True), (0.1, 0.1, True), (0.1001, 0.1, False),
                                                      (float("nan"), 0.1, False), (float("inf"), 0.1, False)])
def test_converged_flag(final, threshold, expected):
    assert mqar.is_converged(final, threshold) is expected


def test_loss_curve_and_spread():
    assert mqar.loss_curve([1, 2, 3, 4, 5, 6], 3) == [1.5, 3.5, 5.5]
    assert mqar.loss_curve([1, 2], 50) == [1, 2]
    s = mqar.spread([0.5, 0.7, 0.9])
    assert s == {"mean": 0.7, "std": 0.2, "min": 0.5, "max": 0.9}
    assert mqar.spread([0.3])["std"] == 0.0


# ----------------------------------------------------------------------------- training and outputs

def test_training_is_reproducible_from_seed():
    cfg = _tiny()
    a = mqar.train_run(cfg, "mamba2", 16, 1e-2, 3, torch.device("cpu"))
    b = mqar.train_run(cfg, "mamba2", 16, 1e-2, 3, torch.device("cpu"))
    c = mqar.train_run(cfg, "mamba2", 16, 1e-2, 4, torch.device("cpu"))
    assert a["loss_curve"] == b["loss_curve"] and a["val"] == b["val"]
    assert a["loss_curve"] != c["loss_curve"]


def test_lr_is_chosen_on_validation_and_only_the_chosen_lr_is_tested(monkeypatch):
    """Validation accuracy is faked so that the smaller lr wins; the reported runs are all at that lr."""
    real = mqar.train_run

    def fake(cfg, entry, seq_len, lr, seed, device, data=None, bar=None):
        out = real(cfg, entry, seq_len, lr, seed, device, data, bar)
        out["val"] = {p: (0.9 if lr == 1e-3 else 0.1) for p in out["val"]}
        return out

    monkeypatch.setattr(mqar, "train_run", fake)
    result = mqar.run_mqar(_tiny(lrs=(1e-2, 1e-3), seeds=(0, 1, 2)), progress=False)
    r = result["results"]["mamba2"]
    assert r["lr_selection"] == {"0.01": 0.1, "0.001": 0.9} and r["best_lr"] == 1e-3
    assert [run["lr"] for run in r["runs"]] == [1e-3] * 3 and [run["seed"] for run in r["runs"]] == [0, 1, 2]
    for s in r["settings"]:
        assert len(s["accuracy"]) == 3 and s["mean"] == pytest.approx(sum(s["accuracy"]) / 3, abs=1e-4)


def test_cli_quick_end_to_end(tmp_path):
    rc = main(["mqar", "--config", "quick", "--set", "train_examples=32", "--set", "epochs=1", "--set",
               "val_examples=8", "--set", "test_examples=16", "--set", 'models=["mamba2", "meta_mamba2@width"]',
               "--set", "lrs=[1e-3, 3e-3]", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "mqar.json").read_text())
    assert result["config"]["smoke"] is True and result["config"]["filler"] == "random"
    for entry, accounting in (("mamba2", "floats = shape"), ("meta_mamba2@width", "matched shape")):
        r = result["results"][entry]
        assert r["accounting"] == accounting and r["parameters"] > 0 and set(r["lr_selection"]) == {"0.001", "0.003"}
        assert [s["pairs"] for s in r["settings"]] == [2, 4] and r["converged"] in ("0/2", "1/2", "2/2")
        for run in r["runs"]:
            assert len(run["loss_curve"]) == 2 and isinstance(run["converged"], bool)
            assert all(0 <= a <= 1 for a in run["test"].values()) and math.isfinite(run["final_loss"])
        for s in r["settings"]:
            assert len(s["accuracy"]) == 2 and s["std"] >= 0
    assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_quick_full(tmp_path):
    assert main(["mqar", "--config", "quick", "--out", str(tmp_path)]) == 0


def test_cli_rejects_bad_input(tmp_path, capsys):
    pytest.importorskip("metaplastic.models")
    from metaplastic.cli import main
    assert main(["mqar", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["mqar", "--lrs", "-1", "--out", str(tmp_path)]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err


def test_test_settings_run_on_the_model_of_the_longest_shorter_training_length(monkeypatch):
    """Settings tested beyond training go to the model trained at the longest training length not above
    theirs, are reported per seed with ``trained=False``, and are marked in the table."""
    seen = []
    real = mqar.evaluate

    def spy(model, inputs, labels, batch_size, device):
        seen.append((id(model), tuple(inputs.shape), int((labels != -100).sum(-1).max())))
        return real(model, inputs, labels, batch_size, device)

    monkeypatch.setattr(mqar, "evaluate", spy)
    cfg = _tiny(vocab_size=32, settings=((16, 2), (32, 2)), test_settings=((24, 3), (48, 6), (32, 8)), seeds=(0, 1))
    result = mqar.run_mqar(cfg, progress=False)
    r = result["results"]["mamba2"]
    beyond = [s for s in r["settings"] if not s["trained"]]
    assert [(s["seq_len"], s["pairs"], s["trained_at"]) for s in beyond] == [(24, 3, 16), (48, 6, 32), (32, 8, 32)]
    assert all(len(s["accuracy"]) == 2 for s in beyond)
    # every tested split reaches the model trained at its length: the split of (24, 3) follows the T=16 test
    shapes = [shape for _, shape, _ in seen]
    assert (8, 24) in shapes and (8, 48) in shapes and (8, 32) in shapes
    by_model = {}
    for model, shape, pairs in seen:
        by_model.setdefault(model, []).append((shape[1], pairs))
    for evaluated in by_model.values():
        lengths = {L for L, _ in evaluated}
        assert lengths in ({16}, {32}, {16, 24}, {32, 48})  # validation runs, then tests (trained, then beyond)
    assert "T=48, 6 pairs †" in mqar.summary_table(result)


@pytest.mark.parametrize("test_settings,message", [
    (((8, 2),), "shorter than every training length"),
    (((16, 4),), "also a training setting"),
    (((16, 5),), "too short for 5 pairs"),
])
def test_bad_test_settings_are_refused_by_name(test_settings, message):
    with pytest.raises(ValueError, match=message):
        mqar.validate_config(_tiny(test_settings=test_settings))


def test_worker_processes_give_the_same_results():
    """``jobs=2`` (one model per spawned process) reproduces the single-process results exactly."""
    cfg = _tiny(models=("mamba2", "gated_deltanet"), epochs=1)
    one = mqar.run_mqar(cfg, "cpu", progress=False)["results"]
    two = mqar.run_mqar(mqar.replace(cfg, jobs=2), "cpu", progress=False)["results"]
    for entry in cfg.models:
        for a, b in zip(one[entry]["runs"], two[entry]["runs"]):
            a, b = dict(a), dict(b)
            a.pop("seconds"), b.pop("seconds")
            assert a == b


def test_recall_against_groups_reads_g_from_the_config_and_v_for_the_default(tmp_path):
    """Rows sorted by G; a run without importance_groups is the per-value default, G = V."""
    cfg = _tiny(models=("meta_mamba2",), test_settings=((32, 4),), vocab_size=32)
    per_value = mqar.run_mqar(cfg, progress=False)
    grouped = mqar.run_mqar(mqar.replace(cfg, importance_groups=1), progress=False)
    rows = mqar.recall_against_groups([per_value, grouped], "meta_mamba2")
    V = per_value["results"]["meta_mamba2"]["memory"]["V"]
    assert [row["groups"] for row in rows] == [1, V]
    assert rows[1]["settings"][-1] == {"seq_len": 32, "pairs": 4, "trained": False,
                                       **{k: per_value["results"]["meta_mamba2"]["settings"][-1][k]
                                          for k in ("mean", "std")}}
    png = mqar.plot_recall_against_groups(rows, "meta_mamba2", tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
