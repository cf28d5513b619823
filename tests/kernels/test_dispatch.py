"""``metaplastic.kernels.dispatch.scan``: the backend it picks, the ones it refuses (by name), and its results."""
import subprocess
import sys

import pytest
import torch

import metaplastic
from metaplastic.kernels.dispatch import BACKENDS, scan, select_backend

from helpers import assert_close, scan_inputs

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


INPUTS = dict(beta_per_value=False, prior_precision=False, decay_min=0.6)  # B=1, H=2, K=3, V=2 below


@pytest.mark.parametrize("name", list(metaplastic.registry))
def test_auto_on_cpu(name):
    obj = metaplastic.registry[name].objective
    expected = "chunk" if obj.likelihood in ("dot", "dot_diag") else "reference"
    assert select_backend(obj, CPU, "auto") == expected


@pytest.mark.parametrize("name", list(metaplastic.registry))
def test_auto_on_cuda(name):
    """On CUDA tensors auto means Triton: the chunked kernel where it covers the settings, else the recurrent."""
    obj = metaplastic.registry[name].objective
    chunked = obj.likelihood in ("dot", "dot_diag") and obj.forgetting != "vector"
    assert select_backend(obj, CUDA, "auto") == ("triton_chunk" if chunked else "triton_recurrent")
    if obj.likelihood == "dot_diag":
        b_per_value = torch.zeros(1, 1, 1, 1)
        per_value = "triton_per_value" if obj.forgetting != "vector" else "triton_recurrent"
        assert select_backend(obj, CUDA, "auto", b=b_per_value) == per_value
        with pytest.raises(ValueError, match=r"per value channel|vector"):
            select_backend(obj, CUDA, "triton_chunk", b=b_per_value)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "longhorn", "mesanet", "meta_gated_deltanet"])
def test_chunk_backend_refuses_regression_by_name(name):
    obj, x = scan_inputs(name, 1, 6, 2, 3, 2, b_per_value=False, **INPUTS)
    with pytest.raises(ValueError, match=r"backend='chunk'.*regression"):
        scan(obj, **x, backend="chunk")


def test_unknown_backend_and_missing_device(monkeypatch):
    obj, x = scan_inputs("mamba2", 1, 6, 2, 3, 2, b_per_value=False, **INPUTS)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        scan(obj, **x, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend in ("triton", "triton_chunk", "triton_per_value", "triton_recurrent"):
        with pytest.raises(ValueError, match=f"backend='{backend}'.*CUDA"):
            select_backend(obj, CPU, backend)
    assert set(BACKENDS) >= {"auto", "triton", "chunk", "reference"}


def test_triton_chunk_refuses_vector_forgetting():
    with pytest.raises(ValueError, match="vector"):
        select_backend(metaplastic.registry["gla"].objective, CUDA, "triton_chunk")
    assert select_backend(metaplastic.registry["gla"].objective, CUDA, "triton") == "triton_recurrent"


@pytest.mark.parametrize("name,b_per_value", [("palimpsa", False), ("palimpsa", True), ("gla", False),
                                              ("gated_deltanet", False)])
def test_dispatch_results_equal_the_reference(name, b_per_value):
    """auto / chunk / reference through the dispatcher give metaplastic.scan's result (float64)."""
    obj, x = scan_inputs(name, 1, 9, 2, 3, 2, b_per_value=b_per_value, **INPUTS)
    kw = dict(scale=0.5, output_final_state=True, output_variance=obj.posterior != "point")
    ref = metaplastic.scan(obj, **x, **kw)
    backends = ["auto", "reference"] + (["chunk"] if obj.likelihood != "regression" else [])
    for backend in backends:
        got = scan(obj, **x, **kw, backend=backend, chunk_size=4)
        assert isinstance(got, metaplastic.ScanResult)
        assert_close(got.output, ref.output, rtol=1e-10, msg=str(backend))
        for key in ref.final_state:
            assert_close(got.final_state[key], ref.final_state[key], rtol=1e-10, msg=str((backend, key)))
        if ref.variance is not None:
            assert_close(got.variance, ref.variance, rtol=1e-10, msg=str(backend))


@pytest.mark.parametrize("backend,name", [("triton", "mamba2"), ("triton", "gated_deltanet")])
def test_dispatch_triton_in_the_interpreter(backend, name):
    """On CPU under TRITON_INTERPRET=1 (tests/conftest.py), 'triton' runs: chunked or recurrent kernel."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or CUDA")
    try:
        import metaplastic.kernels.fused_recurrent  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"fused recurrent kernel not available: {exc}")
    obj, x = scan_inputs(name, 1, 5, 2, 3, 2, b_per_value=False, **INPUTS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x32 = {key: val.float().to(device) for key, val in x.items()}
    ref = metaplastic.scan(obj, **x, scale=0.5)
    got = scan(obj, **x32, scale=0.5, backend=backend, chunk_size=16)
    assert_close(got.output.cpu(), ref.output, rtol=1e-4)


def test_bench_kernels_cli(tmp_path, capsys):
    """`metaplastic bench kernels` at a tiny shape: the table, the JSON records, and one-line user errors."""
    import json

    from metaplastic.cli import main
    out = tmp_path / "bench.json"
    rc = main(["bench", "kernels", "--device", "cpu", "--models", "mamba2", "palimpsa", "--shape", "1,9,1,4,8",
               "--reps", "1", "--ref-reps", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert {(r["model"], r["b"], r["backend"]) for r in records} == {
        ("mamba2", "-", "reference"), ("mamba2", "-", "chunk"), ("palimpsa", "H", "reference"),
        ("palimpsa", "H", "chunk"), ("palimpsa", "G4", "reference"), ("palimpsa", "G4", "chunk"),
        ("palimpsa", "V", "reference"), ("palimpsa", "V", "chunk")}
    # default groups: 1, V and those of 4, 16 that divide V = 8
    assert {r["groups"] for r in records if r["model"] == "palimpsa"} == {1, 4, 8}
    assert all(r["speedup_fwdbwd"] is not None for r in records if r["backend"] == "chunk")
    for r in records:
        assert r["error"] is None and r["device"] == "cpu" and r["shape"] == "B=1,T=9,H=1,K=4,V=8"
        assert r["date"] and r["torch"] == torch.__version__ and r["machine"] and r["threads"] == 1
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["saved_bytes_per_token_head"] > 0
    printed = capsys.readouterr().out
    assert "palimpsa" in printed
    assert "targets: not measured on a CPU" in printed and "None" not in printed, printed
    assert main(["bench", "kernels", "--models", "nope"]) == 2
    assert main(["bench", "kernels", "--shape", "1,2,3"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "kernels", "--device", "cuda"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["bench", "kernels", "--device", "cpu", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graphs needs --device cuda" in err and len(err.strip().splitlines()) == 1, err


def test_bench_kernels_target_lines_read_as_words():
    """Each target line says its value, its target and met / missed; what was not measured, or has no target,
    says so in words (never ``None``)."""
    from metaplastic.kernels.bench import format_targets
    summary = [{"name": "a ÷ b", "value": 1.0, "target": 1.25, "met": True},
               {"name": "c ÷ b", "value": 2.0, "target": 1.3, "met": False},
               {"name": "d ÷ b", "value": None, "target": 3.0, "met": None},
               {"name": "e ÷ b", "value": 2.5, "target": None, "met": None}]
    lines = format_targets(summary, "cuda").splitlines()
    assert lines[0] == "targets:" and len(lines) == 5
    assert "1.00" in lines[1] and lines[1].endswith("(target ≤ 1.25)  met")
    assert lines[2].endswith("(target ≤ 1.3)  missed")
    assert "not measured" in lines[3] and lines[3].endswith("(target ≤ 3)")
    assert "2.50" in lines[4] and lines[4].endswith("(no target)")
    assert "None" not in "\n".join(lines)
    unmeasured = [dict(t, value=None, met=None) for t in summary]
    assert format_targets(unmeasured, "cpu").startswith("targets: not measured on a CPU")


def test_bench_kernels_targets_with_cuda_graph_times():
    """With ``--cuda-graphs`` each target is stated twice, from the eager times and from the graph replays."""
    from metaplastic.kernels.bench import targets

    def rec(model, backend, b, eager, graph):
        return {"model": model, "backend": backend, "b": b, "error": None, "fwdbwd_ms": eager,
                "graph_fwdbwd_ms": graph, "saved_bytes_per_token_head": 2048.0}
    records = [rec("mamba2", "triton_chunk", "-", 10.0, 8.0), rec("fla chunk_simple_gla", "external", "-", 4.0, 2.0),
               rec("palimpsa", "triton_chunk", "H", 15.0, 9.0), rec("palimpsa", "triton_chunk", "G8", 30.0, 16.0),
               rec("palimpsa", "triton_per_value", "V", 40.0, 36.0)]
    got = {t["name"]: t["value"] for t in targets(records)}
    assert got["Mamba2 chunked fwd+bwd ÷ fla chunk_simple_gla"] == 2.5
    assert got["Mamba2 chunked fwd+bwd ÷ fla chunk_simple_gla, CUDA graphs"] == 4.0
    assert got["Palimpsa grouped G = 8 fwd+bwd ÷ Mamba2 chunked, CUDA graphs"] == 2.0
    assert got["per-value Palimpsa fwd+bwd ÷ Mamba2 chunked (ours), CUDA graphs"] == 4.5
    assert got["Palimpsa b [B,T,H] (G = 1) fwd+bwd ÷ Mamba2 chunked"] == 1.5
    assert not any("CUDA graphs" in t["name"] for t in targets([dict(r, graph_fwdbwd_ms=None) for r in records]))


def test_bench_kernels_groups_dtype_targets(tmp_path):
    """`bench kernels` with grouped b, bf16 inputs, a backend filter and the target summary (tiny, CPU)."""
    import json

    from metaplastic.cli import main
    out, tgt = tmp_path / "bench.json", tmp_path / "targets.json"
    rc = main(["bench", "kernels", "--device", "cpu", "--models", "mamba2", "palimpsa", "--shape", "1,9,1,4,4",
               "--reps", "1", "--threads", "1", "--groups", "2", "--dtype", "bfloat16", "--backends", "chunk",
               "--json", str(out), "--targets", str(tgt)])
    assert rc == 0
    records = json.loads(out.read_text())
    assert {(r["model"], r["b"], r["backend"]) for r in records} == {
        ("mamba2", "-", "chunk"), ("palimpsa", "H", "chunk"), ("palimpsa", "G2", "chunk"), ("palimpsa", "V", "chunk")}
    assert all(r["dtype"] == "bfloat16" and r["error"] is None for r in records)
    names = [t["name"] for t in json.loads(tgt.read_text())]
    assert any("per-value" in n for n in names) and any("fla" in n for n in names)
    assert main(["bench", "kernels", "--device", "cpu", "--shape", "1,9,1,4,4", "--groups", "3"]) == 2


def test_the_table_names_every_backend_once():
    """Every concrete backend is one row ``(coverage rule, run)``, its rule the one of the Triton-free
    coverage module; the composites list rows only."""
    from metaplastic.kernels.coverage import COVERAGE
    from metaplastic.kernels.dispatch import PREFERENCES, TABLE
    assert set(TABLE) | set(PREFERENCES) == set(BACKENDS) and not set(TABLE) & set(PREFERENCES)
    assert all(TABLE[name][0] is COVERAGE[name] for name in TABLE) and set(COVERAGE) == set(TABLE)
    assert all(name in TABLE for names in PREFERENCES.values() for name in names)


def test_choosing_a_backend_imports_no_triton():
    """Every choice, on either device, for every registry entry, is made without importing Triton."""
    code = ("import os, sys, torch, metaplastic\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from metaplastic.kernels.dispatch import BACKENDS, select_backend\n"
            "for spec in metaplastic.registry.values():\n"
            "    for device in ('cpu', 'cuda'):\n"
            "        for backend in BACKENDS:\n"
            "            for b in (None, torch.zeros(1, 1, 2, 4)):\n"
            "                try:\n"
            "                    select_backend(spec.objective, torch.device(device), backend, b=b, V=4)\n"
            "                except ValueError:\n"
            "                    pass\n"
            "print('triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
