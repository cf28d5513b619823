"""fla's ``chunk_simple_gla`` as ``metaplastic bench traffic`` records it, checked against fla itself.

The recording (``launches.record_fla``) runs fla's own Python wrappers with its kernel launches captured; the
check wraps fla's host functions during that run and compares what they were asked for and what they
allocated with what the recording and the byte model hold: the states' dtype that fla's ``states_in_fp32``
argument selects (forward and backward), and the bytes each of fla's kernels writes (the nbytes of the
tensors fla's wrappers return). Runs in a fresh process without ``TRITON_INTERPRET`` (the recorder patches
Triton's compiled launches, which the interpreter replaces).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fla.ops.simple_gla")

_SCRIPT = r'''
import json
import fla.ops.simple_gla.chunk as fla_chunk
from metaplastic.kernels import launches, traffic

calls = []
def wrapped(name):
    inner = getattr(fla_chunk, name)
    def call(*args, **kwargs):
        out = inner(*args, **kwargs)
        tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if hasattr(t, "nbytes")]
        calls.append({"name": name, "states_in_fp32": kwargs.get("states_in_fp32"),
                      "dtypes": [str(t.dtype) for t in tensors], "nbytes": sum(t.nbytes for t in tensors)})
        return out
    return call
for name in ("chunk_fwd_h", "chunk_fwd_o", "chunk_bwd_dh", "chunk_bwd_dqkwg", "chunk_bwd_dv"):
    setattr(fla_chunk, name, wrapped(name))
rec = launches.record_fla(shape=(1, 256, 2, 128, 128))
out = []
for ln in rec.launches:
    a = ln.bound()
    state = a.get("h") if ln.name == "chunk_fwd_kernel_h" else a.get("dh") if ln.name == "chunk_bwd_kernel_dh" else None
    out.append({"phase": ln.phase, "name": ln.name, "state_dtype": str(state.dtype) if state is not None else None,
                "written": traffic.launch_traffic(ln)[1]})
print(json.dumps({"calls": calls, "launches": out}))
'''

KERNEL_OF = {"chunk_fwd_h": "chunk_fwd_kernel_h", "chunk_fwd_o": "chunk_fwd_kernel_o",
             "chunk_bwd_dh": "chunk_bwd_kernel_dh", "chunk_bwd_dqkwg": "chunk_bwd_kernel_dqkwg",
             "chunk_bwd_dv": "chunk_bwd_kernel_dv"}


@pytest.fixture(scope="module")
def recorded():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_states_dtype_is_the_one_fla_asks_for(recorded):
    """Forward states in the inputs' dtype, the backward's recomputed states and their cotangents in fp32:
    whatever fla's ``states_in_fp32`` says, the recording holds."""
    state_calls = [c for c in recorded["calls"] if c["name"] in ("chunk_fwd_h", "chunk_bwd_dh")]
    state_launches = [ln for ln in recorded["launches"]
                      if ln["name"] in ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh")]
    assert len(state_calls) == len(state_launches) == 4  # h (no-grad forward, forward, backward), dh
    for call, ln in zip(state_calls, state_launches):
        assert KERNEL_OF[call["name"]] == ln["name"]
        assert ln["state_dtype"] == ("torch.float32" if call["states_in_fp32"] else "torch.bfloat16"), (call, ln)
        assert call["dtypes"][0] == ln["state_dtype"]
    assert [ln["state_dtype"] for ln in state_launches][-2:] == ["torch.float32", "torch.float32"]


def test_modelled_writes_are_what_fla_allocates(recorded):
    """Each of fla's kernels writes, by the byte model, exactly the tensors its host function returns."""
    launches = [ln for ln in recorded["launches"] if ln["name"] in KERNEL_OF.values()]
    assert [KERNEL_OF[c["name"]] for c in recorded["calls"]] == [ln["name"] for ln in launches]
    for call, ln in zip(recorded["calls"], launches):
        assert ln["written"] == call["nbytes"], (call, ln)


def test_an_unrecordable_fla_is_a_note_in_the_report(monkeypatch):
    """If the installed fla's host functions change so that they cannot be recorded, the report says so in
    fla's row and states no ratio against it, instead of failing or inventing a figure."""
    from metaplastic.kernels import launches, traffic

    def changed(shape):
        raise TypeError("chunk_fwd_h() got an unexpected keyword argument")
    monkeypatch.setattr(launches, "record_fla", changed)
    rep = traffic.report(cases=[])
    assert "could not be recorded" in rep["fla_chunk_simple_gla"]["note"]
    assert not any("fla" in key for key in rep["ratios"])
    assert "could not be recorded" in traffic.format_report(rep)
