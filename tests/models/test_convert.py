"""`metaplastic convert`: tiny Mamba2 checkpoints of both formats, built here, come back output-identical.

The reference is always transformers' Mamba2ForCausalLM holding the source weights.
"""
import math
import os

import pytest
import torch

from metaplastic.cli import main
from metaplastic.oracles import relative_error

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from metaplastic import MetaplasticForCausalLM, convert_mamba2  # noqa: E402

from helpers import assert_close, skip_unless_grouped, tiny_mamba2, write_hf, write_mamba_ssm  # noqa: E402


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie,shard,n_groups", [(True, False, 2), (False, True, 1)])
def test_hf_checkpoint_converts_output_identical(tmp_path, tie, shard, n_groups):
    skip_unless_grouped(n_groups)
    source = tiny_mamba2(tie_word_embeddings=tie, n_groups=n_groups)
    write_hf(source, tmp_path / "src", shard=shard)
    if shard:
        assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    result = convert_mamba2(tmp_path / "src", tmp_path / "dst", progress=False)
    assert result.source_format == "hf"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert isinstance(model, MetaplasticForCausalLM)
    assert model.config.mixer == "meta_mamba2" and model.config.tie_word_embeddings == tie
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"tiny": true}'
    assert_close(logits(model, IDS), logits(source, IDS), rtol=1e-5)
    prompt = IDS[:, :4]
    assert model.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == \
        source.generate(prompt, max_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_mamba_ssm_checkpoint_converts_output_identical(tmp_path, weights):
    # vocabulary 45 padded to 48: the checkpoint's embedding has 48 rows, as mamba_ssm writes it
    skip_unless_grouped(2)
    source = tiny_mamba2(3, vocab_size=48, tie_word_embeddings=True, n_groups=2)
    write_mamba_ssm(source, tmp_path / "src", weights=weights, unpadded_vocab=45)
    lines = []
    result = convert_mamba2(tmp_path / "src", tmp_path / "dst", progress=False, verify=True, log=lines.append)
    assert result.source_format == "mamba_ssm"
    assert max(result.max_abs_diff, result.max_abs_diff_reloaded) <= 1e-4 and len(lines) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.config.vocab_size == 48 and model.config.mixer_kwargs["n_groups"] == 2
    ids = IDS % 45
    assert_close(logits(model, ids), logits(source, ids), rtol=1e-5)
    assert model.generate(ids[:, :4], max_new_tokens=5, do_sample=False).tolist() == \
        source.generate(ids[:, :4], max_new_tokens=5, do_sample=False).tolist()


def test_cli_verify_prints_differences_and_force_replaces(tmp_path, capsys):
    skip_unless_grouped(2)
    write_hf(tiny_mamba2(), tmp_path / "src")
    dst = tmp_path / "dst"
    assert main(["convert", str(tmp_path / "src"), str(dst), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "max |logit difference|" in line]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, out
    assert "verify: OK" in out
    (dst / "stale.txt").write_text("old")
    assert main(["convert", str(tmp_path / "src"), str(dst), "--init", "paper", "--force", "--no-progress"]) == 0
    assert not (dst / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]  # no temporary directories left


def test_paper_init_is_not_output_preserving(tmp_path):
    source = tiny_mamba2()
    write_hf(source, tmp_path / "src")
    convert_mamba2(tmp_path / "src", tmp_path / "dst", init="paper", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    gammas = torch.stack([layer.mixer.importance.gamma for layer in model.backbone.layers])
    assert torch.all(gammas == 1)
    assert relative_error(logits(model, IDS), logits(source, IDS)) > 1e-3


def test_bfloat16_weights_are_the_source_rounded(tmp_path):
    source = tiny_mamba2(tie_word_embeddings=False)
    write_hf(source, tmp_path / "src")
    convert_mamba2(tmp_path / "src", tmp_path / "dst", dtype="bfloat16", progress=False)
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "dst" / "model.safetensors"))
    for key, value in source.state_dict().items():
        assert state[key].dtype == torch.bfloat16
        assert torch.equal(state[key], value.to(torch.bfloat16)), key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_finetuning_a_converted_model_opens_gamma_and_lowers_the_loss(tmp_path):
    write_hf(tiny_mamba2(), tmp_path / "src")
    convert_mamba2(tmp_path / "src", tmp_path / "dst", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst").train()
    ids = torch.randint(0, 37, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    gammas = torch.stack([layer.mixer.importance.gamma.detach() for layer in model.backbone.layers])
    assert gammas.abs().max() > 1e-3, gammas
    assert losses[-1] < losses[0], losses
    assert all(math.isfinite(x) for x in losses)
