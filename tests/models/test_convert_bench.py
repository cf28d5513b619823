"""`metaplastic bench convert`, at tiny shapes (the real mamba2-130m run takes minutes: see the README)."""
import math
import struct

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow
def test_bench_reports_time_and_memory_ratios(tmp_path):
    from metaplastic.models.bench import benchmark
    from safetensors import safe_open
    tiny = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                n_groups=1, expand=2, conv_kernel=4, tie_word_embeddings=True)
    result = benchmark(tmp_path, repeats=1, shapes=tiny)
    with safe_open(str(tmp_path / "mamba2-random" / "model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("backbone.embeddings.weight").get_shape()) == (101, 32)
    assert result["checkpoint_bytes"] > 0
    for mode in ("convert", "load_save"):
        assert result[mode]["seconds"] > 0 and result[mode]["peak_rss"] >= result[mode]["rss_after_imports"] > 0
    # the size the ratios divide by, against what safetensors itself reads from the file: the tensors'
    # bytes (float32) and the file's length (8-byte header length, the header, then the data)
    path = tmp_path / "mamba2-random" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensor_bytes = sum(4 * math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert result["checkpoint_bytes"] == tensor_bytes == path.stat().st_size - 8 - header
    # the ratios are measurements, not checkable against an independent value: finite and positive
    for key in ("time_ratio", "peak_over_size", "peak_above_imports_over_size", "load_save_peak_over_size"):
        assert math.isfinite(result[key]) and result[key] >= 0, key
    assert result["time_ratio"] > 0 and result["peak_over_size"] > 0
