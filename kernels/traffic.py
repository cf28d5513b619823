"""``metaplastic bench traffic``: modelled HBM bytes and FLOPs per token and head, against the floors.

A GPU-free account of where time must go at the benchmark shape (B=8, T=4096, H=16, K=V=128, bf16 q, k, v,
fp32 gates). For each backend the launches and torch operations are those that
:func:`metaplastic.kernels.launches.record` captures from the benchmark's own call (no list kept here).

Model, stated once:
- A Triton kernel moves the bytes of every tile its programs load or store (:data:`KERNEL_MODELS`, one
  function per kernel written from its ``tl.load`` / ``tl.store``; a tile that several programs load is
  counted once per program: no L2 reuse is assumed, so this is an upper bound for the re-read inputs).
- A torch operation (casts, layout copies, cumulative sums, partial-sum reductions, the non-finite masks)
  reads its tensor inputs and writes its outputs once (views move nothing).
- FLOPs: ``2·m·n·k`` per ``tl.dot`` (``3×`` that for ``tf32x3``), and the elementwise work per tile as
  written in each model; torch operations one FLOP per element written.
- Floors: the chunked floor reads q, k, v, the gates (and ``b``) and writes the output once, plus the
  boundary states (``V·K`` fp32 per chunk) written forward and read backward; the backward reads q, k, v,
  the gates and ``do`` and writes every gradient once. The per-value floor adds nothing to the inputs and
  outputs but the saved states (``2·V·K`` fp32 per 64 tokens) and counts the recurrence's own work: every
  synapse updated and read once per token from registers (forward ``20·V·K`` FLOPs: ten multiply-adds;
  backward twice the forward).
"""
from __future__ import annotations

import argparse
import datetime
import json
from typing import Callable, Dict, List, Optional, Tuple

from metaplastic.errors import UserError

from .launches import BENCH_SHAPE, Launch, Recording


def _size(x) -> int:
    return x.nbytes if hasattr(x, "nbytes") else 0


def _es(x) -> int:
    return x.dtype.itemsize


def _n(x) -> int:
    n = 1
    for s in x.shape:
        n *= s
    return n


# ----------------------------------------------------------------------------------------- kernel models
# Each returns (bytes read, bytes written, flops) for the whole launch; `a` the bound arguments, `g` the grid.
def _chunk_states(a, g):
    NK, NV, BH = g
    k, v, G = a["k"], a["v"], a["G"]
    T, N, K, V, C = a["T"], a["N"], a["K"], a["V"], a["C"]
    read = NV * _size(k) + NK * _size(v) + NK * NV * BH * (N * C + N) * _es(G) + _size(a["h0"])
    written = BH * (N + 1) * V * K * _es(a["states"])
    return read, written, BH * N * (2 * C * V * K + 2 * V * K + C * K * NV)


def _chunk_output(a, g):
    N, BH, NVT = g
    q, k, v = a["q"], a["k"], a["v"]
    TPG, C, K, V, BV = a["TPG"], a["C"], a["K"], a["V"], a["BV"]
    read = TPG * _size(q) + NVT * _size(k) + BH * N * V * K * _es(a["states"]) + _size(v) + NVT * _size(a["G"])
    flops = N * BH * NVT * (2 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 4 * C * C)
    return read, _size(a["o"]), flops


def _chunk_dstates(a, g):
    NK, NVT, BH = g
    q, do = a["q"], a["do"]
    TPG, N, K, V, C = a["TPG"], a["N"], a["K"], a["V"], a["C"]
    read = TPG * _size(q) + NK * _size(do) + NK * NVT * _size(a["G"]) + _size(a["dht"])
    written = _size(a["dstates"]) + _size(a["dh0"])
    return read, written, BH * N * (2 * C * V * K + 2 * V * K)


def _chunk_bwd_dv(a, g):
    N, BH, NVT = g
    q, k, do = a["q"], a["k"], a["do"]
    TPG, C, K, V, BV = a["TPG"], a["C"], a["K"], a["V"], a["BV"]
    read = TPG * _size(q) + NVT * _size(k) + _size(a["dstates"]) + _size(do) + NVT * _size(a["G"])
    flops = N * BH * NVT * (2 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 4 * C * C)
    return read, _size(a["dv"]), flops


def _chunk_bwd_dqk(a, g):
    NK, N, BH = g
    q, k, v, do = a["q"], a["k"], a["v"], a["do"]
    C, K, V = a["C"], a["K"], a["V"]
    NG = q.shape[2] if len(q.shape) == 5 else 1
    st = BH * N * V * K * _es(a["states"])
    read = _size(k) + _size(q) + NK * (_size(do) + _size(v)) + 3 * st + _size(a["G"])
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dG"])
    flops = N * BH * (NG * 6 * C * C * K + V * (2 * C * C + 8 * C * K) * 1)
    return read, written, flops


def _pv_fwd(a, g):
    NVT, BH = g
    q, k, v = a["q"], a["k"], a["v"]
    K, V, C = a["K"], a["V"], a["C"]
    T = a["T"]
    per_tok = lambda x, per_v: (_size(x) if per_v else NVT * _size(x))  # noqa: E731
    read = NVT * (_size(q) + _size(k)) + _size(v) + NVT * BH * T * 4
    if a["HAS_BETA"]:
        read += per_tok(a["beta"], a["BETA_PER_V"])
    read += per_tok(a["b"], a["B_PER_V"])
    NS = -(-T // C)
    ck = 2 * BH * NS * V * K * _es(a["ck_M"]) if a["SAVE"] else 0
    init = 2 * BH * V * K * _es(a["M0"]) if a["HAS_INIT"] else 0
    final = 2 * BH * V * K * _es(a["MT"]) if a["STORE_FINAL"] else 0
    out = BH * T * V * _es(a["o"]) * (2 if a["OUTPUT_VAR"] else 1)
    flops = BH * T * V * K * (12 + (3 if a["OUTPUT_VAR"] else 0))  # decay, write, I, M/I, q-weighted sum
    return read + init, ck + final + out, flops


def _pv_bwd(a, g):
    NK, NVT, BH = g
    q, k, v, do = a["q"], a["k"], a["v"], a["do"]
    K, V, C, CS, T = a["K"], a["V"], a["C"], a["CS"], a["T"]
    rebuild = (C // CS - 1) / 2  # earlier sub-chunks of the segment re-read per sub-chunk, on average
    per_prog = NK * NVT * BH * T  # one scalar per token and program
    # loaded per sub-chunk: q, k per value tile; v (β v), b, do (dvar) per key tile; g per program
    rows = NK * (_size(v) + (_size(a["b"]) if a["B_PER_V"] else NVT * _size(a["b"])))
    if a["HAS_BETA"]:
        rows += NK * _size(a["beta"]) if a["BETA_PER_V"] else per_prog * _es(a["beta"])
    gates = per_prog * _es(a["g"]) if a["HAS_G"] else 0
    read = NVT * _size(q) + NK * _size(do) + (1 + rebuild) * (NVT * _size(k) + rows) + (1 + rebuild) * gates
    read += _size(a["ck_M"]) + _size(a["ck_J"])  # each segment's saved state, once per tile
    if a["HAS_DVAR"]:
        read += NK * _size(a["dvar"])
    if a["HAS_DFINAL"]:
        read += _size(a["dMT"]) + _size(a["dJT"])
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dbv"]) + _size(a["db"]) + _size(a["dg"]) \
        + _size(a["dM0"]) + _size(a["dJ0"])
    # per synapse and token (elementwise on [CS, BV, BK]): the writes 2, the two scans (each combine: the
    # decays' product and two multiply-adds) 10, the start state 4, 1/I 2, M/I 1, dq 2, L 3, the decay's
    # Σ L_J ∘ J 2, the carried cotangent 2, the start's cotangent 2, d(βv), db, dk 8; per sub-chunk the
    # boundary term (4 per synapse); the rebuild 4 per synapse and re-read token (+ its decay, 4 per sub-chunk)
    per_syn = 38 + 4 / CS + rebuild * (4 + 4 / CS) + (6 if a["HAS_DVAR"] else 0)
    flops = BH * T * V * K * per_syn + (BH * CS * V * K * 4 if a["HAS_DFINAL"] else 0)
    return read, written, flops


def _fr_fwd(a, g):
    NVT, NH = g
    q, k, v = a["q"], a["k"], a["v"]
    TT = q.shape[0]
    H, K, V, C = a["H"], a["K"], a["V"], a["C"]
    diag = a["POSTERIOR"] == 1
    read = NVT * (_size(q) + _size(k)) + _size(v)
    for name, flag, per_v in (("g", a["FORGET"] > 0, a["FORGET"] == 2), ("beta", a["HAS_BETA"], a["BETA_PER_V"]),
                              ("b", a["HAS_B"], a["B_PER_V"])):
        if flag:
            read += _size(a[name]) if per_v and name != "g" else NVT * _size(a[name])
    states = (2 if diag else 1) * H * V * K * 4
    ck = -(-TT // C) * states if a["SAVE_CKPT"] else 0
    out = _size(a["o"]) + (_size(a["var"]) if a["OUTPUT_VAR"] else 0)
    return read, ck + out, TT * H * V * K * (8 if diag else 6)


def _fr_bwd(a, g):
    NVT, NH = g
    q, k, v, do = a["q"], a["k"], a["v"], a["do"]
    TT = q.shape[0]
    H, K, V, C = a["H"], a["K"], a["V"], a["C"]
    diag = a["POSTERIOR"] == 1
    inputs = 2 * (NVT * (_size(q) + _size(k)) + _size(v))  # the recompute pass and the adjoint pass
    for name, flag, per_v in (("g", a["FORGET"] > 0, a["FORGET"] == 2), ("beta", a["HAS_BETA"], a["BETA_PER_V"]),
                              ("b", a["HAS_B"], a["B_PER_V"])):
        if flag:
            inputs += 2 * (_size(a[name]) if per_v and name != "g" else NVT * _size(a[name]))
    states = (2 if diag else 1) * TT * H * V * K * 4
    read = inputs + _size(do) + states + (-(-TT // C)) * states // TT  # scratch read back + checkpoints
    written = states + NVT * 2 * TT * H * K * 4 + TT * H * V * 4 * 3  # scratch, dq/dk partials, dv/dβ/db
    return read, written, TT * H * V * K * (24 if diag else 16)


KERNEL_MODELS: Dict[str, Callable] = {
    "_chunk_states_kernel": _chunk_states, "_chunk_output_kernel": _chunk_output,
    "_chunk_dstates_kernel": _chunk_dstates, "_chunk_bwd_dv_kernel": _chunk_bwd_dv,
    "_chunk_bwd_dqk_kernel": _chunk_bwd_dqk, "_pv_fwd_kernel": _pv_fwd, "_pv_bwd_kernel": _pv_bwd,
    "fused_recurrent_fwd_kernel": _fr_fwd, "fused_recurrent_bwd_kernel": _fr_bwd,
}


def launch_traffic(ln: Launch) -> Tuple[float, float, float]:
    """(bytes read, bytes written, FLOPs) of one launch by its kernel's model."""
    model = KERNEL_MODELS.get(ln.name)
    if model is None:
        raise KeyError(f"no traffic model for kernel {ln.name}")
    return model(ln.bound(), ln.grid)


# ----------------------------------------------------------------------------------------- floors
def floors(shape=BENCH_SHAPE, in_bytes: int = 2, groups: int = 0, per_value: bool = False,
           C: int = 64) -> Dict[str, float]:
    """Floor bytes and FLOPs per token and head, forward and forward+backward (see the module docstring).
    ``groups``: 0 no b, 1 head-shared, G grouped, V per value."""
    B, T, H, K, V = shape
    gates = 4 + 4 * groups  # log-decay, b (fp32)
    io_f = (2 * K + V) * in_bytes + gates + V * in_bytes
    if per_value:
        states = 2 * V * K * 4 / 64
        flops_f = 20 * V * K
    else:
        states = V * K * 4 / C
        flops_f = 2 * C * (K + V) + 4 * V * K  # intra-chunk scores and read-out, state update per token
    bwd = (2 * K + 2 * V) * in_bytes + gates + (2 * K + V) * in_bytes + gates  # reads q,k,v,do,g(,b); writes grads
    return {"fwd_bytes": io_f + states, "fwdbwd_bytes": io_f + 2 * states + bwd,
            "fwd_flops": flops_f, "fwdbwd_flops": 3 * flops_f}


def fla_chunk_simple_gla(shape=BENCH_SHAPE, in_bytes: int = 2, C: int = 64, BKV: int = 64) -> Dict[str, float]:
    """fla's ``chunk_simple_gla`` by the same model, per token and head (fla 0.6, read from its sources):
    forward ``chunk_fwd_h`` (k, v per [BK, BV] state tile; writes the per-chunk states h in the input dtype)
    and ``chunk_fwd_o`` (q, k per value tile of 128; h, v, g; writes o); backward recomputes h, then
    ``chunk_bwd_dh`` (q, do, g; writes dh per chunk), ``chunk_bwd_dqkwg`` (q, k, v, do, h, dh; writes dq, dk
    and an fp32 dg per key tile) and ``chunk_bwd_dv`` (q, k, do, dh; writes dv), and two cumulative sums of
    the fp32 gate. State tiles BK = BV = ``BKV`` (its autotuning list on Hopper is 64, 128)."""
    B, T, H, K, V = shape
    nk, nv = -(-K // BKV), -(-V // BKV)
    st = V * K * in_bytes / C  # one state per chunk, input dtype
    g = 4
    fwd_h = nv * K * in_bytes + nk * V * in_bytes + nk * nv * g + st
    fwd_o = K * in_bytes * 2 + st + V * in_bytes + g + V * in_bytes
    cums = 2 * g
    fwd = fwd_h + fwd_o + cums
    bwd_dh = nk * V * in_bytes + nv * K * in_bytes + nk * nv * g + st
    dqkwg = 2 * K * in_bytes + V * in_bytes * 2 + 2 * st + g + 2 * K * in_bytes + g
    dv = 2 * K * in_bytes + V * in_bytes + st + g + V * in_bytes
    bwd = fwd_h + bwd_dh + dqkwg + dv + 2 * cums
    flops_f = 2 * C * (K + V) + 4 * V * K
    return {"fwd_bytes": fwd, "fwdbwd_bytes": fwd + bwd, "fwd_flops": flops_f, "fwdbwd_flops": 3 * flops_f + 2 * V * K}


# ----------------------------------------------------------------------------------------- per case
def case_traffic(rec: Recording) -> Dict:
    """Bytes and FLOPs per token and head of a recorded case, forward and forward+backward, by part."""
    B, T, H, K, V = rec.shape
    bth = B * T * H
    parts: Dict[str, Dict[str, float]] = {}
    for ln in rec.launches:
        r, w, f = launch_traffic(ln)
        d = parts.setdefault(f"{ln.phase} {ln.name}", {"read": 0.0, "written": 0.0, "flops": 0.0})
        d["read"] += r / bth
        d["written"] += w / bth
        d["flops"] += f / bth
    for op in rec.ops:
        if op.phase == "loss":
            continue
        d = parts.setdefault(f"{op.phase} torch", {"read": 0.0, "written": 0.0, "flops": 0.0})
        d["read"] += op.read / bth
        d["written"] += op.written / bth
        d["flops"] += op.written / 4 / bth

    def total(phases, key):
        return sum(v[key] for k, v in parts.items() if k.split(" ")[0] in phases)

    out = {"fwd_bytes": total(("fwd",), "read") + total(("fwd",), "written"),
           "fwdbwd_bytes": sum(total(("fwd+grad", "bwd"), key) for key in ("read", "written")),
           "fwd_flops": total(("fwd",), "flops"), "fwdbwd_flops": total(("fwd+grad", "bwd"), "flops"),
           "bwd_bytes": total(("bwd",), "read") + total(("bwd",), "written"),
           "bwd_flops": total(("bwd",), "flops"),
           "parts": {k: {kk: round(vv, 1) for kk, vv in v.items()} for k, v in sorted(parts.items())}}
    return out


def report(cases=None, shape=BENCH_SHAPE) -> Dict:
    """The traffic of every Triton case of the benchmark (bf16 inputs) and of fla's chunk_simple_gla, with
    their floors and the ratios."""
    import torch

    from . import launches

    cases = launches.bench_cases(shape) if cases is None else cases
    rows = []
    for model, b_kind, backend in cases:
        rec = launches.record(model, b_kind, backend, dtype=torch.bfloat16, shape=shape)
        if rec.note:
            rows.append({"model": model, "b": b_kind, "backend": backend, "note": rec.note})
            continue
        t = case_traffic(rec)
        V = shape[4]
        groups = 0 if b_kind == "-" else 1 if b_kind == "H" else V if b_kind == "V" else int(b_kind[1:])
        fl = floors(shape, 2, groups, per_value=b_kind == "V")
        row = {"model": model, "b": b_kind, "backend": backend, **{k: round(v, 1) for k, v in t.items()
                                                                 if k != "parts"}}
        row["floor"] = {k: round(v, 1) for k, v in fl.items()}
        row["ratio_to_floor"] = {k: round(t[k] / fl[k], 2) for k in fl}
        row["parts"] = t["parts"]
        rows.append(row)
    fla = fla_chunk_simple_gla(shape)
    by = {(r["model"], r["b"], r["backend"]): r for r in rows}
    mamba = by.get(("mamba2", "-", "triton_chunk"))
    ratios = {}
    if mamba:
        ratios["mamba2 triton_chunk / fla chunk_simple_gla (fwd+bwd bytes)"] = round(
            mamba["fwdbwd_bytes"] / fla["fwdbwd_bytes"], 2)
        for key, label in ((("palimpsa", "H", "triton_chunk"), "palimpsa G=1"),
                           (("palimpsa", "G8", "triton_chunk"), "palimpsa G=8"),
                           (("palimpsa", "V", "triton_per_value"), "palimpsa per value")):
            if key in by and "fwdbwd_bytes" in by[key]:
                ratios[f"{label} / mamba2 triton_chunk (fwd+bwd bytes)"] = round(
                    by[key]["fwdbwd_bytes"] / mamba["fwdbwd_bytes"], 2)
    pv = by.get(("palimpsa", "V", "triton_per_value"))
    if pv and "bwd_bytes" in pv:
        ratios["palimpsa per value: backward / forward bytes"] = round(pv["bwd_bytes"] / pv["fwd_bytes"], 2)
        ratios["palimpsa per value: backward / forward FLOPs"] = round(pv["bwd_flops"] / pv["fwd_flops"], 2)
    B, T, H, K, V = shape
    return {"command": "metaplastic bench traffic", "date": datetime.date.today().isoformat(),
            "shape": {"B": B, "T": T, "H": H, "K": K, "V": V}, "inputs": "q, k, v bf16; gates fp32; TF32 dots",
            "units": "bytes and FLOPs per token and head", "model": __doc__.split("Model, stated once:")[1].strip(),
            "fla_chunk_simple_gla": {k: round(v, 1) for k, v in fla.items()},
            "ratios": ratios, "cases": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these registry models")


def run(args: argparse.Namespace) -> int:
    import os
    import subprocess
    import sys

    if args.json:
        from metaplastic.safe_io import check_output_location
        check_output_location(args.json, what="--json", kind="file")
    if args.models:
        import metaplastic
        unknown = [m for m in args.models if m not in metaplastic.registry]
        if unknown:
            raise UserError(f"unknown model(s) {', '.join(unknown)}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "metaplastic.cli", "bench", "traffic"]
        argv += ["--json", args.json] if args.json else []
        argv += ["--models", *args.models] if args.models else []
        return subprocess.run(argv, env=env).returncode
    from . import launches
    cases = [c for c in launches.bench_cases() if not args.models or c[0] in args.models]
    rep = report(cases)
    print(format_report(rep))
    if args.json:
        from metaplastic.safe_io import atomic_write
        atomic_write(args.json, json.dumps(rep, indent=1) + "\n")
    return 0


def format_report(rep: Dict) -> str:
    lines = [f"{rep['command']}: {rep['units']} at B={rep['shape']['B']}, T={rep['shape']['T']}, "
             f"H={rep['shape']['H']}, K={rep['shape']['K']}, V={rep['shape']['V']} ({rep['inputs']})", "",
             f"{'model':<20} {'b':>4} {'backend':<17} {'fwd B':>9} {'fwd+bwd B':>10} {'x floor':>8} "
             f"{'fwd+bwd FLOP':>13} {'x floor':>8}"]
    for r in rep["cases"]:
        if "note" in r:
            lines.append(f"{r['model']:<20} {r['b']:>4} {r['backend']:<17} {r['note']}")
            continue
        lines.append(f"{r['model']:<20} {r['b']:>4} {r['backend']:<17} {r['fwd_bytes']:>9.0f} "
                     f"{r['fwdbwd_bytes']:>10.0f} {r['ratio_to_floor']['fwdbwd_bytes']:>8.2f} "
                     f"{r['fwdbwd_flops']:>13.0f} {r['ratio_to_floor']['fwdbwd_flops']:>8.2f}")
    f = rep["fla_chunk_simple_gla"]
    lines.append(f"{'fla chunk_simple_gla':<20} {'-':>4} {'(model)':<17} {f['fwd_bytes']:>9.0f} "
                 f"{f['fwdbwd_bytes']:>10.0f}")
    lines.append("")
    lines += [f"{k}: {v}" for k, v in rep["ratios"].items()]
    return "\n".join(lines)
