"""``metaplastic demo``: the tour writes its outputs and a summary, and reports failing steps loudly."""
import pytest
import torch

from metaplastic import demo
from metaplastic.cli import main

CHECKPOINT = "tiny Mamba2 checkpoint (transformers, seed 0)"
CONVERT = "conversion to MetaMamba2 with --verify"


def test_tiny_checkpoint_is_reproducible(tmp_path):
    from safetensors.torch import load_file
    a = load_file(demo.build_tiny_mamba2(tmp_path / "a") / "model.safetensors")
    b = load_file(demo.build_tiny_mamba2(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_and_conversion_steps(tmp_path):
    pytest.importorskip("metaplastic.models.convert")
    results = demo.run_demo(tmp_path, steps=[CHECKPOINT, CONVERT])
    assert [r.ok for r in results] == [True, True], results
    assert (tmp_path / "meta_mamba2_tiny" / "config.json").exists()
    assert "verify: OK" in (tmp_path / "convert.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "2/2 steps passed" in summary and "[convert.txt](convert.txt)" in summary


def test_a_failing_step_is_reported(tmp_path, monkeypatch, capsys):
    def broken(argv, log=None):
        if argv[0] == "verify":
            return 1
        raise RuntimeError("table1 exploded")
    monkeypatch.setattr(demo, "_cli", broken)
    results = demo.run_demo(tmp_path, steps=["symbolic and numeric verification", "Table 1"])
    assert [r.ok for r in results] == [False, False]
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("FAILED") == 2 and "RuntimeError: table1 exploded" in summary
    assert "step 'Table 1' FAILED" in capsys.readouterr().err


def test_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["demo", "--out", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ("summary.md", "verify.txt", "table1.md", "convert.txt", "capacity/capacity.png",
                 "capacity/capacity.json", "mamba2_tiny/config.json", "meta_mamba2_tiny/config.json"):
        assert (tmp_path / name).exists(), name
    summary = (tmp_path / "summary.md").read_text()
    assert "5/5 steps passed" in summary and "![capacity](capacity/capacity.png)" in summary
