"""``metaplastic convert`` attacked: destinations that would lose data, a second writer, kills at random moments,
a full or read-only disk, corrupt weights, headers and configs. Each must exit 2 with one line naming the
problem (or, for kills, leave nothing complete lost), and SRC must be untouched."""
import hashlib
import json
import random
import signal
import struct
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from hostile import cli, one_line_error, remount_read_only, spawn, temp_names, tmpfs  # noqa: E402
from metaplastic.demo import build_tiny_mamba2  # noqa: E402
from metaplastic.models import convert as convert_module  # noqa: E402

KEY = "backbone.layers.0.mixer.in_proj.weight"


def digest(directory: Path) -> str:
    """A hash of every file under ``directory`` (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(directory)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_convert")
    return build_tiny_mamba2(root / "anc" / "src")


@pytest.fixture()
def src(source, tmp_path) -> Path:
    """A private copy of the tiny Mamba2 checkpoint at ``tmp_path/anc/src``."""
    import shutil
    return Path(shutil.copytree(source, tmp_path / "anc" / "src"))


def convert(capsys, src, dst, *extra):
    return cli(capsys, "convert", src, dst, "--no-progress", *extra)


# --- destinations that would lose data ---------------------------------------------------------------

def test_dst_containing_src_inside_it_or_equal_is_refused_even_with_force(capsys, src):
    before = digest(src.parent)
    for dst, word in ((src.parent, "contains SRC"), (src.parent.parent, "contains SRC"), (src / "sub", "inside SRC"),
                      (src, "differ from SRC")):
        rc, err = convert(capsys, src, dst, "--force")
        assert rc == 2
        one_line_error(err, word)
    assert digest(src.parent) == before


def test_force_replaces_only_an_earlier_conversion(capsys, src, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (other / "config.json").write_text(json.dumps({"model_type": "metaplastic"}))  # a config alone is not enough
    rc, err = convert(capsys, src, other, "--force")
    assert rc == 2
    one_line_error(err, "replaces only an earlier output")
    assert (other / "keep.txt").read_text() == "mine"
    dst = tmp_path / "dst"
    assert convert(capsys, src, dst)[0] == 0
    rc, err = convert(capsys, src, dst)
    assert rc == 2
    one_line_error(err, "already exists")
    assert convert(capsys, src, dst, "--force")[0] == 0
    assert json.loads((dst / "conversion.json").read_text())["written_by"] == "metaplastic convert"


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(capsys, src, tmp_path):
    from metaplastic.safe_io import DirLock
    dst = tmp_path / "dst"
    with DirLock(dst, "DST"):  # another process's conversion in progress
        rc, err = convert(capsys, src, dst)
    assert rc == 2
    one_line_error(err, "is being written by process")
    assert not dst.exists()


def test_debris_of_a_killed_conversion_is_removed_by_the_next_run(capsys, src, tmp_path):
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    from metaplastic.safe_io import temp_path
    debris = temp_path(tmp_path / "dst", "partial", proc.pid)
    debris.mkdir()
    (debris / "model.safetensors").write_bytes(b"\0" * 100)
    assert convert(capsys, src, tmp_path / "dst")[0] == 0
    assert temp_names(tmp_path) == []


# --- corrupt sources -----------------------------------------------------------------------------------

def write_weights(src: Path, change) -> None:
    state = load_file(src / "model.safetensors")
    change(state)
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(capsys, src, tmp_path, value):
    write_weights(src, lambda s: s[KEY].view(-1).__setitem__(3, value))
    rc, err = convert(capsys, src, tmp_path / "dst", "--verify")
    assert rc == 2
    one_line_error(err, KEY, "non-finite")
    assert not (tmp_path / "dst").exists() and temp_names(tmp_path) == []


def test_a_weight_that_overflows_the_requested_dtype_is_refused(capsys, src, tmp_path):
    write_weights(src, lambda s: s[KEY].view(-1).__setitem__(0, 1e5))  # float16's largest is 65504
    rc, err = convert(capsys, src, tmp_path / "dst", "--dtype", "float16")
    assert rc == 2
    one_line_error(err, KEY, "float16")
    assert convert(capsys, src, tmp_path / "dst32")[0] == 0  # fine in float32


def test_a_header_whose_dtype_became_an_integer_type_is_refused(capsys, src, tmp_path):
    path = src / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[KEY]["dtype"] = "I32"  # same width, so the file stays consistent
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    rc, err = convert(capsys, src, tmp_path / "dst", "--verify")
    assert rc == 2
    one_line_error(err, KEY, "int32")


@pytest.mark.parametrize("change, word", [
    ({"head_dim": 0}, "head_dim"), ({"layer_norm_epsilon": [1.0]}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": "1e-5"}, "layer_norm_epsilon"), ({"num_hidden_layers": 10 ** 9}, "num_hidden_layers"),
    ({"num_hidden_layers": 7}, "num_hidden_layers"), ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"time_step_limit": [1.0, 0.0]}, "time_step_limit"), ({"hidden_size": 32.5}, "hidden_size")])
def test_config_values_of_the_wrong_type_or_range_are_named(capsys, src, tmp_path, change, word):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    started = time.perf_counter()
    rc, err = convert(capsys, src, tmp_path / "dst")
    assert rc == 2
    one_line_error(err, word)
    assert time.perf_counter() - started < 20  # refused before building anything


def test_verify_is_never_ok_on_non_finite_differences(capsys, monkeypatch, tmp_path):
    def fake(*args, **kwargs):
        return convert_module.ConversionResult(Path(args[1]), "hf", 1, 4, max_abs_diff=float("nan"),
                                               max_abs_diff_reloaded=0.0, reference="x")
    monkeypatch.setattr(convert_module.command, "convert_checkpoint", fake)
    rc = cli(capsys, "convert", tmp_path / "a", tmp_path / "b", "--verify")[0]
    out = capsys.readouterr().out
    assert rc == 1 and "verify: OK" not in out


# --- disks ---------------------------------------------------------------------------------------------

def test_read_only_destination_and_a_file_as_parent(capsys, src, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, err = convert(capsys, src, tmp_path / "file" / "dst")
    assert rc == 2
    one_line_error(err, "not a directory")
    with tmpfs(tmp_path / "ro") as mnt:
        remount_read_only(mnt)
        rc, err = convert(capsys, src, mnt / "dst")
        assert rc == 2
        one_line_error(err, "read-only file system")


def test_full_disk_is_refused_up_front_and_mid_write(capsys, src, tmp_path, monkeypatch):
    with tmpfs(tmp_path / "small", size="48k") as mnt:
        rc, err = convert(capsys, src, mnt / "dst")
        assert rc == 2
        one_line_error(err, "MiB free")
        monkeypatch.setattr(convert_module.pipeline, "check_free_space", lambda dst, needed: None)
        rc, err = convert(capsys, src, mnt / "dst")
        assert rc == 2
        one_line_error(err, "no space left on device")
        assert sorted(p.name for p in mnt.iterdir()) == []  # no partial directory, no lock


# --- kills and concurrent writers (subprocesses) -------------------------------------------------------

def build_big(path: Path) -> Path:
    from transformers import Mamba2Config, Mamba2ForCausalLM
    from metaplastic.demo import TINY_MAMBA2
    torch.manual_seed(0)
    cfg = {**TINY_MAMBA2, "vocab_size": 8192, "hidden_size": 128, "num_heads": 8, "head_dim": 32,
           "num_hidden_layers": 4}
    Mamba2ForCausalLM(Mamba2Config(**cfg)).save_pretrained(path)
    return path


def wait_for_writing(proc, directory: Path, timeout: float = 120.0) -> None:
    """Return once ``proc`` has started writing in ``directory`` (a temporary name appears) or has ended."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None and not temp_names(directory):
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_a_conversion_at_random_moments_then_rerun(src, tmp_path):
    """SIGKILL / SIGTERM at a seeded random moment; DST is either absent or complete, SRC intact, and a
    rerun (with --force when DST is complete) succeeds and leaves no debris."""
    from metaplastic import MetaplasticForCausalLM
    rng = random.Random(1234)
    big = build_big(tmp_path / "big")  # ~10 MB of weights: writing takes long enough to be interrupted
    before = digest(big)
    dst = tmp_path / "dst"
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        proc = spawn(["convert", big, dst, "--no-progress", "--force", "--verify"])
        wait_for_writing(proc, tmp_path)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        assert digest(big) == before
        if dst.exists():
            MetaplasticForCausalLM.from_pretrained(str(dst))  # complete, or not there at all
    proc = spawn(["convert", big, dst, "--no-progress", "--force"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    MetaplasticForCausalLM.from_pretrained(str(dst))
    assert temp_names(tmp_path) == [] and not (tmp_path / ".dst.lock").exists()


@pytest.mark.slow
def test_two_conversions_to_one_dst_at_once(src, tmp_path):
    """Exactly one succeeds; the other is refused (lock held, or DST already there), never merged."""
    dst = tmp_path / "dst"
    procs = [spawn(["convert", src, dst, "--no-progress"]) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert "is being written by process" in refused or "already exists" in refused
    assert temp_names(tmp_path) == []
