"""Figures quoted in README.md and docs/ equal the committed result files they come from.

Each entry of ``FIGURES`` names a page, the sentence that quotes a figure (``{}`` where the figure stands),
the committed JSON file the figure comes from, how to read it there and how the page rounds it. The test
formats the file's value into the sentence and requires the page to contain the result (whitespace and line
breaks collapsed). A figure edited on the page without its file, a file re-measured without the page, or a
sentence reworded without this table all fail, naming the entry.

Beside them: the number of theorems the pages quote against the theorems the code defines, and the GPU
check's invocation and benchmark command against ``kernels/gpu_check.sh`` itself.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: str) -> Any:
    return json.loads((ROOT / path).read_text(encoding="utf-8"))


def _record(records: Any, **fields: Any) -> dict:
    """The one record of a list (or of ``records['records']``) whose fields equal ``fields``."""
    if isinstance(records, dict):
        records = records["records"]
    found = [r for r in records if all(r.get(k) == v for k, v in fields.items())]
    assert len(found) == 1, f"{len(found)} records match {fields}"
    return found[0]


def _capacity_recall(model: str, n: int, keys: str = "anisotropic") -> Callable[[Any], float]:
    def read(d: Any) -> float:
        res = d["results"][keys][model]
        return res["recall"][res["N"].index(n)]
    return read


def _mqar(model: str, seq_len: int, pairs: int, field: str) -> Callable[[Any], float]:
    def read(d: Any) -> float:
        (setting,) = [s for s in d["results"][model]["settings"] if (s["seq_len"], s["pairs"]) == (seq_len, pairs)]
        return setting[field]
    return read


def _comparison(a: str, b: str, seq_len: int, pairs: int, filler: str, field: str) -> Callable[[Any], float]:
    def read(d: Any) -> float:
        (c,) = [c for c in d["comparisons"]
                if (c["a"], c["b"], tuple(c["setting"]), c["filler"]) == (a, b, (seq_len, pairs), filler)]
        return c[field]
    return read


class Figure(NamedTuple):
    page: str
    sentence: str  # the page's text with {} where the figure stands
    source: str  # committed JSON file, relative to the repository root
    read: Callable[[Any], Any]
    fmt: str  # how the page rounds it


KERNELS_CPU = "kernels/results/bench_cpu.json"
KERNELS_GROUPS = "kernels/results/bench_cpu_groups_kernel.json"
KERNELS_GROUPS_PALIMPSA = "kernels/results/bench_cpu_groups_palimpsa.json"
H200 = "kernels/results/bench_h200.json"
H200_TRITON = "kernels/results/bench_h200_triton.json"
MODELS = "models/results/bench_models_cpu.json"
CONVERT = "models/results/bench_convert.json"
NUMERIC = "derivations/results/verify_numeric.json"
CAPACITY = "notebooks/figures/capacity_full.json"
MQAR = "notebooks/figures/mqar_study.json"
MQAR_DECIDE = "notebooks/figures/mqar_decide/mqar.json"
FRESH_CLONE = "tests/results/fresh_clone_run.json"
TRAFFIC = "kernels/results/traffic.json"


def _traffic_ratio(name: str) -> Callable[[Any], float]:
    return lambda d: d["ratios"][name]


def _traffic(model: str, b: str, backend: str, field: str) -> Callable[[Any], float]:
    def read(d: Any) -> float:
        (case,) = [c for c in d["cases"] if (c["model"], c["b"], c["backend"]) == (model, b, backend)]
        return case["ratio_to_floor"][field[6:]] if field.startswith("floor:") else case[field]
    return read
MQAR_G2 = "notebooks/figures/mqar_study_G2.json"


def _target(name_start: str) -> Callable[[Any], float]:
    def read(d: Any) -> float:
        (t,) = [t for t in d["targets"] if t["name"].startswith(name_start)]
        return t["value"]
    return read


def _speedup(model: str, backend: str, b: str) -> Callable[[Any], float]:
    return lambda d: _record(d, model=model, backend=backend, b=b)["speedup_fwdbwd"]


def _ms(model: str, backend: str, b: str, field: str = "fwdbwd_ms") -> Callable[[Any], float]:
    return lambda d: _record(d, model=model, backend=backend, b=b)[field]


def _ratio(model: str, field: str) -> Callable[[Any], float]:
    return lambda d: _record(d, model=model)[field]


FIGURES = [
    # README: results
    Figure("README.md", "to at most {} relative (tolerance 1e-6", NUMERIC, lambda d: d["max_error"], "{:.1e}"),
    Figure("README.md", "tolerance {}; the references compute in float32", NUMERIC, lambda d: d["tolerance"], "{:.0e}"),
    Figure("README.md", "transformers' Mamba2 by at most {}", MODELS,
           lambda d: _record(d, model="meta_mamba2 b=V")["max_abs_logit_diff"], "{:.1e}"),
    Figure("README.md", "converting takes {}× a plain safetensors load", CONVERT, lambda d: d["time_ratio"], "{:.2f}"),
    Figure("README.md", "peaks at {}× the checkpoint size", CONVERT, lambda d: d["peak_over_size"], "{:.2f}"),
    Figure("README.md", "Mamba2 {}× on the chunked torch path", KERNELS_CPU, _speedup("mamba2", "chunk", "-"), "{:.1f}"),
    Figure("README.md", "Palimpsa on the fused C kernel {}×", KERNELS_GROUPS, _speedup("palimpsa", "chunk", "V"), "{:.1f}"),
    Figure("README.md", "value channel and {}× with G = 4", KERNELS_GROUPS, _speedup("palimpsa", "chunk", "G4"), "{:.1f}"),
    Figure("README.md", "MetaMamba2 {}× and", KERNELS_GROUPS, _speedup("meta_mamba2", "chunk", "V"), "{:.1f}"),
    Figure("README.md", "MetaMamba2 35.0× and {}×", KERNELS_GROUPS, _speedup("meta_mamba2", "chunk", "G4"), "{:.1f}"),
    Figure("README.md", "gives {}× at G = 4", KERNELS_GROUPS_PALIMPSA, _speedup("palimpsa", "chunk", "G4"), "{:.1f}"),
    Figure("README.md", "takes {}× transformers' Mamba2 forward", MODELS, _ratio("meta_mamba2 b=V", "ratio_fwd"), "{:.2f}"),
    Figure("README.md", "forward and {}× forward+backward (targets", MODELS, _ratio("meta_mamba2 b=V", "ratio_fwdbwd"), "{:.2f}"),
    Figure("README.md", "our `mamba2` {}× /", MODELS, _ratio("mamba2", "ratio_fwd"), "{:.2f}"),
    Figure("README.md", "our `mamba2` 0.64× / {}×", MODELS, _ratio("mamba2", "ratio_fwdbwd"), "{:.2f}"),
    Figure("README.md", "Mamba2 forward+backward {} ms on the chunked Triton path", H200,
           _ms("mamba2", "triton_chunk", "-"), "{:.1f}"),
    Figure("README.md", "Palimpsa with head-shared `b` {} ms", H200, _ms("palimpsa", "triton_chunk", "H"), "{:.1f}"),
    Figure("README.md", "per value channel {} ms on the fused recurrent kernel", H200,
           _ms("palimpsa", "triton_recurrent", "V"), "{:.0f}"),
    Figure("README.md", "bf16 with the Triton backward and the per-value kernel: Mamba2 {} ms", H200_TRITON,
           _ms("mamba2", "triton_chunk", "-"), "{:.1f}"),
    Figure("README.md", "Palimpsa head-shared {} ms", H200_TRITON, _ms("palimpsa", "triton_chunk", "H"), "{:.1f}"),
    Figure("README.md", "per value channel {} ms ([`kernels/results/bench_h200_triton.json`]", H200_TRITON,
           _ms("palimpsa", "triton_per_value", "V"), "{:.1f}"),
    Figure("README.md", "kernel, {}× Mamba2's forward+backward on the H200", H200_TRITON,
           _target("per-value Palimpsa fwd+bwd"), "{:.1f}"),
    Figure("README.md", "pairs is {} for Mamba2", CAPACITY, _capacity_recall("mamba2", 48), "{:.2f}"),
    Figure("README.md", "{} for Palimpsa and MetaMamba2", CAPACITY, _capacity_recall("palimpsa", 48), "{:.2f}"),
    Figure("README.md", "{} for Palimpsa and MetaMamba2", CAPACITY, _capacity_recall("meta_mamba2", 48), "{:.2f}"),
    Figure("README.md", "{} for MesaNet", CAPACITY, _capacity_recall("mesanet", 48), "{:.2f}"),
    Figure("docs/testing.md", "a fresh clone took {} s in all", FRESH_CLONE, lambda d: d["wall_seconds"], "{}"),
    Figure("docs/testing.md", "476.8 s in all, {} s of it in pytest", FRESH_CLONE, lambda d: d["pytest_seconds"], "{}"),
    Figure("docs/testing.md", "({} passed, 55 skipped;", FRESH_CLONE, lambda d: d["result"]["passed"], "{}"),
    Figure("README.md", "T = 64, 8 pairs ({} ± 0.002)", MQAR_DECIDE,
           _comparison("palimpsa@shape", "not_palimpsa", 64, 8, "zero", "mean"), "{:+.3f}"),
    Figure("README.md", "T = 64, 8 pairs (+0.007 ± {})", MQAR_DECIDE,
           _comparison("palimpsa@shape", "not_palimpsa", 64, 8, "zero", "se"), "{:.3f}"),
    Figure("README.md", "T = 64, 16 pairs: {} ± 0.083)", MQAR_DECIDE,
           _comparison("palimpsa@floats", "not_palimpsa", 64, 16, "zero", "mean"), "{:+.3f}"),
    Figure("README.md", "T = 64, 16 pairs: -0.240 ± {})", MQAR_DECIDE,
           _comparison("palimpsa@floats", "not_palimpsa", 64, 16, "zero", "se"), "{:.3f}"),
    Figure("README.md", "Gated DeltaNet {} ±", MQAR, _mqar("gated_deltanet", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "Gated DeltaNet 0.94 ± {}", MQAR, _mqar("gated_deltanet", 64, 16, "std"), "{:.2f}"),
    Figure("README.md", "Mamba2 {} ± 0.05, Palimpsa", MQAR, _mqar("mamba2", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "Mamba2 0.91 ± {}, Palimpsa", MQAR, _mqar("mamba2", 64, 16, "std"), "{:.2f}"),
    Figure("README.md", "Palimpsa {} ± 0.09", MQAR, _mqar("palimpsa", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "Palimpsa 0.61 ± {}", MQAR, _mqar("palimpsa", 64, 16, "std"), "{:.2f}"),
    Figure("README.md", "MetaMamba2 {} ± 0.05; at", MQAR, _mqar("meta_mamba2", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "MetaMamba2 0.49 ± {}; at", MQAR, _mqar("meta_mamba2", 64, 16, "std"), "{:.2f}"),
    Figure("README.md", "MetaMamba2 reaches {} ± 0.17", MQAR, _mqar("meta_mamba2@width", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "MetaMamba2 reaches 0.79 ± {}", MQAR, _mqar("meta_mamba2@width", 64, 16, "std"), "{:.2f}"),
    Figure("README.md", "(G = 2: {} ± 0.05)", MQAR_G2, _mqar("meta_mamba2", 64, 16, "mean"), "{:.2f}"),
    Figure("README.md", "(G = 2: 0.80 ± {})", MQAR_G2, _mqar("meta_mamba2", 64, 16, "std"), "{:.2f}"),
    # docs/benchmarks.md: the conversion benchmark and the GPU prose
    Figure("docs/benchmarks.md", "| load + save | {} |", CONVERT, lambda d: d["load_save"]["seconds"], "{:.3f}"),
    Figure("docs/benchmarks.md", "| convert | {} |", CONVERT, lambda d: d["convert"]["seconds"], "{:.3f}"),
    Figure("docs/benchmarks.md", "| ratio | **{} ×** (target ≤ 2)", CONVERT, lambda d: d["time_ratio"], "{:.2f}"),
    Figure("docs/benchmarks.md", "| {} × checkpoint size (peak minus", CONVERT, lambda d: d["peak_over_size"], "{:.2f}"),
    Figure("docs/benchmarks.md", "RSS after imports: {} ×)", CONVERT, lambda d: d["peak_above_imports_over_size"],
           "{:.2f}"),
    Figure("docs/benchmarks.md", "| {} × checkpoint size |", CONVERT, lambda d: d["load_save_peak_over_size"], "{:.2f}"),
    Figure("docs/benchmarks.md", "The checkpoint is 516 MB ({} bytes)", CONVERT, lambda d: d["checkpoint_bytes"], "{}"),
    Figure("docs/benchmarks.md", "against 15.1 ms for Mamba2 ({}×)", H200, lambda d: _ms("palimpsa", "triton_chunk", "H")(d)
           / _ms("mamba2", "triton_chunk", "-")(d), "{:.2f}"),
    Figure("docs/benchmarks.md", "runs on the fused recurrent kernel, {} ms", H200,
           _ms("palimpsa", "triton_recurrent", "V"), "{:.1f}"),
    Figure("docs/benchmarks.md", "per-value Palimpsa takes {}× Mamba2's forward+backward", H200_TRITON,
           _target("per-value Palimpsa fwd+bwd"), "{:.1f}"),
    Figure("docs/benchmarks.md", "head-shared Palimpsa {}×", H200_TRITON, _target("Palimpsa b [B,T,H] (G = 1)"), "{:.2f}"),
    Figure("docs/benchmarks.md", "grouped (G = 8) {}×", H200_TRITON, _target("Palimpsa grouped G = 8"), "{:.2f}"),
    # docs/safety.md quotes the same conversion benchmark
    Figure("docs/gpu_kernels.md", "our Mamba2 {}× fla's `chunk_simple_gla` in bytes", TRAFFIC,
           _traffic_ratio("mamba2 triton_chunk / fla chunk_simple_gla (fwd+bwd bytes)"), "{:.2f}"),
    Figure("docs/gpu_kernels.md", "G = 1 {}× our Mamba2", TRAFFIC,
           _traffic_ratio("palimpsa G=1 / mamba2 triton_chunk (fwd+bwd bytes)"), "{:.2f}"),
    Figure("docs/gpu_kernels.md", "G = 8 {}× (target 2.5×", TRAFFIC,
           _traffic_ratio("palimpsa G=8 / mamba2 triton_chunk (fwd+bwd bytes)"), "{:.2f}"),
    Figure("docs/gpu_kernels.md", "the per-value backward {}× its forward in bytes", TRAFFIC,
           _traffic_ratio("palimpsa per value: backward / forward bytes"), "{:.2f}"),
    Figure("docs/gpu_kernels.md", "its forward in bytes and {}× in FLOPs", TRAFFIC,
           _traffic_ratio("palimpsa per value: backward / forward FLOPs"), "{:.2f}"),
    Figure("docs/gpu_kernels.md", "| Mamba2 `triton_chunk` | 5496 | {} |", TRAFFIC,
           _traffic("mamba2", "-", "triton_chunk", "fwdbwd_bytes"), "{:.0f}"),
    Figure("docs/gpu_kernels.md", "| fla `chunk_simple_gla` (recorded) | 3100 | {} |", TRAFFIC,
           lambda d: d["fla_chunk_simple_gla"]["fwdbwd_bytes"], "{:.0f}"),
    Figure("docs/gpu_kernels.md", "| Palimpsa G = 8 `triton_chunk` | 9399 | {} |", TRAFFIC,
           _traffic("palimpsa", "G8", "triton_chunk", "fwdbwd_bytes"), "{:.0f}"),
    Figure("docs/gpu_kernels.md", "| Palimpsa per value `triton_per_value` | 7328 | 28472 | {} |", TRAFFIC,
           _traffic("palimpsa", "V", "triton_per_value", "floor:fwdbwd_bytes"), "{:.2f}"),
    Figure("docs/safety.md", "at mamba2-130m shapes: {} s", CONVERT, lambda d: d["convert"]["seconds"], "{:.3f}"),
    Figure("docs/safety.md", "s, {}× a plain safetensors load + save", CONVERT, lambda d: d["time_ratio"], "{:.2f}"),
    # docs/derivations.md: the numeric verification
    Figure("docs/derivations.md", "the tolerance {}: the references compute in float32", NUMERIC,
           lambda d: d["tolerance"], "{:.0e}"),
]


def _page_text(page: str) -> str:
    return re.sub(r"\s+", " ", (ROOT / page).read_text(encoding="utf-8"))


@pytest.mark.parametrize("fig", FIGURES, ids=[f"{f.page}: {f.sentence}" for f in FIGURES])
def test_quoted_figure_equals_its_result_file(fig: Figure) -> None:
    value = fig.read(_load(fig.source))
    expected = fig.sentence.format(fig.fmt.format(value).replace("e-0", "e-"))
    assert expected in _page_text(fig.page), (
        f"{fig.page} should read {expected!r}: {fig.source} holds {value!r} (rounded {fig.fmt}); "
        f"re-measure or correct the page, and update this table if the sentence changed")


def test_theorem_counts_equal_the_code() -> None:
    """README and docs/derivations.md quote how many theorems `metaplastic verify --symbolic` runs."""
    from metaplastic import registry
    from metaplastic.derivations.proofs import theorems
    n = len(theorems())
    assert f"{n} of {n} theorems hold" in _page_text("README.md")
    assert f"the {len(list(registry))} derivations and the limits" in _page_text("README.md")
    assert f"`metaplastic verify --symbolic` runs {n} theorems (the {len(list(registry))} derivations" \
        in _page_text("docs/derivations.md")


def _dry_run(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["DRY_RUN"] = "1"
    proc = subprocess.run(["bash", str(ROOT / "kernels" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_gpu_check_invocation_and_default_folder(tmp_path: Path) -> None:
    """Every page invokes the script one way, and its default output folder is the one the docs name."""
    _dry_run(tmp_path)
    assert (tmp_path / "gpu_out").is_dir(), "without OUTDIR or $OUT the script writes into gpu_out"
    assert "(default: `$OUT` when that is set, else `gpu_out`)" in _page_text("docs/gpu_kernels.md")
    allowed = {"bash kernels/gpu_check.sh [OUTDIR]", "bash kernels/gpu_check.sh OUTDIR",
               "DRY_RUN=1 bash kernels/gpu_check.sh"}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in page.read_text(encoding="utf-8").splitlines():
            for code in re.findall(r"`([^`]*gpu_check\.sh[^`]*)`|^((?:\w+=\S+ )*bash \S*gpu_check\.sh.*)$", line):
                code = (code[0] or code[1]).strip()
                if code not in ("kernels/gpu_check.sh", "gpu_check.sh"):  # the file's name, not an invocation
                    assert code in allowed, f"{page.name}: `{code}` is not one of {sorted(allowed)}"


def test_gpu_check_benchmark_command_is_the_documented_one(tmp_path: Path) -> None:
    """docs/gpu_kernels.md quotes the benchmark step of the script word for word."""
    (line,) = [ln for ln in _dry_run(tmp_path, "OUTDIR").splitlines() if ln.startswith("== bench: ")]
    command = re.sub(r"^== bench: \S+ -m ", "", line)
    assert f"`{command}`" in _page_text("docs/gpu_kernels.md"), command
