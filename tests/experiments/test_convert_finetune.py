"""Convert-then-fine-tune: the converted model starts equal to its source; the three arms; the CLI."""
import json

import pytest
import torch
from helpers import assert_close

from metaplastic.cli import main
from metaplastic.experiments import convert_finetune as cf
from metaplastic.experiments.mqar import fit
from metaplastic.experiments.mqar_data import mqar


def _cfg(**kw):
    return cf.ConvertFinetuneConfig(**{**cf.CONFIGS["quick"].__dict__, **kw})


def test_converted_model_starts_equal_to_its_source():
    torch.manual_seed(0)
    source = cf.build_source(_cfg())
    converted = cf.convert(source, None, torch.Generator().manual_seed(0))
    assert [layer.mixer.registry_name for layer in converted.backbone.layers] == ["meta_mamba2"] * 2
    assert [layer.mixer.registry_name for layer in source.backbone.layers] == ["mamba2"] * 2  # untouched
    ids = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(converted(ids).logits, source(ids).logits, rtol=0, atol=1e-5)
    assert cf.max_logit_difference(source, converted, ids) <= 1e-5
    assert cf.max_logit_difference(source, converted, ids, torch.float64) <= 1e-12  # exact up to float64 rounding


def test_run_stops_when_the_conversion_is_not_output_preserving(monkeypatch):
    real = cf.convert

    def broken(source, rank, generator):
        model = real(source, rank, generator)
        for m in model.modules():
            if getattr(m, "gamma", None) is not None:
                m.gamma.data.fill_(1e3)
        return model

    monkeypatch.setattr(cf, "convert", broken)
    cfg = _cfg(source_steps=1, finetune_steps=1, train_examples=16, test_examples=8, seeds=(0,))
    with pytest.raises(RuntimeError, match="does not start equal to its source"):
        cf.run_convert_finetune(cfg, progress=False)


def test_metaplastic_path_arm_trains_only_the_importance_parameters():
    torch.manual_seed(0)
    model = cf.convert(cf.build_source(_cfg()), None, torch.Generator().manual_seed(0))
    names = cf.importance_parameters(model)
    assert names and all(".importance." in n for n in names)
    assert {n.split(".importance.")[1] for n in names} == {"W_b1.weight", "W_b2.weight", "W_b2.bias", "b_scale", "gamma"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cf.set_trainable(model, names)
    x, y = mqar(32, 32, 4, 32, torch.Generator().manual_seed(0))
    fit(model, x, y, steps=3, lr=1e-2, batch_size=16, seed=0, device=torch.device("cpu"))
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in names)
    assert any(not torch.equal(before[n], after[n]) for n in names)  # γ moved off 0
    assert all(g >= 0 for layer in cf.gammas(model) for g in layer)


def test_cli_quick_end_to_end(tmp_path):
    rc = main(["convert-finetune", "--config", "quick", "--set", "source_steps=4", "--set", "finetune_steps=2",
               "--set", "train_examples=32", "--set", "test_examples=8", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "convert_finetune.json").read_text())
    assert result["config"]["smoke"] is True and result["identity_max_abs_diff"] <= 1e-9
    assert result["identity_max_abs_diff_float32"] <= 1e-5
    assert set(result["summary"]) == {cf.SOURCE, *cf.ARMS}
    for arm in result["summary"].values():
        assert set(arm) == {"in distribution", "beyond"} and set(arm["beyond"]) == {"64,4", "64,8"}
        assert all(len(s["values"]) == 2 for s in arm["in distribution"].values())
    assert all(len(r["arms"]) == 3 for r in result["runs"])
    assert (tmp_path / "convert_finetune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("item,match", [("settings=[[32, 2], [64, 4]]", "must share one sequence length"),
                                        ("head_dim=5", "head_dim=5 must divide"), ("nope=1", "unknown key")])
def test_cli_refuses(item, match, tmp_path, capsys):
    assert main(["convert-finetune", "--set", item, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.slow
def test_cli_quick_full(tmp_path):
    assert main(["convert-finetune", "--config", "quick", "--out", str(tmp_path)]) == 0
