"""The MQAR decision rule (paired per-seed differences, verdicts), several fillers in one run, and a study set
from the command line alone."""
import json
import math

import pytest

from metaplastic.cli import main
from metaplastic.experiments import mqar
from metaplastic.experiments.mqar_compare import automatic_pairs, comparisons, verdict


@pytest.mark.parametrize("diffs,mean,se,expected", [
    ([0.1, 0.2, 0.3], 0.2, 0.1 / math.sqrt(3), "a>b"),          # every sign +, 0.2 > 2·0.0577
    ([-0.05, -0.05], -0.05, 0.0, "b>a"),                         # no spread: any common sign decides
    ([0.1, -0.1, 0.3], 0.1, 0.2 / math.sqrt(3), "undecided"),   # the sign changes
    ([0.01, 0.5], 0.255, 0.49 / 2, "undecided"),                 # same sign, 0.255 < 2·0.245
    ([0.0, 0.0, 0.0], 0.0, 0.0, "undecided"),
])
def test_verdict(diffs, mean, se, expected):
    m, s, v = verdict(diffs)
    assert m == pytest.approx(mean) and s == pytest.approx(se) and v == expected


def test_one_seed_is_never_decided():
    assert verdict([0.4]) == (0.4, None, "undecided")


def test_differences_pair_runs_of_the_same_seed():
    setting = dict(seq_len=16, pairs=2, trained=True)
    result = {"config": {"seeds": [0, 1, 2], "filler": "random", "comparisons": None},
              "results": {"palimpsa": {"settings": [dict(setting, seeds=[0, 1, 2], accuracy=[0.9, 0.8, 0.7])]},
                          "mamba2": {"settings": [dict(setting, seeds=[2, 0, 1], accuracy=[0.6, 0.5, 0.4])]}}}
    [c] = comparisons(result)
    assert (c["a"], c["b"], c["setting"], c["filler"]) == ("palimpsa", "mamba2", [16, 2], "random")
    assert c["seeds"] == [0, 1, 2] and c["differences"] == [0.4, 0.4, 0.1] and c["verdict"] == "a>b"


def test_automatic_pairs_put_each_metaplastic_model_against_each_baseline():
    models = ["palimpsa@shape", "not_palimpsa", "gated_deltanet", "meta_mamba2", "mesanet"]
    assert automatic_pairs(models) == [("palimpsa@shape", "not_palimpsa"), ("palimpsa@shape", "gated_deltanet"),
                                       ("meta_mamba2", "not_palimpsa"), ("meta_mamba2", "gated_deltanet")]


def test_comparisons_must_name_models_of_the_run(tmp_path, capsys):
    assert main(["mqar", "--out", str(tmp_path), "--set", 'comparisons=[["palimpsa", "nope"]]']) == 2
    assert "comparisons: 'nope' is not among the models" in capsys.readouterr().err


def test_both_fillers_and_comparisons_end_to_end(tmp_path, capsys):
    """A study set from the command line only: two fillers, a b ≡ 0 control, the authors' recipe; mqar.json
    holds per-filler settings and a comparison per pair, setting and filler; the table and the plot show them."""
    rc = main(["mqar", "--models", "palimpsa@shape", "not_palimpsa", "gated_deltanet", "--set", "vocab_size=48",
               "--set", "settings=[[48, 6]]", "--set", "recipe=authors", "--set", 'filler=["zero", "random"]',
               "--set", "d_model=16", "--set", "state_budget=128", "--set", "train_examples=16", "--set",
               "val_examples=8", "--set", "test_examples=8", "--set", "epochs=1", "--set", "batch_size=8",
               "--set", "test_settings=[[64, 8]]", "--set", 'mixer_kwargs={"palimpsa": {"expand_v": 2}}',
               "--seeds", "0", "1", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "mqar.json").read_text())
    assert result["config"]["recipe"] == "authors" and result["config"]["layout"] == "dense"
    r = result["results"]["not_palimpsa"]
    assert r["b_zero"] is True and r["state_floats"] == r["memory"]["H"] * r["memory"]["K"] * r["memory"]["V"]
    assert result["results"]["palimpsa@shape"]["memory"] == r["memory"]
    assert [(s["seq_len"], s["pairs"], s["filler"]) for s in r["settings"]] == [
        (48, 6, "zero"), (64, 8, "zero"), (48, 6, "random"), (64, 8, "random")]
    comps = result["comparisons"]
    assert {(c["a"], c["b"]) for c in comps} == {("palimpsa@shape", "not_palimpsa"), ("palimpsa@shape", "gated_deltanet")}
    assert len(comps) == 2 * 2 * 2  # pairs × settings × fillers
    for c in comps:
        assert set(c) >= {"a", "b", "setting", "differences", "mean", "se", "verdict"} and len(c["differences"]) == 2
        assert c["verdict"] in ("a>b", "b>a", "undecided")
    assert "**zero filler**" in out and "**random filler**" in out and "**Paired comparisons**" in out
    assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_from_the_command_line_replace_the_configs_pairs():
    import argparse
    parser = argparse.ArgumentParser()
    mqar.add_arguments(parser)
    cfg = mqar.config_from_args(parser.parse_args(["--config", "decide", "--models", "palimpsa@shape", "mamba2"]))
    assert cfg.comparisons is None and cfg.filler == ("zero", "random")
    assert mqar.CONFIGS["decide"].comparisons  # the config's own pairs, for its own models
