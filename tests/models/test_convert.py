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


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_verify_compares_a_rounded_dst_with_the_source_rounded_alike(tmp_path, capsys, dtype):
    """A bfloat16 / float16 DST holds the source's weights rounded: transformers' Mamba2 holding the same
    rounded weights gives its logits up to float32 arithmetic (the verify bounds, 1e-4 and 1e-5 relative),
    while the unrounded source is further away than those bounds (so the reference matters)."""
    skip_unless_grouped(2)
    source = tiny_mamba2()
    write_hf(source, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", dtype, "--verify",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"verify: OK (identity init: logits equal those of the transformers Mamba2ForCausalLM with its weights " \
           f"rounded to {dtype}" in out, out
    dst = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)
    rounded = tiny_mamba2()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(getattr(torch, dtype)).float())
    assert_close(logits(dst, IDS), logits(rounded, IDS), rtol=1e-5)
    assert relative_error(logits(dst, IDS), logits(source, IDS)) > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_verify_fails_when_dst_departs_by_less_than_the_rounding(tmp_path, capsys, monkeypatch, dtype):
    """A stored weight 1 % off (the final norm's scale, so every logit moves by about 1 %) is caught in every
    dtype, although in bfloat16 it moves the logits less than the rounding itself does (a tolerance scaled to
    the rounding's effect would pass it)."""
    from metaplastic.models import checkpoint_io
    from metaplastic.models.convert import verify_verdict
    skip_unless_grouped(2)
    write_hf(tiny_mamba2(), tmp_path / "src")
    write = checkpoint_io.StreamingSafetensorsWriter.write

    def one_percent_off(self, name, tensor):
        write(self, name, tensor * 1.01 if name == "backbone.norm_f.weight" else tensor)

    monkeypatch.setattr(checkpoint_io.StreamingSafetensorsWriter, "write", one_percent_off)
    result = convert_mamba2(tmp_path / "src", tmp_path / "dst", dtype=dtype, verify=True, progress=False,
                            log=lambda line: None)
    passed, line = verify_verdict(result, "identity")
    assert passed is False and line.startswith("verify: FAILED"), line
    assert result.max_abs_diff <= 1e-4  # the in-memory conversion is right: the stored file departs
    if dtype == "bfloat16":
        assert result.max_abs_diff_rounded < result.rounding_effect
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--dtype", dtype, "--verify", "--force",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1 and "verify: FAILED" in out and "verify: OK" not in out, out


def test_verify_gives_no_verdict_for_an_init_that_changes_the_outputs(tmp_path, capsys):
    write_hf(tiny_mamba2(), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--init", "paper", "--verify",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verify: no verdict: --init paper" in out and "verify: OK" not in out, out


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


def test_help_names_every_architecture_convert_reads(capsys, monkeypatch):
    from metaplastic.models.convert import FORMATS
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps at the terminal's width: one line per command
    with pytest.raises(SystemExit):
        main(["--help"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("convert "))
    # the authors' architectures (Palimpsa, MetaMamba2) are named together as "paper-authors"
    for name in {*(a for fmt in FORMATS if fmt.name != "authors" for a in fmt.architectures), "paper-authors"}:
        assert name in line, (name, line)
