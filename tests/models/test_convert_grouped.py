"""``metaplastic convert --importance-groups G``: the twins share each importance rate within G groups of a
head's value rows; identity init stays output-identical to transformers' Mamba2; a G that does not divide the
head's value width exits 2 naming it, before anything is written."""
import pytest
import torch

from metaplastic.cli import main

transformers = pytest.importorskip("transformers")


def tiny_mamba2(path):
    """A small transformers Mamba2 (head_dim 8, 4 heads) saved in the Hugging Face format."""
    cfg = transformers.Mamba2Config(vocab_size=37, hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8,
                                    state_size=6, n_groups=2, expand=2, conv_kernel=4, chunk_size=4,
                                    pad_token_id=None, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.3 * torch.randn(p.shape)) if not name.endswith("A_log") else p.copy_(torch.rand(p.shape))
    model.save_pretrained(path)
    return model


def test_convert_with_two_importance_groups(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_mamba2(src)
    assert main(["convert", str(src), str(dst), "--importance-groups", "2", "--verify", "--no-progress"]) == 0
    assert "verify: OK" in capsys.readouterr().out  # γ = 0: logits equal transformers' Mamba2
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(dst))
    assert model.config.importance_groups == 2
    for layer in model.backbone.layers:
        assert layer.mixer.importance.groups == 2
        assert layer.mixer.importance.W_b2.out_features == 4 * 2  # H·G rates


def test_groups_that_do_not_divide_the_value_width_exit_2_by_name(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_mamba2(src)
    capsys.readouterr()  # (what writing the source printed)
    assert main(["convert", str(src), str(dst), "--importance-groups", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--importance-groups 3" in err and "head_v_dim=8" in err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]
