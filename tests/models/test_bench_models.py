"""``metaplastic bench models`` at a tiny shape: records, ratios and the logit check."""
import json

from metaplastic.cli import main


def test_bench_models_writes_records(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "models", "--reps", "1", "--warmup", "0", "--layers", "1", "--seq-len", "8",
                 "--vocab", "32", "--d-model", "32", "--heads", "2", "--state-size", "4", "--groups", "1",
                 "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    by_model = {r["model"]: r for r in records}
    assert {"transformers", "mamba2", "meta_mamba2 b=V", "meta_mamba2 b=G1"} == set(by_model)
    assert by_model["transformers"]["ratio_fwd"] == 1.0
    for label in ("mamba2", "meta_mamba2 b=V"):
        r = by_model[label]
        assert r["error"] is None and r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["ratio_fwdbwd"] > 0
        assert r["max_abs_logit_diff"] <= 1e-4  # identity conversion: transformers' logits
        assert r["threads"] == 1 and r["torch"] and r["transformers"] and r["date"] and r["machine"]
    grouped = by_model["meta_mamba2 b=G1"]
    assert grouped["error"] is None or grouped["error"].startswith("skipped")


def test_bench_models_rejects_bad_arguments(capsys):
    assert main(["bench", "models", "--threads", "0"]) == 2
    assert "--threads must be positive" in capsys.readouterr().err
