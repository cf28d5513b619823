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
  synapse updated and read once per token from registers (forward ``10·V·K`` FLOPs: the two decayed writes
  ``α∘M + (βv)⊗k`` and ``α∘J + b⊗k²`` three each, ``Ip + J`` one, the division one, the read's multiply-add
  two; backward twice the forward).
"""
from __future__ import annotations

import argparse
import datetime
import json
from typing import Callable, Dict, List, Optional, Tuple

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
def _written_scale(a) -> int:
    """Bytes of the per-token write ``w`` (``β/Ip``) one program of a ``SCALED`` launch reads for every
    token, else 0."""
    return _size(a["w"]) if a.get("SCALED") else 0


def _chunk_states(a, g):
    NK, NV, BH = g
    k, v = a["k"], a["v"]
    N, K, V, C = a["N"], a["K"], a["V"], a["C"]
    # per program: its key columns and value rows of every chunk, the log-decay (and write) of every chunk
    read = NV * _size(k) + NK * _size(v) + NK * NV * (_size(a["g"]) + _written_scale(a)) + _size(a["h0"])
    written = BH * (N + 1) * V * K * _es(a["states"])
    return read, written, BH * N * (2 * C * V * K + 2 * V * K + C * K * NV * (2 if a["SQUARE"] else 1))


def _chunk_output(a, g):
    N, BH, NVT = g
    q, k, v = a["q"], a["k"], a["v"]
    TPG, C, K, V, BV = a["TPG"], a["C"], a["K"], a["V"], a["BV"]
    read = TPG * _size(q) + NVT * _size(k) + BH * N * V * K * _es(a["states"]) + _size(v) \
        + NVT * (_size(a["g"]) + _written_scale(a))
    flops = N * BH * NVT * (2 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 4 * C * C)
    return read, _size(a["o"]), flops


def _chunk_dstates(a, g):
    NK, NVT, BH = g
    q, do = a["q"], a["do"]
    TPG, N, K, V, C = a["TPG"], a["N"], a["K"], a["V"], a["C"]
    read = TPG * _size(q) + NK * _size(do) + NK * NVT * _size(a["g"]) + _size(a["dht"])
    written = _size(a["dstates"]) + _size(a["dh0"])
    return read, written, BH * N * (2 * C * V * K + 2 * V * K)


def _chunk_bwd_dv(a, g):
    N, BH, NVT = g
    q, k, do = a["q"], a["k"], a["do"]
    TPG, C, K, V, BV = a["TPG"], a["C"], a["K"], a["V"], a["BV"]
    read = TPG * _size(q) + NVT * _size(k) + _size(a["dstates"]) + _size(do) + NVT * _size(a["g"])
    flops = N * BH * NVT * (2 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 4 * C * C)
    written = _size(a["dv"])
    if a["SCALED"]:  # v read to form dw; dw written per value tile
        read += _size(a["v"]) + NVT * _size(a["w"])
        written += _size(a["dw"])
    return read, written, flops


def _chunk_bwd_dqk(a, g):
    NK, N, BH = g
    q, k, v, do = a["q"], a["k"], a["v"], a["do"]
    C, K, V, NG = a["C"], a["K"], a["V"], a["NG"]
    # per program: do and v of every value row, the start states and end-state cotangents of its key columns
    # (no end state: Σ dS_end ∘ S_end from the start state and dk), k once per group and once more, q once
    st = BH * N * V * K * _es(a["states"])
    read = NK * (_size(do) + _size(v) + _size(a["g"]) + _written_scale(a)) + (NG + 1) * _size(k) + _size(q) \
        + _size(a["dstates"]) + st
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dg"])
    flops = N * BH * (NK * 2 * C * C * V + 4 * C * V * K + NG * 4 * C * C * K + 8 * C * K * NG)
    return read, written, flops


def _grouped_read_bytes(a, programs_per_token_tile: int) -> float:
    """q, k, the group's b column per key tile and the group precision at the chunk start, read by
    ``programs_per_token_tile`` programs for each (chunk, key column)."""
    NK = -(-a["K"] // a["BK"])
    b = a["b"]
    per_group_b = _size(b) / b.shape[-1]
    return programs_per_token_tile * (_size(a["q"]) + _size(a["k"]) + NK * per_group_b)


def _grouped_output(a, g):
    N, BH, NVT = g
    C, K, V, BV = a["C"], a["K"], a["V"], a["BV"]
    read = _grouped_read_bytes(a, NVT) + NVT * BH * N * K * _es(a["Js"]) + BH * N * V * K * _es(a["states"]) \
        + _size(a["v"]) + NVT * (_size(a["g"]) + _written_scale(a))
    written = _size(a["o"]) + (BH * N * C * a["NG"] * _es(a["var"]) if a["VAR"] else 0)
    # per key column: D x, r kᵀ, (r ∘ exp G) Sᵀ and the elementwise J, I, r (8 per element)
    flops = N * BH * NVT * (4 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 8 * C * K + 4 * C * C)
    return read, written, flops


def _grouped_dstates(a, g):
    NK, NVT, BH = g
    N, K, V, C, BK = a["N"], a["K"], a["V"], a["C"], a["BK"]
    read = _grouped_read_bytes(a, NVT) + NVT * BH * N * K * _es(a["Js"]) + NK * _size(a["do"]) \
        + NK * NVT * _size(a["g"]) + _size(a["dht"])
    written = _size(a["dstates"]) + _size(a["dh0"])
    flops = BH * N * (2 * C * V * K + 2 * V * K) + NK * NVT * BH * N * (2 * C * C * BK + 8 * C * BK)
    return read, written, flops


def _grouped_dv(a, g):
    N, BH, NVT = g
    C, K, V, BV = a["C"], a["K"], a["V"], a["BV"]
    read = _grouped_read_bytes(a, NVT) + NVT * BH * N * K * _es(a["Js"]) + _size(a["dstates"]) + _size(a["do"]) \
        + NVT * _size(a["g"])
    flops = N * BH * NVT * (4 * C * C * K + 2 * C * BV * K + 2 * C * C * BV + 8 * C * K + 4 * C * C)
    written = _size(a["dv"])
    if a["SCALED"]:  # v read to form dw; dw written per value tile
        read += _size(a["v"]) + NVT * _size(a["w"])
        written += _size(a["dw"])
    return read, written, flops


def _grouped_dqk(a, g):
    NK, N, BH = g
    C, K, V, NG = a["C"], a["K"], a["V"], a["NG"]
    VG = V // NG
    # one launch, every group in turn in each program: per program, do and v of every value row, the start
    # states and end-state cotangents of every row in its key columns, k, q, the log-decay and the write w
    # once, every group's b column and precision at the chunk start; dq (the query's dtype), dk and the
    # log-decay's part written once, db, dJs, dIp per group
    read = NK * (_size(a["do"]) + _size(a["v"]) + _size(a["b"]) + _size(a["g"]) + _written_scale(a)) \
        + _size(a["k"]) + _size(a["q"]) + NG * BH * N * K * _es(a["Js"]) \
        + _size(a["dstates"]) + BH * N * V * K * _es(a["states"])
    if a["VAR"]:
        read += NK * _size(a["dvar"])
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dg"]) + _size(a["db"]) + _size(a["dJs"]) + _size(a["dIp"])
    # per group and key column: W (its key tile's share), (do ∘ e^G) S, (v ∘ e^G_C) dS, W k, Wᵀ r; the two
    # decayed scans D x and Dᵀ dI (3 per element each); elementwise ~20
    flops = N * BH * NG * (NK * 2 * C * C * VG + 4 * C * VG * K + 4 * C * C * K + 26 * C * K)
    return read, written, flops


def _grouped_dJ(a, g):
    NK, BH = g
    N, K, C, NG = a["N"], a["K"], a["C"], a["NG"]
    # per program: its key columns of k, every group's b, the group precisions and the per-chunk cotangents;
    # dk read and written in the key's dtype (dk_out), its db and dg partials read and written back
    read = _size(a["k"]) + NK * (_size(a["b"]) + _size(a["g"])) + _size(a["Js"]) + _size(a["dJs"]) \
        + _size(a["dJT"]) + _size(a["dk"]) + _size(a["db"]) + _size(a["dg"])
    written = _size(a["dk_out"]) + _size(a["db"]) + _size(a["dg"]) + _size(a["dJ0"])
    flops = BH * N * NK * (4 * C * a["BG"] * a["BK"] + 6 * C * a["BK"])
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
    out = BH * T * V * (_es(a["o"]) + (_es(a["var"]) if a["OUTPUT_VAR"] else 0))
    # per synapse and token: the decay 2, the two writes 4, I 1, M / I 1, the q-weighted sum 2 (the variance:
    # q² / I 1 and its sum 1)
    flops = BH * T * V * K * (10 + (2 if a["OUTPUT_VAR"] else 0))
    return read + init, ck + final + out, flops


def _pv_bwd(a, g):
    NVT, BH = g
    q, k, v, do = a["q"], a["k"], a["v"], a["do"]
    K, V, C, T, NS = a["K"], a["V"], a["C"], a["T"], a["NS"]
    per_prog = NVT * BH * T  # one scalar per token and program
    st = 2 * BH * V * K * _es(a["dM0"])  # (M, J) over all heads
    # per program and segment: its rows of v (β v), b, do (dvar), g twice (g_t, g_{t+1}), the first row's v,
    # β, b and g and the last row's do (dvar) once more; per key column q, k, the first row's k and the last
    # row's q; the segment's start and end states (each saved state read twice: as one segment's end and the
    # next one's start) and the carried cotangents of its rows; after the columns v again for dβ, β for dv
    seg = NS * BH * V  # one row of V per segment and head
    read = NVT * (_size(q) + _size(k)) + _size(v) + _size(do) + 2 * NS * st
    read += NS * NVT * BH * K * (_es(q) + _es(k)) + seg * (_es(v) + _es(do))
    read += (_size(a["b"]) + seg * _es(a["b"])) if a["B_PER_V"] else NVT * (_size(a["b"]) + NS * BH * _es(a["b"]))
    if a["HAS_BETA"]:
        read += _size(v) + (2 * _size(a["beta"]) + seg * _es(a["beta"]) if a["BETA_PER_V"]
                            else NVT * (2 * _size(a["beta"]) + NS * BH * _es(a["beta"])))
    if a["HAS_G"]:
        read += 2 * per_prog * _es(a["g"]) + NS * NVT * BH * _es(a["g"])
    if a["HAS_DVAR"]:
        read += _size(a["dvar"]) + seg * _es(a["dvar"])
    read += (NS - 1) * st + (st if a["HAS_DFINAL"] else 0)
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dg"]) + _size(a["dv"]) + _size(a["db"]) + NS * st
    if a["HAS_BETA"]:
        written += _size(a["dbeta"])
    # elementwise on [C, BV] per key column, per row (C rows per segment of C tokens): the writes 2, the
    # states' scan 5 (one combine per element: the decays' product and two multiply-adds), I and 1/I 2,
    # s M / I 2, dq's sum 1, q / I 1, L_M 1, P_J 1, the decay's Σ P_J 1, the adjoint's scan 5, d(βv) and db 4,
    # dk 4: 29 (the variance: 5 more); per row, key column and program 6 (the variance: 6 more); per row and
    # value row 10 (β v, scale·do, the decay's part 2, dv, dβ, db); per row and program 3 (the decays, dg's
    # sum from the end); per synapse and segment 20 (the first row's input, the last row's local gradients from
    # the end state and the carried cotangent, the start state's cotangent, the boundary term; the variance:
    # 3 more); the final state's boundary term 4 per synapse
    rows = NS * C
    dvar = a["HAS_DVAR"]
    flops = BH * rows * (V * K * (29 + (5 if dvar else 0)) + NVT * K * (6 + (6 if dvar else 0)) + 10 * V
                         + 3 * NVT) \
        + BH * NS * V * K * (20 + (3 if dvar else 0)) + (BH * V * K * 4 if a["HAS_DFINAL"] else 0)
    return read, written, flops


def _pv_sum(a, g):
    x, y, N, P = a["x"], a["y"], a["N"], a["P"]
    return P * N * _es(x), N * _es(y), P * N


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


# fla's kernels, for the comparison with fla's ``chunk_simple_gla`` (written from fla 0.6's tl.load /
# tl.store; :func:`metaplastic.kernels.launches.record_fla` records its launches as ours are recorded).
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fla_cumsum(a, g):
    return _size(a["s"]), _size(a["o"]), _n(a["o"])


def _fla_fwd_h(a, g):
    # per program (BK, BV) state tile: k, v of its columns/rows and g of every chunk; writes h per chunk
    k, v = a["k"], a["v"]
    B, T, H, K = k.shape
    NK, NV, C = _cdiv(K, a["BK"]), _cdiv(v.shape[-1], a["BV"]), a["BT"]
    read = NV * _size(k) + NK * _size(v) + NK * NV * _size(a["g"]) + _size(a.get("h0"))
    written = _size(a["h"]) + _size(a.get("ht"))
    return read, written, B * H * _cdiv(T, C) * (2 * C * K * v.shape[-1] + 2 * K * v.shape[-1])


def _fla_fwd_o(a, g):
    # per program (chunk, BV value tile): q, k, g of the chunk over every key tile, h[:, BV], v tile; writes o
    q, v = a["q"], a["v"]
    B, T, H, K = q.shape
    V, C = v.shape[-1], a["BT"]
    NV = _cdiv(V, a["BV"])
    read = NV * (_size(q) + _size(a["k"]) + _size(a["g"])) + _size(a["h"]) + _size(v)
    flops = B * H * _cdiv(T, C) * NV * (2 * C * C * K + 2 * C * K * a["BV"] + 2 * C * C * a["BV"] + 4 * C * C)
    return read, _size(a["o"]), flops


def _fla_bwd_dh(a, g):
    # per program (BK, BV) tile, chunks in reverse: q columns, do rows, g; writes dh per chunk
    q, do = a["q"], a["do"]
    B, T, H, K = q.shape
    V, C = do.shape[-1], a["BT"]
    NK, NV = _cdiv(K, a["BK"]), _cdiv(V, a["BV"])
    read = NV * _size(q) + NK * _size(do) + NK * NV * _size(a["g"]) + _size(a.get("dht"))
    written = _size(a["dh"]) + _size(a.get("dh0"))
    return read, written, B * H * _cdiv(T, C) * (2 * C * K * V + 2 * K * V)


def _fla_bwd_dqkwg(a, g):
    # per program (BK key tile, chunk): v, do, h, dh over every value tile; q, k, g; writes dq, dk, dg [NK]
    q, v = a["q"], a["v"]
    B, T, H, K = q.shape
    V, C = v.shape[-1], a["BT"]
    NK = _cdiv(K, a["BK"])
    read = NK * (_size(v) + _size(a["do"]) + _size(a["g"])) + _size(a["h"]) + _size(a["dh"]) + _size(q) \
        + _size(a["k"])
    written = _size(a["dq"]) + _size(a["dk"]) + _size(a["dg"])
    flops = B * H * _cdiv(T, C) * (4 * C * V * K + NK * 2 * C * C * V + 4 * C * C * K + 8 * C * K)
    return read, written, flops


def _fla_bwd_dv(a, g):
    # per program (chunk, BV value tile): q, k, g over every key tile, dh[:, BV], do tile; writes dv
    q, do = a["q"], a["do"]
    B, T, H, K = q.shape
    V, C = do.shape[-1], a["BT"]
    NV = _cdiv(V, a["BV"])
    read = NV * (_size(q) + _size(a["k"]) + _size(a["g"])) + _size(a["dh"]) + _size(do)
    flops = B * H * _cdiv(T, C) * NV * (2 * C * C * K + 2 * C * K * a["BV"] + 2 * C * C * a["BV"])
    return read, _size(a["dv"]), flops


FLA_KERNEL_MODELS: Dict[str, Callable] = {
    "chunk_local_cumsum_scalar_kernel": _fla_cumsum, "chunk_fwd_kernel_h": _fla_fwd_h,
    "chunk_fwd_kernel_o": _fla_fwd_o, "chunk_bwd_kernel_dh": _fla_bwd_dh,
    "chunk_bwd_kernel_dqkwg": _fla_bwd_dqkwg, "chunk_bwd_kernel_dv": _fla_bwd_dv,
}


KERNEL_MODELS: Dict[str, Callable] = {
    "_chunk_states_kernel": _chunk_states, "_chunk_output_kernel": _chunk_output,
    "_chunk_dstates_kernel": _chunk_dstates, "_chunk_bwd_dv_kernel": _chunk_bwd_dv,
    "_chunk_bwd_dqk_kernel": _chunk_bwd_dqk, "_grouped_output_kernel": _grouped_output,
    "_grouped_dstates_kernel": _grouped_dstates, "_grouped_dv_kernel": _grouped_dv,
    "_grouped_dqk_kernel": _grouped_dqk, "_grouped_dJ_kernel": _grouped_dJ,
    "_pv_fwd_kernel": _pv_fwd, "_pv_bwd_kernel": _pv_bwd,
    "_pv_sum_kernel": _pv_sum,
    "fused_recurrent_fwd_kernel": _fr_fwd, "fused_recurrent_bwd_kernel": _fr_bwd,
}


def launch_traffic(ln: Launch) -> Tuple[float, float, float]:
    """(bytes read, bytes written, FLOPs) of one launch by its kernel's model."""
    model = KERNEL_MODELS.get(ln.name) or FLA_KERNEL_MODELS.get(ln.name)
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
        flops_f = 10 * V * K
    else:
        states = V * K * 4 / C
        flops_f = 2 * C * (K + V) + 4 * V * K  # intra-chunk scores and read-out, state update per token
    bwd = (2 * K + 2 * V) * in_bytes + gates + (2 * K + V) * in_bytes + gates  # reads q,k,v,do,g(,b); writes grads
    return {"fwd_bytes": io_f + states, "fwdbwd_bytes": io_f + 2 * states + bwd,
            "fwd_flops": flops_f, "fwdbwd_flops": 3 * flops_f}


# ----------------------------------------------------------------------------------------- per case
def _fla_row(shape) -> Dict:
    """fla's ``chunk_simple_gla`` recorded at ``shape`` and counted; a note instead when the installed fla
    cannot be recorded (its host functions changed)."""
    from . import launches
    try:
        rec = launches.record_fla(shape)
        t = case_traffic(rec)
    except Exception as e:  # any change in fla's wrappers: stated in the report, not a crash
        return {"note": f"fla's chunk_simple_gla could not be recorded: {type(e).__name__}: {e}"}
    return {"recorded": rec.model, "tiles": _fla_tiles(rec),
            **{k: (round(v, 1) if k != "parts" else v) for k, v in t.items()}}


def _fla_tiles(rec: Recording) -> Dict[str, str]:
    """The tiles each recorded fla kernel ran with (its autotuned ones: see ``record_fla``)."""
    out = {}
    for ln in rec.launches:
        a = ln.bound()
        if a.get("BK") is not None:
            out[ln.name] = f"BK={a['BK']} BV={a['BV']}"
    return out


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
    fla_row = _fla_row(shape)
    by = {(r["model"], r["b"], r["backend"]): r for r in rows}
    mamba = by.get(("mamba2", "-", "triton_chunk"))
    ratios = {}
    if mamba and "fwdbwd_bytes" in fla_row:
        ratios["mamba2 triton_chunk / fla chunk_simple_gla (fwd+bwd bytes)"] = round(
            mamba["fwdbwd_bytes"] / fla_row["fwdbwd_bytes"], 2)
    if mamba:
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
            "fla_chunk_simple_gla": fla_row,
            "ratios": ratios, "cases": rows}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON to FILE")
    parser.add_argument("--models", nargs="+", metavar="NAME", help="only these registry models")


def run(args: argparse.Namespace) -> int:
    from metaplastic.safe_io import check_output_location

    from .launches import check_models, rerun_without_interpreter
    if args.json:
        check_output_location(args.json, what="--json", kind="file")
    check_models(args.models)
    argv = ["traffic"] + (["--json", args.json] if args.json else []) + (["--models", *args.models] if args.models else [])
    rc = rerun_without_interpreter(argv)
    if rc is not None:
        return rc
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
    if "note" in f:
        lines.append(f"{'fla chunk_simple_gla':<20} {'-':>4} {'':<17} {f['note']}")
    else:
        lines.append(f"{'fla chunk_simple_gla':<20} {'-':>4} {'(recorded)':<17} {f['fwd_bytes']:>9.0f} "
                     f"{f['fwdbwd_bytes']:>10.0f}")
    lines.append("")
    lines += [f"{k}: {v}" for k, v in rep["ratios"].items()]
    return "\n".join(lines)
