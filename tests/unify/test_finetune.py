"""`metaplastic finetune` on CPU (gloo): a tiny Mamba2 built with transformers, converted, then fine-tuned.

- two processes (FSDP2 shards; started by torchrun or by ``--nproc-per-node``) follow the loss curve of one
  process with the same global batch, and end at the same weights (float tolerance: only reduction order differs);
- a run stopped after step k and resumed from its DCP checkpoint ends bit-identical to an uninterrupted one;
- on MQAR-style data, `--train metaplastic` moves γ off 0, lowers the loss, and leaves every other weight alone.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, Mamba2ForCausalLM  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import metaplastic  # noqa: E402,F401  (registers the Auto classes)
from metaplastic.cli import main  # noqa: E402
from metaplastic import MetaplasticForCausalLM, convert_mamba2  # noqa: E402

from helpers import tiny_mamba2  # noqa: E402

VOCAB, SEQ = 32, 32
# 6 steps of a global batch of 4: the one-process run accumulates 2 micro-batches of 2, the two-process
# run takes 1 micro-batch of 2 on each rank (different accumulation: the gradient scale is checked too).
COMMON = ["--train", "all", "--steps", "6", "--seq-len", str(SEQ), "--global-batch", "4", "--lr", "3e-3",
          "--warmup", "2", "--save-every", "3", "--log-every", "3"]


def tiny_mamba2_dir(path: Path, seed: int = 0) -> Path:
    """:func:`helpers.tiny_mamba2` (state 8, one group, VOCAB tokens) saved to ``path``."""
    tiny_mamba2(seed, dt_bias=-1.0, vocab_size=VOCAB, state_size=8, n_groups=1, chunk_size=8).save_pretrained(path)
    return path


def mqar_stream(n: int, seed: int) -> np.ndarray:
    """MQAR-style token stream: per example ``k1 v1 … kP vP`` then queries ``k_i v_i`` among fillers 0."""
    from metaplastic.experiments.mqar_data import mqar
    inputs, labels = mqar(n, SEQ, 4, VOCAB, torch.Generator().manual_seed(seed), filler="zero")
    seq = inputs.clone()
    query = labels != -100
    seq[:, 1:][query[:, :-1]] = labels[query]  # the value follows its query key
    return seq.reshape(-1).numpy().astype(np.int64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each worker: on a shared 2-core machine more threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    convert_mamba2(tiny_mamba2_dir(root / "mamba2"), root / "model", init="identity", progress=False)
    np.save(root / "tokens.npy", mqar_stream(48, seed=2))
    return root


def finetune(work: Path, out: str, *extra: str) -> int:
    return main(["finetune", "--model", str(work / "model"), "--data", str(work / "tokens.npy"),
                 "--out", str(work / out), *COMMON, *extra])


def metric(run: Path, name: str):
    return [json.loads(line)[name] for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path):
    return metric(run, "loss")


@pytest.fixture(scope="module")
def single(work):
    """The uninterrupted one-process run."""
    assert finetune(work, "single", "--micro-batch", "2") == 0
    return work / "single"


def test_resume_after_stop_equals_uninterrupted(work, single, capsys):
    assert finetune(work, "stopped", "--micro-batch", "2", "--stop-after", "4") == 0
    run = work / "stopped"
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    assert not (run / "model").exists()  # stopped runs export nothing
    assert finetune(work, "stopped", "--micro-batch", "2", "--resume") == 0
    assert f"resumed from {run / 'checkpoints' / 'step_0000003'} at step 3" in capsys.readouterr().out
    assert losses(run) == losses(single)  # step 4 was redone, not logged twice
    a, b = load_file(single / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("launcher", ["torchrun", "nproc-per-node"])
def test_two_processes_match_one(work, single, launcher):
    """Two processes started by torchrun, or by the command's own ``--nproc-per-node`` launcher."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = torchrun if launcher == "torchrun" else nproc_per_node
    proc = subprocess.run(start(work, f"two-{launcher}", *COMMON, "--micro-batch", "2"), capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = work / f"two-{launcher}"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    one, two = losses(single), losses(run)
    assert len(two) == 6
    assert one[-1] < one[0]  # it trains
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=0)
    # the gradient norm before clipping: same scale whatever the accumulation and the world size
    np.testing.assert_allclose(metric(run, "grad_norm"), metric(single, "grad_norm"), rtol=1e-4, atol=0)
    exported = AutoModelForCausalLM.from_pretrained(str(run / "model"))
    assert isinstance(exported, MetaplasticForCausalLM)
    reference = AutoModelForCausalLM.from_pretrained(str(single / "model"))
    start = MetaplasticForCausalLM.from_pretrained(str(work / "model"))
    moved = 0.0
    for (name, p), q, s in zip(exported.named_parameters(), reference.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (q - s).abs().max().item())
    assert moved > 1e-3  # the comparison is not between two copies of the start


def lm_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


def test_metaplastic_path_learns_on_mqar(work):
    assert main(["finetune", "--model", str(work / "model"), "--data", str(work / "tokens.npy"),
                 "--out", str(work / "meta"), "--train", "metaplastic", "--steps", "16", "--seq-len", str(SEQ),
                 "--global-batch", "8", "--lr", "1e-2", "--warmup", "2", "--save-every", "0",
                 "--log-every", "8"]) == 0
    ids = torch.from_numpy(np.load(work / "tokens.npy")).view(-1, SEQ)
    start = AutoModelForCausalLM.from_pretrained(str(work / "model")).eval()
    tuned = AutoModelForCausalLM.from_pretrained(str(work / "meta" / "model")).eval()
    source = Mamba2ForCausalLM.from_pretrained(str(work / "mamba2")).eval()
    before, after = lm_loss(start, ids), lm_loss(tuned, ids)
    # the converted model starts as its source (γ = 0), judged by transformers' own Mamba2
    assert abs(before - lm_loss(source, ids)) < 1e-4
    assert after < before - 1e-3, (before, after)
    tuned_params = dict(tuned.named_parameters())
    gammas = [p for n, p in tuned_params.items() if n.endswith("importance.gamma")]
    assert len(gammas) == 2 and all(g.abs().max() > 0 for g in gammas)
    for name, p in start.named_parameters():  # nothing outside the metaplastic path moved
        if ".importance." not in name:
            assert torch.equal(p, tuned_params[name]), name


def torchrun(work: Path, out: str, *extra: str, nproc: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "metaplastic", "finetune", "--model", str(work / "model"), "--data", str(work / "tokens.npy"),
            "--out", str(work / out), *extra]


def nproc_per_node(work: Path, out: str, *extra: str, nproc: int = 2) -> list:
    """``metaplastic finetune --nproc-per-node NPROC ...``: the command's own launcher."""
    return [sys.executable, "-m", "metaplastic", "finetune", f"--nproc-per-node={nproc}", "--model",
            str(work / "model"), "--data", str(work / "tokens.npy"), "--out", str(work / out), *extra]


def descendants(pid: int) -> list:
    """Process ids below ``pid`` (Linux /proc)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkill_and_resume_under_torchrun(work):
    """A real preemption: SIGKILL the whole torchrun job mid-run, resume it, land on the same weights.
    (``--train metaplastic``: FSDP2 with frozen parameters, and an optimizer state over a subset.)"""
    import signal
    import time
    # 40 steps: enough that the job is still training when this (possibly starved) process gets to kill it
    args = ["--train", "metaplastic", "--steps", "40", "--seq-len", str(SEQ), "--global-batch", "4", "--lr", "1e-2",
            "--warmup", "2", "--save-every", "3", "--keep-checkpoints", "1", "--log-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun(work, "straight", *args), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = subprocess.Popen(torchrun(work, "killed", *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=env)
    latest = work / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None:
        if latest.is_file():  # the first checkpoint is written: kill
            break
        time.sleep(0.05)
    assert job.poll() is None, "the run finished before it could be killed"
    workers = descendants(job.pid)  # every process below torchrun (its workers and their helpers)
    assert len(workers) >= 2, workers
    for pid in [job.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    while any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not (work / "killed" / "model").exists(), "killed too late"
    killed_at = latest.read_text()
    proc = subprocess.run(torchrun(work, "killed", *args, "--resume"), capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert killed_at < "step_0000040", killed_at
    assert f"at step {int(killed_at.split('_')[1])}" in proc.stdout, proc.stdout  # continued from the checkpoint
    assert losses(work / "killed") == losses(work / "straight"), (losses(work / "killed"), losses(work / "straight"))
    a = load_file(work / "straight" / "model" / "model.safetensors")
    b = load_file(work / "killed" / "model" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    start = load_file(work / "model" / "model.safetensors")
    assert any(not torch.equal(a[key], start[key]) for key in a if key.endswith("importance.gamma"))


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one(work, single, capsys):
    """DCP reshards: a checkpoint written by 2 ranks continues on 1 and ends where the 1-process run ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun(work, "reshard", *COMMON, "--micro-batch", "1", "--stop-after", "3"),
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert finetune(work, "reshard", "--micro-batch", "2", "--resume") == 0
    assert "at step 3" in capsys.readouterr().out
    np.testing.assert_allclose(losses(work / "reshard"), losses(single), rtol=1e-5, atol=0)
    a = load_file(single / "model" / "model.safetensors")
    b = load_file(work / "reshard" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_torchrun_and_resume(work):
    """On a GPU: nccl under torchrun, bf16 FSDP2 mixed precision, DCP stop/resume, and the export."""
    args = ["--train", "all", "--steps", "6", "--seq-len", str(SEQ), "--global-batch", "4", "--lr", "3e-3",
            "--warmup", "2", "--save-every", "3", "--log-every", "3", "--device", "cuda"]
    proc = subprocess.run(torchrun(work, "cuda", *args, nproc=1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((work / "cuda" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["world_size"] == 1
    curve = losses(work / "cuda")
    assert np.isfinite(curve).all() and curve[-1] < curve[0]
    assert finetune(work, "cuda_stopped", "--device", "cuda", "--stop-after", "4") == 0
    assert finetune(work, "cuda_stopped", "--device", "cuda", "--resume") == 0
    np.testing.assert_allclose(losses(work / "cuda_stopped"), curve, rtol=1e-3)
    a = load_file(work / "cuda" / "model" / "model.safetensors")
    b = load_file(work / "cuda_stopped" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-4, msg=key)
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(work / "cuda" / "model")), MetaplasticForCausalLM)
