"""``--set KEY=VALUE``: JSON values checked against the config's fields; bad input exits 2 naming the key."""
import time

import pytest

from metaplastic.cli import main
from metaplastic.experiments import capacity, mqar
from metaplastic.experiments.overrides import apply_overrides, parse_assignments


def test_values_are_json_and_checked_against_the_field_types():
    cfg = apply_overrides(mqar.CONFIGS["quick"], ["vocab_size=96", "settings=[[48, 6], [96, 12]]", "epochs=6",
                                                  "lrs=[0.001, 3e-3]", "filler=zero", 'models=["mamba2"]',
                                                  "importance_groups=null", "decay_range=[0.8, 0.99]", "smoke=false"])
    assert cfg.vocab_size == 96 and cfg.epochs == 6 and cfg.filler == "zero" and cfg.smoke is False
    assert cfg.settings == ((48, 6), (96, 12)) and cfg.lrs == (0.001, 0.003) and cfg.models == ("mamba2",)
    assert cfg.importance_groups is None and cfg.decay_range == (0.8, 0.99)
    assert apply_overrides(mqar.CONFIGS["quick"], ["lrs=[1]"]).lrs == (1.0,)  # an int is a number
    assert apply_overrides(mqar.CONFIGS["quick"], ["epochs=3.0"]).epochs == 3


def test_parse_assignments():
    assert parse_assignments(["a=1", "b=[1, 2]", 'c="x"', "d=word"]) == {"a": 1, "b": [1, 2], "c": "x", "d": "word"}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_assignments(["epochs"])
    with pytest.raises(ValueError, match="lrs: .* is not valid JSON"):
        parse_assignments(["lrs=[1e-3,"])


@pytest.mark.parametrize("item,match", [
    ("nope=1", "--set nope: unknown key"), ("name=x", "--set name: unknown key"),
    ("epochs=abc", "epochs: expected an integer"), ("epochs=1.5", "epochs: expected an integer"),
    ("epochs=true", "epochs: expected an integer"), ("settings=[[64]]", "settings: expected a list of 2 items"),
    ("lrs=0.1", "lrs: expected a list"), ("smoke=1", "smoke: expected true or false"),
    ("filler=3", "filler: expected a string")])
def test_bad_overrides_are_refused(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(mqar.CONFIGS["quick"], [item])


@pytest.mark.parametrize("argv,match", [
    (["--set", "nope=1"], "--set nope: unknown key"),
    (["--set", "epochs=0"], "epochs must be positive"),
    (["--set", "lrs=[-1]"], "lrs: learning rates must be positive"),
    (["--set", "filler=ones"], "filler must be one of"),
    (["--set", "settings=[[15, 4]]"], "settings: seq_len=15 is too short"),
    (["--set", 'models=["nope"]'], "models: unknown model 'nope'"),
    (["--set", 'models=["mamba2@width"]'], "a point-posterior model has no precision"),
    (["--set", 'models=["palimpsa@keys"]'], "unknown accounting"),
    (["--set", "gamma_init=2"], "gamma_init must be 0 or 1"),
    (["--set", "decay_range=[0.99, 0.9]"], "decay_range must satisfy"),
    (["--models", "nope"], "unknown model 'nope'"),
])
def test_mqar_cli_refuses_before_training(argv, match, tmp_path, capsys):
    started = time.perf_counter()
    assert main(["mqar", "--config", "quick", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not (tmp_path / "mqar.json").exists()
    assert time.perf_counter() - started < 20  # refused before any training


def test_importance_groups_flag(tmp_path, capsys):
    if mqar.importance_groups_supported():
        cfg = apply_overrides(mqar.CONFIGS["quick"], ["importance_groups=2"])
        mqar.validate_config(cfg)
        return
    for cmd in (["mqar", "--config", "quick"], ["capacity", "--quick"]):
        assert main([*cmd, "--importance-groups", "2", "--out", str(tmp_path)]) == 2
        assert "importance_groups is not supported by this installation" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [(["--set", "nope=1"], "--set nope: unknown key"),
                                        (["--set", "dim=0"], "dim must be positive"),
                                        (["--set", "n_grid=4"], "n_grid: expected a list"),
                                        (["--set", 'models=["nope"]'], "models: unknown model 'nope'")])
def test_capacity_cli_refuses(argv, match, tmp_path, capsys):
    assert main(["capacity", "--quick", "--out", str(tmp_path), *argv]) == 2
    assert match in capsys.readouterr().err


def test_capacity_set_runs(tmp_path):
    import json
    assert main(["capacity", "--config", "quick", "--set", 'models=["mamba2", "meta_mamba2"]', "--set",
                 "n_grid=[2, 4]", "--set", "trials=2", "--set", "dim=8", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "capacity.json").read_text())
    assert out["config"]["name"] == "quick" and out["config"]["K"] == 8 and out["config"]["importance_groups"] is None
    assert out["results"]["isotropic"]["mamba2"]["N"] == [2, 4]
    assert capacity.CONFIGS["full"].trials == 64


def test_dictionary_fields_merge_over_the_config():
    base = mqar.replace(mqar.CONFIGS["quick"], mixer_kwargs={"palimpsa": {"expand_v": 2, "num_heads": 2},
                                                             "mamba2": {"n_groups": 4}})
    cfg = apply_overrides(base, ['mixer_kwargs={"palimpsa": {"expand_v": 1, "num_heads": null}, "mamba2": null, '
                                 '"gated_deltanet": {"num_heads": 8}}'])
    assert cfg.mixer_kwargs == {"palimpsa": {"expand_v": 1}, "gated_deltanet": {"num_heads": 8}}
    assert base.mixer_kwargs["palimpsa"] == {"expand_v": 2, "num_heads": 2}
    with pytest.raises(ValueError, match="mixer_kwargs: expected a JSON object"):
        apply_overrides(base, ["mixer_kwargs=[1]"])
    assert apply_overrides(base, ['filler=["zero", "random"]']).filler == ("zero", "random")
    assert apply_overrides(base, ["filler=zero"]).filler == "zero"
