"""`metaplastic convert`: tiny Mamba2 checkpoints of both formats, built here, come back output-identical.

The reference is always transformers' Mamba2ForCausalLM holding the source weights.
"""
import json
import math
import os

import pytest
import torch

from metaplastic.cli import main
from metaplastic.oracles import relative_error

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM  # noqa: E402

from metaplastic.models import MetaplasticForCausalLM, convert_mamba2  # noqa: E402


def tiny_hf_model(vocab=37, tie=True, n_groups=2, layers=2, seed=0):
    cfg = Mamba2Config(vocab_size=vocab, hidden_size=16, num_hidden_layers=layers, num_heads=4, head_dim=8,
                       state_size=6, n_groups=n_groups, expand=2, conv_kernel=4, chunk_size=4,
                       tie_word_embeddings=tie, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = Mamba2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move every weight off its default (ones, zeros, arange)
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(0.5 + 4 * torch.rand(p.shape, generator=gen)))
            elif name.endswith("dt_bias"):
                p.copy_(-2.0 + torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def write_hf(model, path, shard=False):
    model.save_pretrained(path, max_shard_size="20KB" if shard else "5GB")
    (path / "tokenizer.json").write_text('{"tiny": true}')


def write_mamba_ssm(model, path, weights="bin", pad_multiple=16, unpadded_vocab=None):
    """A directory in the original mamba_ssm layout (REFERENCES.md): config with d_model / ssm_cfg, the
    singular ``backbone.embedding.weight``, ``ngroups`` inside ``ssm_cfg``, a padded vocabulary."""
    c = model.config
    path.mkdir(parents=True, exist_ok=True)
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
              "vocab_size": unpadded_vocab or c.vocab_size,
              "ssm_cfg": {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel, "expand": c.expand,
                          "headdim": c.head_dim, "ngroups": c.n_groups},
              "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
              "fused_add_norm": True, "pad_vocab_size_multiple": pad_multiple,
              "tie_embeddings": c.tie_word_embeddings}
    (path / "config.json").write_text(json.dumps(config))
    state = {}
    for i in range(c.num_hidden_layers):
        p = f"backbone.layers.{i}."
        for key in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                    "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"):
            state[p + key] = model.state_dict()[p + key].clone()
    state["backbone.embedding.weight"] = model.backbone.embeddings.weight.detach().clone()
    state["backbone.norm_f.weight"] = model.backbone.norm_f.weight.detach().clone()
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()  # mamba_ssm saves the tied head too
    if weights == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        state.pop("lm_head.weight") if c.tie_word_embeddings else None
        save_file(state, str(path / "model.safetensors"))
    return path


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


IDS = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie,shard,n_groups", [(True, False, 2), (False, True, 1)])
def test_hf_checkpoint_converts_output_identical(tmp_path, tie, shard, n_groups):
    source = tiny_hf_model(tie=tie, n_groups=n_groups)
    write_hf(source, tmp_path / "src", shard=shard)
    if shard:
        assert (tmp_path / "src" / "model.safetensors.index.json").exists()
    result = convert_mamba2(tmp_path / "src", tmp_path / "dst", progress=False)
    assert result.source_format == "hf"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert isinstance(model, MetaplasticForCausalLM)
    assert model.config.mixer == "meta_mamba2" and model.config.tie_word_embeddings == tie
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"tiny": true}'
    assert relative_error(logits(model, IDS), logits(source, IDS)) < 1e-5
    prompt = IDS[:, :4]
    assert model.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == \
        source.generate(prompt, max_new_tokens=6, do_sample=False).tolist()


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_mamba_ssm_checkpoint_converts_output_identical(tmp_path, weights):
    # vocabulary 45 padded to 48: the checkpoint's embedding has 48 rows, as mamba_ssm writes it
    source = tiny_hf_model(vocab=48, tie=True, n_groups=2, seed=3)
    write_mamba_ssm(source, tmp_path / "src", weights=weights, unpadded_vocab=45)
    lines = []
    result = convert_mamba2(tmp_path / "src", tmp_path / "dst", progress=False, verify=True, log=lines.append)
    assert result.source_format == "mamba_ssm"
    assert max(result.max_abs_diff, result.max_abs_diff_reloaded) <= 1e-4 and len(lines) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert model.config.vocab_size == 48 and model.config.mixer_kwargs["n_groups"] == 2
    ids = IDS % 45
    assert relative_error(logits(model, ids), logits(source, ids)) < 1e-5
    assert model.generate(ids[:, :4], max_new_tokens=5, do_sample=False).tolist() == \
        source.generate(ids[:, :4], max_new_tokens=5, do_sample=False).tolist()


def test_cli_verify_prints_differences_and_force_replaces(tmp_path, capsys):
    write_hf(tiny_hf_model(), tmp_path / "src")
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
    source = tiny_hf_model()
    write_hf(source, tmp_path / "src")
    convert_mamba2(tmp_path / "src", tmp_path / "dst", init="paper", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    gammas = torch.stack([layer.mixer.importance.gamma for layer in model.backbone.layers])
    assert torch.all(gammas == 1)
    assert relative_error(logits(model, IDS), logits(source, IDS)) > 1e-3


def test_bfloat16_weights_are_the_source_rounded(tmp_path):
    source = tiny_hf_model(tie=False)
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
    write_hf(tiny_hf_model(), tmp_path / "src")
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
