"""lm-evaluation-harness on converted models: per-sample log-likelihoods equal the source's.

The task is tiny_choice/ (a multiple-choice YAML over a JSONL beside it, offline). Every model runs through
lm-eval's own ``HFLM`` at batch size 4 (so requests of different lengths are right-padded together, as the
harness does) and once more at ``max_length=8``, where the harness truncates long contexts on the left. The
source is transformers' ``Mamba2ForCausalLM`` loaded from its directory, or, for fla's Gated DeltaNet
and GLA (fla's model runs only on GPUs), the reference of tests/models/test_convert_{gdn,gla}.py (fla's naive
recurrence and pure-torch norms) wrapped for HFLM. The converted directory (``--init identity``) is loaded by
HFLM through transformers' Auto classes.

Tolerance: a per-sample log-likelihood is a sum over 1-3 continuation tokens of log-softmax over 37 logits
of magnitude <= ~10; the logits agree to a few float32 roundings of the largest one (<= 1e-5 relative in
tests/models/test_convert_*.py), so each log-likelihood agrees to <= 1e-4 absolute (measured: <= 2.2e-5).
Accuracy, ``acc_norm`` and ``is_greedy`` must then be equal.
"""
import json

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from metaplastic.cli import main  # noqa: E402

from tiny_lm import ARCHITECTURES, TASK_DIR, ReferenceLM, convert_sources, tokenizer  # noqa: E402

TOL = 1e-4  # absolute, per sample (see the module docstring)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: the hub and datasets run offline; datasets caches under the test's directory; data_files
    resolve against the task's folder (the working directory)."""
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASK_DIR)


@pytest.fixture(autouse=True)
def no_environment_report(monkeypatch):
    """lm-eval's results would carry an environment report (it shells out to torch's collect_env, seconds)."""
    import lm_eval.evaluator
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)


def loglikelihoods(samples):
    """``{(doc_id, choice): (log-likelihood, is_greedy)}`` from lm-eval's logged samples."""
    out = {}
    for sample in samples:
        for choice, (ll, greedy) in enumerate(sample["filtered_resps"]):
            out[sample["doc_id"], choice] = (float(ll), str(greedy) == "True")
    return out


def evaluate(lm):
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    result = simple_evaluate(model=lm, tasks=["tiny_choice"], task_manager=tasks, log_samples=True,
                             bootstrap_iters=0)
    metrics = result["results"]["tiny_choice"]
    return loglikelihoods(result["samples"]["tiny_choice"]), (metrics["acc,none"], metrics["acc_norm,none"])


def assert_same_scores(got, want):
    (ll, acc), (ll_ref, acc_ref) = got, want
    assert ll.keys() == ll_ref.keys() and len(ll) == 39  # 12 documents, 39 choices
    diff = max(abs(ll[key][0] - ll_ref[key][0]) for key in ll)
    assert diff <= TOL, diff
    assert [ll[key][1] for key in ll] == [ll_ref[key][1] for key in ll]
    assert acc == acc_ref
    assert max(abs(v[0]) for v in ll_ref.values()) > 1.0  # the log-likelihoods are not trivially small
    print(f"max |log-likelihood difference| {diff:.3e}")
    return diff


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``{arch: (source model, source dir, converted dir)}``."""
    return convert_sources(tmp_path_factory.mktemp("sources"))


def source_lm(arch, source, src, batch_size=4, max_length=None):
    """HFLM on the source: transformers' ``Mamba2ForCausalLM`` from ``src`` (named explicitly: importing fla
    maps ``model_type: mamba2`` in transformers' Auto classes to fla's GPU-only Mamba2), or the fla reference."""
    if arch == "mamba2":
        from transformers import Mamba2ForCausalLM
        model = Mamba2ForCausalLM.from_pretrained(src, dtype=torch.float32)
        return HFLM(pretrained=model, tokenizer=tokenizer(), batch_size=batch_size, max_length=max_length)
    return HFLM(pretrained=ReferenceLM(arch, source), tokenizer=tokenizer(), batch_size=batch_size,
                max_length=max_length)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("max_length", [None, 8])
def test_converted_model_scores_as_its_source_through_hflm(converted, arch, max_length):
    source, src, dst = converted[arch]
    ours = HFLM(pretrained=str(dst), device="cpu", dtype="float32", batch_size=4, max_length=max_length)
    assert type(ours.model).__name__ == "MetaplasticForCausalLM"
    assert_same_scores(evaluate(ours), evaluate(source_lm(arch, source, src, max_length=max_length)))


@pytest.mark.slow  # ~30 s: lm-eval's command line indexes its ~230 built-in task folders before every run
def test_eval_command_on_converted_directory_offline(converted, tmp_path):
    """``metaplastic eval`` (lm-eval's command line) on the converted Mamba2 directory writes per-sample
    log-likelihoods equal to those of transformers' Mamba2 run by HFLM with the same arguments."""
    source, src, dst = converted["mamba2"]
    out = tmp_path / "out"
    assert main(["eval", "--model", "hf", "--model_args", f"pretrained={dst},dtype=float32", "--device", "cpu",
                 "--tasks", "tiny_choice", "--include_path", ".", "--batch_size", "4", "--log_samples",
                 "--output_path", str(out)]) == 0
    (samples_file,) = out.rglob("samples_tiny_choice_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    (results_file,) = out.rglob("results_*.json")
    metrics = json.loads(results_file.read_text())["results"]["tiny_choice"]
    assert_same_scores((loglikelihoods(samples), (metrics["acc,none"], metrics["acc_norm,none"])),
                       evaluate(source_lm("mamba2", source, src)))


def test_eval_without_lm_eval_exits_2_with_the_install_line(monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["eval", "--model", "hf", "--tasks", "piqa"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'metaplastic[eval]'" in err, err


def test_batch_padding_leaves_scores_unchanged(converted):
    """Batch size 4 (right-padded rows) against batch size 1 (no padding) on the converted GLA model."""
    _, _, dst = converted["gla"]
    batched = evaluate(HFLM(pretrained=str(dst), device="cpu", dtype="float32", batch_size=4))
    single = evaluate(HFLM(pretrained=str(dst), device="cpu", dtype="float32", batch_size=1))
    assert_same_scores(batched, single)
