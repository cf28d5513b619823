"""Every bad input of `metaplastic convert`: exit code 2, a one-line message naming it, no DST left behind."""
import os
import subprocess
import sys

import pytest
import torch

from metaplastic.cli import main

pytest.importorskip("transformers")
from helpers import copy_dir, edit_config, tiny_mamba2, write_hf, write_mamba_ssm  # noqa: E402


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "src"
    write_hf(tiny_mamba2(tie_word_embeddings=False), path)
    return path


@pytest.fixture(scope="module")
def ssm_src(tmp_path_factory):
    path = tmp_path_factory.mktemp("ssm") / "src"
    write_mamba_ssm(tiny_mamba2(vocab_size=48), path, weights="safetensors", unpadded_vocab=45)
    return path



def edit_weights(path, fn):
    from safetensors.torch import load_file, save_file
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bad_bin(path):
    src = path / "model.safetensors"
    from safetensors.torch import load_file
    torch.save(load_file(str(src)), path / "pytorch_model.bin")
    src.unlink()
    truncate(path / "pytorch_model.bin")


def drop_weights(path):
    (path / "model.safetensors").unlink()


CASES = {  # name -> (source fixture, mutation, words the message must contain)
    "no config": ("hf", lambda p: (p / "config.json").unlink(), "config.json"),
    "unreadable config": ("hf", lambda p: (p / "config.json").write_text("{not json"), "config.json"),
    "unknown model_type": ("hf", lambda p: edit_config(p, model_type="bert2"), "unknown model_type"),
    "transformer": ("hf", lambda p: edit_config(p, model_type="llama", num_attention_heads=4), "Transformer"),
    "gated deltanet": ("hf", lambda p: edit_config(p, model_type="gated_deltanet"), "Gated DeltaNet"),
    "missing key": ("hf", lambda p: edit_weights(p, lambda s: s.pop("backbone.layers.1.mixer.D")),
                    "missing key 'backbone.layers.1.mixer.D'"),
    "unexpected key": ("hf", lambda p: edit_weights(p, lambda s: s.update(extra=torch.zeros(2))),
                       "unexpected key 'extra'"),
    "shape mismatch": ("hf", lambda p: edit_config(p, state_size=7), "shape mismatch"),
    "truncated safetensors": ("hf", lambda p: truncate(p / "model.safetensors"), "model.safetensors"),
    "truncated bin": ("ssm", bad_bin, "pytorch_model.bin"),
    "no weights": ("hf", drop_weights, "no weights"),
    "d_intermediate": ("ssm", lambda p: edit_config(p, d_intermediate=64), "d_intermediate"),
    "attention layers": ("ssm", lambda p: edit_config(p, attn_layer_idx=[1]), "attention layers"),
    "mamba1": ("ssm", lambda p: edit_config(p, ssm_cfg={"d_state": 6}), "Mamba1"),
    "bad vocab padding": ("ssm", lambda p: edit_config(p, pad_vocab_size_multiple=32), "shape mismatch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exit_code_2_and_no_dst(case, hf_src, ssm_src, tmp_path, capsys):
    kind, mutate, words = CASES[case]
    src = copy_dir(hf_src if kind == "hf" else ssm_src, tmp_path / "src")
    mutate(src)
    dst = tmp_path / "out" / "dst"
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("metaplastic convert: error:") and words in err, err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_missing_src_and_existing_dst(hf_src, tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(hf_src), str(dst)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(dst) == ["keep.txt"]


def test_failure_with_force_keeps_the_old_dst(hf_src, tmp_path, capsys):
    src = copy_dir(hf_src, tmp_path / "src")
    edit_weights(src, lambda s: s.pop("backbone.norm_f.weight"))
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", str(src), str(dst), "--force"]) == 2
    assert os.listdir(dst) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_process_exit_code(tmp_path):
    """The installed entry point, in a fresh process: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "metaplastic", "convert", str(tmp_path / "nowhere"),
                           str(tmp_path / "dst")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "does not exist" in proc.stderr


@pytest.mark.parametrize("cfg, expected", [
    ({"model_type": "mamba2"}, ("hf", "Mamba2")),
    ({"d_model": 64, "n_layer": 2}, ("mamba_ssm", "Mamba2")),
    ({"model_type": "gated_deltanet"}, ("fla", "Gated DeltaNet")),
    ({"model_type": "gla"}, ("fla", "GLA")),
    ({"model_type": "palimpsa"}, ("authors", "Palimpsa")),
    ({"model_type": "meta_mamba2"}, ("authors", "MetaMamba2")),
    ({"model_type": "mamba"}, None), ({"model_type": "mesa_net"}, None), ({"model_type": "llama"}, None), ({}, None),
])
def test_each_config_is_recognised_by_at_most_one_source_format(cfg, expected):
    """The table of source formats has one row per format; no two rows claim the same ``config.json``."""
    from metaplastic.models.convert import FORMATS
    claims = [fmt for fmt in FORMATS if fmt.recognise(cfg)]
    if expected is None:
        assert claims == []
        return
    assert len(claims) == 1, [fmt.name for fmt in claims]
    assert claims[0].name == expected[0] and expected[1] in claims[0].architectures
