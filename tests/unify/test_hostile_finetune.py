"""``metaplastic finetune`` attacked: a fresh run into a finished one, bad numbers, a corrupt or dangling
``latest``, a checkpoint save killed while it rewrites the step ``latest`` names, ``--resume`` with another
model, full and read-only disks, a second run into the same ``--out``, kills at random moments, user errors under
torchrun and under the command's own ``--nproc-per-node`` launcher."""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hostile import ROOT, cli, one_line_error, remount_read_only, spawn, temp_names, tmpfs  # noqa: E402
from metaplastic import finetune as ft  # noqa: E402
from metaplastic.demo import build_tiny_mamba2  # noqa: E402
from metaplastic import convert_checkpoint  # noqa: E402

SEQ = 16
ARGS = ["--train", "all", "--seq-len", str(SEQ), "--global-batch", "2", "--lr", "1e-3", "--warmup", "1",
        "--log-every", "100"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_finetune")
    convert_checkpoint(build_tiny_mamba2(root / "mamba2"), root / "model", progress=False)
    np.save(root / "tokens.npy", np.random.default_rng(0).integers(0, 128, 64 * SEQ))
    return root


def finetune(capsys, work, out, *extra, model=None):
    return cli(capsys, "finetune", "--model", model or work / "model", "--data", work / "tokens.npy", "--out", out,
               *ARGS, *extra)


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def finished(work, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (``latest`` = step 4) and an export."""
    out = work / "finished"
    from metaplastic.cli import main
    assert main(["finetune", "--model", str(work / "model"), "--data", str(work / "tokens.npy"), "--out", str(out),
                 *ARGS, "--steps", "4", "--save-every", "2"]) == 0
    return out


def copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_fresh_run_into_a_run_is_refused_and_overwrite_removes_only_the_run(capsys, work, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    before = digest(out)
    rc, err = finetune(capsys, work, out, "--steps", "2")
    assert rc == 2
    one_line_error(err, "already holds a run", "--resume", "--overwrite")
    assert digest(out) == before
    assert finetune(capsys, work, out, "--steps", "2", "--save-every", "0", "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "checkpoints" / "latest").exists()  # the old run's checkpoints went with it


@pytest.mark.parametrize("extra, word", [(["--lr=-1e-3"], "--lr"), (["--lr", "nan"], "--lr"),
                                         (["--min-lr-ratio", "2"], "--min-lr-ratio"),
                                         (["--grad-clip", "inf"], "--grad-clip")])
def test_bad_numbers_are_refused_before_loading(capsys, work, tmp_path, extra, word):
    rc, err = finetune(capsys, work, tmp_path / "out", *extra)
    assert rc == 2
    one_line_error(err, word)
    assert not (tmp_path / "out").exists()


def test_read_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_0000002", True), ("step_0000004", True), ("step_0000006", False)):
        (root / name).mkdir(parents=True)
        (root / name / ".metadata").write_bytes(b"x" if complete else b"")
    for latest, note in (("step_0000004", None), ("step_0000006", "not a complete"), ("step_0000099", "not a complete"),
                         ("../../etc", "not a complete"), (b"\xff\xfe", "cannot be read"), (None, "missing")):
        if latest is None:
            (root / "latest").unlink()
        else:
            (root / "latest").write_bytes(latest if isinstance(latest, bytes) else latest.encode())
        path, said = ft.read_latest(root)
        assert path == root / "step_0000004"
        assert (said is None) if note is None else (note in said)


def test_resume_with_a_corrupt_latest_uses_the_newest_complete_checkpoint(capsys, work, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_0000004")  # latest now dangles
    from metaplastic.cli import main
    capsys.readouterr()
    assert main(["finetune", "--model", str(work / "model"), "--data", str(work / "tokens.npy"), "--out", str(out),
                 *ARGS, "--steps", "4", "--save-every", "2", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "using the newest complete checkpoint step_0000002" in said
    assert "resumed from" in said and "at step 2" in said
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"


def test_a_save_killed_while_rewriting_the_latest_step_loses_nothing(capsys, work, finished, tmp_path, monkeypatch):
    """Resume from step 2, then die while step 4 (which ``latest`` names) is written again: the complete step 4
    stays as it was, and ``--resume`` continues from it."""
    import torch.distributed.checkpoint as dcp
    out = copy_run(finished, tmp_path)
    step4 = out / "checkpoints" / "step_0000004"
    before = digest(step4)
    real_save = dcp.save

    def save_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        for shard in Path(checkpoint_id).glob("*.distcp"):
            shard.write_bytes(b"")  # half-written shard, then the process is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", save_then_die)
    rc = finetune(capsys, work, out, "--steps", "4", "--save-every", "2", "--resume",
                  str(out / "checkpoints" / "step_0000002"))[0]
    assert rc == 130
    monkeypatch.setattr(dcp, "save", real_save)
    assert digest(step4) == before
    assert (out / "checkpoints" / "latest").read_text() == "step_0000004"
    assert finetune(capsys, work, out, "--steps", "4", "--save-every", "2", "--resume")[0] == 0


def test_resume_with_another_model_names_the_difference(capsys, work, finished, tmp_path):
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from metaplastic.demo import TINY_MAMBA2
    torch.manual_seed(0)
    Mamba2ForCausalLM(Mamba2Config(**{**TINY_MAMBA2, "state_size": 8})).save_pretrained(tmp_path / "other_src")
    convert_checkpoint(tmp_path / "other_src", tmp_path / "other", progress=False)
    out = copy_run(finished, tmp_path)
    before = digest(out)
    rc, err = finetune(capsys, work, out, "--steps", "6", "--resume", model=tmp_path / "other")
    assert rc == 2
    one_line_error(err, "does not fit --model")
    assert digest(out) == before  # the refused run changed nothing of the run it names (run.json included)


def test_a_second_run_into_the_same_out_is_refused(capsys, work, finished, tmp_path):
    from metaplastic.safe_io import DirLock
    out = copy_run(finished, tmp_path)
    with DirLock(out, "--out"):
        rc, err = finetune(capsys, work, out, "--steps", "6", "--resume")
    assert rc == 2
    one_line_error(err, "is being written by process")


def torchrun_finetune(work: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m metaplastic finetune ...`` from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           "-m", "metaplastic", "finetune", "--model", str(work / "model"), "--data",
                           str(work / "tokens.npy"), "--out", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(ROOT))


def assert_one_line_worker_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """The job's log holds the worker's error line once, no traceback through our code, and torchrun reports
    exit code 2 for the first failed worker (torchrun's own report and exit code 1 are its launcher's)."""
    errors = [line for line in proc.stderr.splitlines() if "metaplastic finetune: error:" in line]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert not re.search(r'File "[^"]*/metaplastic/(?:\w+/)?\w+\.py"', proc.stderr), proc.stderr
    assert proc.returncode != 0
    root_cause = proc.stderr.split("Root Cause", 1)[-1]
    assert re.search(r"exitcode\s*:\s*2\b", root_cause), proc.stderr[-2000:]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_user_error_under_torchrun_is_one_line_and_exit_code_2(work, finished, tmp_path, nproc):
    """docs/finetune.md's one-process run, then the same command under torchrun into the same --out: every
    worker meets the error before any process group starts; the line appears once, whatever the world size."""
    out = copy_run(finished, tmp_path)
    before = digest(out)
    proc = torchrun_finetune(work, out, nproc, "--steps", "2")
    assert_one_line_worker_error(proc, "already holds a run", "--resume", "--overwrite")
    assert digest(out) == before


@pytest.mark.slow
def test_a_user_error_after_the_process_group_started_is_one_line_under_torchrun(work, finished, tmp_path):
    """The lock on --out is taken once the ranks have joined (rank 0 takes it, every rank learns the outcome):
    a held lock stops every worker with exit code 2, the line printed once."""
    from metaplastic.safe_io import DirLock
    out = copy_run(finished, tmp_path)
    with DirLock(out, "--out"):
        proc = torchrun_finetune(work, out, 2, "--steps", "6", "--resume")
    assert_one_line_worker_error(proc, "is being written by process")


def nproc_per_node_finetune(work: Path, out: Path, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    """``metaplastic finetune --nproc-per-node NPROC ...`` (the command's own launcher) from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "metaplastic", "finetune", f"--nproc-per-node={nproc}", "--model",
                           str(work / "model"), "--data", str(work / "tokens.npy"), "--out", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(ROOT))


def test_nproc_per_node_refuses_a_user_error_in_one_line_before_any_worker(work, finished, tmp_path):
    """docs/finetune.md's one-process run, then a distributed run into the same --out with the command's own
    launcher: the launcher finds the error itself, before any worker starts: one stderr line, exit code 2."""
    out = copy_run(finished, tmp_path)
    before = digest(out)
    proc = nproc_per_node_finetune(work, out, 2, "--steps", "2")
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # no worker (it would load the model) said anything
    one_line_error(proc.stderr, "already holds a run", "--resume", "--overwrite")
    assert proc.stdout == ""
    assert digest(out) == before
    assert not (out.parent / f".{out.name}.lock").exists()


@pytest.mark.slow
def test_nproc_per_node_prints_a_worker_user_error_once_with_exit_code_2(work, finished, tmp_path):
    """An error only the workers can find (a --resume checkpoint made with another --seed, read once the ranks
    have joined): the launcher prints the workers' line once, with no traceback and none of the elastic agent's
    report, and exits 2."""
    out = copy_run(finished, tmp_path)
    checkpoints = digest(out / "checkpoints")
    proc = nproc_per_node_finetune(work, out, 2, "--steps", "6", "--resume", "--seed", "1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_line_error(proc.stderr, "was made with seed=0", "this run has 1")
    assert proc.stderr.strip().splitlines()[-1].startswith("metaplastic finetune: error: checkpoint ")
    assert not re.search(r"^[IWE]\d{4} |ChildFailedError|Root Cause", proc.stderr, re.M), proc.stderr[-3000:]
    assert digest(out / "checkpoints") == checkpoints
    assert not (out.parent / f".{out.name}.lock").exists()


@pytest.mark.parametrize("nproc, env, word", [(0, {}, "--nproc-per-node must be at least 1"),
                                              (2, {"RANK": "0", "LOCAL_RANK": "0"}, "leave it out under torchrun")])
def test_nproc_per_node_out_of_place_is_refused(capsys, monkeypatch, work, tmp_path, nproc, env, word):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    rc, err = finetune(capsys, work, tmp_path / "out", "--steps", "2", f"--nproc-per-node={nproc}")
    assert rc == 2
    one_line_error(err, word)
    assert not (tmp_path / "out").exists()


def test_read_only_and_full_disks(capsys, work, tmp_path):
    with tmpfs(tmp_path / "ro") as mnt:
        remount_read_only(mnt)
        rc, err = finetune(capsys, work, mnt / "out", "--steps", "2")
        assert rc == 2
        one_line_error(err, "read-only file system")
    with tmpfs(tmp_path / "small", size="96k") as mnt:  # room for the metrics, not for a checkpoint
        rc, err = finetune(capsys, work, mnt / "out", "--steps", "2", "--save-every", "1")
        assert rc == 2
        one_line_error(err, "no space left on device")
        assert temp_names(mnt / "out" / "checkpoints") == []
        assert not (mnt / "out" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_kill_finetune_at_random_moments_then_resume(work, tmp_path):
    """SIGKILL / SIGTERM at seeded random moments; after each, ``latest`` (read defensively) names a complete
    checkpoint and every ``step_*`` is loadable; the final ``--resume`` finishes and leaves no debris."""
    rng = random.Random(7)
    out = tmp_path / "run"
    argv = ["finetune", "--model", work / "model", "--data", work / "tokens.npy", "--out", out, *ARGS,
            "--steps", "12", "--save-every", "1", "--keep-checkpoints", "3"]
    for i, sig in enumerate((signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)):
        proc = spawn(argv + (["--resume"] if i else []))
        end = time.monotonic() + 300
        while time.monotonic() < end and proc.poll() is None and not (out / "checkpoints" / "latest").exists():
            time.sleep(0.01)  # training has started and saved once
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        root = out / "checkpoints"
        if root.is_dir():
            for step in root.glob("step_*"):
                assert ft.is_complete(step), step
    proc = spawn(argv + ["--resume"])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert (out / "model" / "config.json").is_file()
    assert temp_names(out / "checkpoints") == [] and temp_names(out) == []


@pytest.mark.parametrize("change, word", [({"hidden_size": 0}, "hidden_size"),
                                          ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers"),
                                          ({"layer_norm_epsilon": [1e-5]}, "layer_norm_epsilon"),
                                          ({"vocab_size": 2 ** 24, "hidden_size": 2 ** 20}, "parameters")])
def test_a_model_config_of_the_wrong_type_or_range_is_named(capsys, work, tmp_path, change, word):
    model = Path(shutil.copytree(work / "model", tmp_path / "model"))
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    started = time.perf_counter()
    rc, err = finetune(capsys, work, tmp_path / "out", model=model)
    assert rc == 2
    one_line_error(err, word)
    assert time.perf_counter() - started < 20  # refused before allocating anything


_SLOW_SAVE = """
import sys, time
from pathlib import Path
import torch.distributed.checkpoint as dcp
from metaplastic.cli import main
original = dcp.save
def slow_save(*args, **kwargs):
    result = original(*args, **kwargs)  # the checkpoint's files are written: the signal arrives before rename
    Path(sys.argv[1]).touch()
    time.sleep(120)
    return result
dcp.save = slow_save
sys.exit(main(sys.argv[2:]))
"""


def test_finetune_stopped_by_sigterm_while_saving_leaves_nothing(work, tmp_path):
    """SIGTERM while a checkpoint is being written: exit 143 (128 + SIGTERM), no temporary checkpoint
    directory, no ``latest``, no lock beside ``--out``."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    argv = ["finetune", "--model", work / "model", "--data", work / "tokens.npy", "--out", out, *ARGS,
            "--steps", "2", "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(ready), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None and not ready.exists():
        time.sleep(0.01)
    assert ready.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert temp_names(out / "checkpoints") == [] and temp_names(out) == []
    assert not (out / "checkpoints" / "latest").exists() and not (tmp_path / ".run.lock").exists()
