"""`metaplastic convert` on checkpoints written by the paper authors' code (``model_type`` ``palimpsa`` and
``meta_mamba2``; docs/authors.md#their-format).

The checkpoints are built here by hand in their layout: their config fields, their key names and shapes
(§2), random weights, tied heads left out of the file as their exporter does, safetensors or ``.bin``. The
expected logits come from an oracle written from docs/authors.md#the-forward-pass with pieces nobody here wrote – fla's
pure-torch norms (``rms_norm_ref``; the gated one with ``norm_before_gate`` True for Palimpsa, False over
the whole d_inner for MetaMamba2) – plus the documented steps: causal depthwise convolutions with SiLU,
``F.normalize`` on q and k, the gates, and the recurrence as a plain token-by-token loop:
``M_t = f_t M_{t−1} + v_t k_tᵀ``, ``Ī_t = f_t Ī_{t−1} + b_t (k_t∘k_t)ᵀ``,
``o_t = scale · (M_t ⊘ (Ip + Ī_t)) q_t``.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from metaplastic.cli import main
from metaplastic.oracles import relative_error

pytest.importorskip("fla")
from fla.modules.norm.layernorm import rms_norm_ref  # noqa: E402
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from metaplastic import MetaplasticForCausalLM, convert_checkpoint  # noqa: E402

from helpers import assert_close  # noqa: E402

VOCAB = 41
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


# --- fake checkpoints in the authors' layout --------------------------------------------------------

def palimpsa_config(**overrides):
    cfg = dict(model_type="palimpsa", architectures=["PalimpsaForCausalLM"],
               auto_map={"AutoConfig": "fla.models.palimpsa.PalimpsaConfig"}, vocab_size=VOCAB, hidden_size=32,
               num_hidden_layers=2, num_heads=2, head_dim=8, expand_k=1, expand_v=1.5, num_v_heads=None,
               beta_step_rank="auto", use_gate=True, use_short_conv=True, conv_size=4, norm_eps=1e-6,
               metaplasticity=True, use_residual=True, hidden_ratio=4, intermediate_size=None, hidden_act="swish",
               fuse_swiglu=True, fuse_norm=True, attn=None, tie_word_embeddings=True, fuse_cross_entropy=True,
               use_l2warp=False, use_cache=False, initializer_range=0.02, finetuning=False, mode="chunk",
               allow_neg_eigval=False, reduct_k=1, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


def meta_mamba2_config(**overrides):
    cfg = dict(model_type="meta_mamba2", architectures=["MetaMamba2ForCausalLM"], vocab_size=VOCAB, hidden_size=16,
               num_hidden_layers=2, head_dim=8, state_size=6, expand=2, n_groups=2, conv_kernel=4, use_bias=False,
               use_conv_bias=True, hidden_act="silu", norm_eps=1e-5, residual_in_fp32=True, metaplasticity=True,
               beta_step_rank="auto", time_step_limit=[0.0, math.inf], time_step_min=1e-3, time_step_max=0.1,
               tie_word_embeddings=True, use_cache=True, rms_norm=True, chunk_size=256, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return cfg


def _mlp_width(c):
    if c["intermediate_size"] is not None:
        return c["intermediate_size"]
    return 256 * math.ceil(int(c["hidden_size"] * c["hidden_ratio"] * 2 / 3) / 256)


def palimpsa_shapes(c):
    d, H = c["hidden_size"], c["num_heads"]
    Hv = c["num_v_heads"] or H
    dk, dv = int(c["head_dim"] * c["expand_k"]), int(c["head_dim"] * c["expand_v"])
    r = math.ceil(d / 16) if c["beta_step_rank"] == "auto" else c["beta_step_rank"]
    W, I = c["conv_size"], _mlp_width(c)
    shapes = {"model.embeddings.weight": (VOCAB, d), "model.norm.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (VOCAB, d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "attn."
        shapes.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                       a + "q_proj.weight": (H * dk, d), a + "k_proj.weight": (H * dk, d),
                       a + "v_proj.weight": (Hv * dv, d), a + "dt_proj.weight": (H, d), a + "bs_proj.weight": (Hv, d),
                       a + "b_rank_proj.weight": (r, d), a + "b_proj.weight": (Hv * dv, r),
                       a + "A_log": (Hv,), a + "dt_bias": (Hv,), a + "D": (Hv,), a + "b_scale": (Hv,),
                       a + "Ip_log": (Hv,), a + "o_norm.weight": (dv,), a + "o_proj.weight": (d, Hv * dv),
                       p + "mlp.gate_proj.weight": (I, d), p + "mlp.up_proj.weight": (I, d),
                       p + "mlp.down_proj.weight": (d, I)})
        if c["use_gate"]:
            shapes[a + "g_proj.weight"] = (Hv * dv, d)
        if c["use_short_conv"]:
            shapes.update({a + "q_conv1d.weight": (H * dk, 1, W), a + "k_conv1d.weight": (H * dk, 1, W),
                           a + "v_conv1d.weight": (Hv * dv, 1, W)})
    return shapes


def meta_mamba2_shapes(c):
    d, P, N, G, W = c["hidden_size"], c["head_dim"], c["state_size"], c["n_groups"], c["conv_kernel"]
    di = c["expand"] * d
    H = c.get("num_heads") or di // P
    conv = di + 2 * G * N
    r = math.ceil(d / 16) if c["beta_step_rank"] == "auto" else c["beta_step_rank"]
    shapes = {"backbone.embeddings.weight": (VOCAB, d), "backbone.norm_f.weight": (d,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (VOCAB, d)
    for i in range(c["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        m = p + "mixer."
        shapes.update({p + "norm.weight": (d,), m + "in_proj.weight": (di + conv + H, d),
                       m + "conv1d.weight": (conv, 1, W), m + "dt_bias": (H,), m + "A_log": (H,), m + "D": (H,),
                       m + "b_scale": (H,), m + "Ip_log": (H,), m + "norm.weight": (di,),
                       m + "out_proj.weight": (d, di), m + "b_rank_proj.weight": (r, d), m + "b_proj.weight": (di, r)})
        if c["use_conv_bias"]:
            shapes[m + "conv1d.bias"] = (conv,)
        if c["use_bias"]:
            shapes[m + "in_proj.bias"] = (di + conv + H,)
            shapes[m + "out_proj.bias"] = (d,)
    return shapes


def random_weights(shapes, seed, ip_log=False):
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("A_log"):
            value = torch.log(0.5 + 4 * torch.rand(shape, generator=gen))
        elif key.endswith("dt_bias"):
            value = -2.0 + torch.randn(shape, generator=gen)
        elif key.endswith("Ip_log"):
            value = 0.5 * torch.randn(shape, generator=gen) if ip_log else torch.zeros(shape)
        elif key.endswith("norm.weight"):
            value = 1.0 + 0.3 * torch.randn(shape, generator=gen)
        elif key.endswith(("b_scale", "D")):
            value = torch.randn(shape, generator=gen)
        else:
            value = 0.4 * torch.randn(shape, generator=gen)
        state[key] = value
    return state


def write_authors(path, cfg, state, fmt="safetensors"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))  # inf is written as Infinity, as their exporter does
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path / "model.safetensors"))
    else:
        torch.save(state, path / "pytorch_model.bin")
    (path / "tokenizer.json").write_text('{"tiny": true}')
    return path


# --- the oracle (docs/authors.md#the-forward-pass) -------------------------------------------------------------

def causal_conv(x, weight, bias=None):
    """Depthwise causal convolution then SiLU: ``x [B, T, C]``, ``weight [C, 1, W]``."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight, bias, padding=weight.shape[-1] - 1, groups=x.shape[-1])[..., :T]
    return F.silu(y).transpose(1, 2)


def recurrence(q, k, v, b, dt, A, Ip, scale):
    """Their Rec, token by token: q, k ``[B, T, H, K]``, v, b ``[B, T, H, V]``, dt ``[B, T, H]``, A, Ip ``[H]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    M = torch.zeros(B, H, V, K, dtype=torch.float64)
    Ibar = torch.zeros(B, H, V, K, dtype=torch.float64)
    q, k, v, b, dt = (t.double() for t in (q, k, v, b, dt))
    A, Ip = A.double(), Ip.double()
    out = []
    for t in range(T):
        f = torch.exp(-dt[:, t] * A)[:, :, None, None]
        M = f * M + v[:, t, :, :, None] * k[:, t, :, None, :]
        Ibar = f * Ibar + b[:, t, :, :, None] * (k[:, t] * k[:, t])[:, :, None, :]
        mu = M / (Ip[None, :, None, None] + Ibar)
        out.append(scale * (mu * q[:, t, :, None, :]).sum(-1))
    return torch.stack(out, 1)


@torch.no_grad()
def palimpsa_oracle(c, sd, ids):
    H = c["num_heads"]
    Hv = c["num_v_heads"] or H
    dk, dv = int(c["head_dim"] * c["expand_k"]), int(c["head_dim"] * c["expand_v"])
    eps = c["norm_eps"]
    x = sd["model.embeddings.weight"][ids]
    B, T, _ = x.shape
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = lambda name: sd[p + "attn." + name]  # noqa: E731
        h = rms_norm_ref(x, sd[p + "attn_norm.weight"], None, eps=eps)
        proj = {n: h @ a(f"{n}_proj.weight").T for n in "qkv"}
        if c["use_short_conv"]:
            proj = {n: causal_conv(proj[n], a(f"{n}_conv1d.weight")) for n in "qkv"}
        else:
            proj = {n: F.silu(proj[n]) for n in "qkv"}
        q, k = proj["q"].view(B, T, H, dk), proj["k"].view(B, T, H, dk)
        xv = proj["v"].view(B, T, Hv, dv)
        q, k = (t.repeat_interleave(Hv // H, dim=2) for t in (q, k))
        dt = F.softplus(h @ a("dt_proj.weight").T + a("dt_bias"))  # [B, T, H] + [Hv]: equal, or H = 1
        A = a("A_log").exp()
        q, k = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
        bs = torch.sigmoid(h @ a("bs_proj.weight").T)
        v = xv * bs[..., None]
        if c["metaplasticity"]:
            s = torch.sigmoid((h @ a("b_rank_proj.weight").T) @ a("b_proj.weight").T).view(B, T, Hv, dv)
            b = s * F.softplus(a("b_scale"))[:, None] * bs[..., None]
            Ip = a("Ip_log").exp()
        else:  # simple GLA: Rec with b = 0, Ip = 1
            b, Ip = torch.zeros_like(v), torch.ones(Hv)
        o = recurrence(q, k, v, b, dt.expand(B, T, Hv), A, Ip, dk ** -0.5).float()
        if c["use_residual"]:
            o = o + a("D")[:, None] * xv
        if c["use_gate"]:
            g = (h @ a("g_proj.weight").T).view(B, T, Hv, dv)
            o = gated_rms_norm_ref(o, a("o_norm.weight"), None, z=g, eps=eps, norm_before_gate=True)
        else:
            o = rms_norm_ref(o, a("o_norm.weight"), None, eps=eps)
        x = x + o.reshape(B, T, Hv * dv) @ a("o_proj.weight").T
        m = rms_norm_ref(x, sd[p + "mlp_norm.weight"], None, eps=eps)
        x = x + (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)) \
            @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm_ref(x, sd["model.norm.weight"], None, eps=eps)
    head = sd["model.embeddings.weight"] if c["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


@torch.no_grad()
def meta_mamba2_oracle(c, sd, ids):
    d, P, N, G = c["hidden_size"], c["head_dim"], c["state_size"], c["n_groups"]
    di = c["expand"] * d
    H = di // P
    eps = c["norm_eps"]
    x = sd["backbone.embeddings.weight"][ids]
    B, T, _ = x.shape
    for i in range(c["num_hidden_layers"]):
        p = f"backbone.layers.{i}."
        m = lambda name: sd.get(p + "mixer." + name)  # noqa: E731
        h = rms_norm_ref(x, sd[p + "norm.weight"], None, eps=eps)
        zxbcdt = h @ m("in_proj.weight").T + (0 if m("in_proj.bias") is None else m("in_proj.bias"))
        z, xBC, dt = zxbcdt.split([di, di + 2 * G * N, H], dim=-1)
        xBC = causal_conv(xBC, m("conv1d.weight"), m("conv1d.bias"))
        xs, Bm, Cm = xBC.split([di, G * N, G * N], dim=-1)
        xs = xs.view(B, T, H, P)
        Bm = Bm.view(B, T, G, N).repeat_interleave(H // G, dim=2)  # head j reads group j // (H / G)
        Cm = Cm.view(B, T, G, N).repeat_interleave(H // G, dim=2)
        dt = F.softplus(dt + m("dt_bias")).clamp(*c["time_step_limit"])
        A = m("A_log").exp()
        dx = xs * dt[..., None]
        if c["metaplasticity"]:
            s = torch.sigmoid((h @ m("b_rank_proj.weight").T) @ m("b_proj.weight").T).view(B, T, H, P)
            b = s * F.softplus(m("b_scale"))[:, None] * dt[..., None]
            Ip = m("Ip_log").exp()
        else:
            b, Ip = torch.zeros_like(dx), torch.ones(H)
        o = recurrence(Cm, Bm, dx, b, dt, A, Ip, 1.0).float() + m("D")[:, None] * xs
        y = gated_rms_norm_ref(o.reshape(B, T, di), m("norm.weight"), None, z=z, eps=eps, group_size=None,
                               norm_before_gate=False)  # gate, then one RMSNorm over the whole d_inner
        x = x + y @ m("out_proj.weight").T + (0 if m("out_proj.bias") is None else m("out_proj.bias"))
    x = rms_norm_ref(x, sd["backbone.norm_f.weight"], None, eps=eps)
    head = sd["backbone.embeddings.weight"] if c["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


def source(tmp_path, kind, fmt="safetensors", seed=0, ip_log=False, **overrides):
    cfg = palimpsa_config(**overrides) if kind == "palimpsa" else meta_mamba2_config(**overrides)
    shapes = palimpsa_shapes(cfg) if kind == "palimpsa" else meta_mamba2_shapes(cfg)
    state = random_weights(shapes, seed, ip_log=ip_log)
    write_authors(tmp_path / "src", cfg, state, fmt)
    oracle = palimpsa_oracle if kind == "palimpsa" else meta_mamba2_oracle
    return cfg, state, oracle


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


CASES = {  # name -> (kind, file format, overrides)
    "palimpsa tied safetensors": ("palimpsa", "safetensors", {}),
    "palimpsa untied bin": ("palimpsa", "bin", dict(tie_word_embeddings=False, intermediate_size=40)),
    "palimpsa no gate, no conv, no D": ("palimpsa", "safetensors", dict(use_gate=False, use_short_conv=False,
                                                                         use_residual=False)),
    "palimpsa value heads, expand_k": ("palimpsa", "safetensors", dict(num_heads=1, num_v_heads=2, expand_k=2,
                                                                        beta_step_rank=3)),
    "palimpsa not metaplastic": ("palimpsa", "bin", dict(metaplasticity=False)),
    "meta_mamba2 tied safetensors": ("meta_mamba2", "safetensors", {}),
    "meta_mamba2 untied bin, biases, dt limit": ("meta_mamba2", "bin", dict(
        tie_word_embeddings=False, use_bias=True, time_step_limit=[0.02, 0.4], n_groups=4, beta_step_rank=2)),
    "meta_mamba2 not metaplastic, one group": ("meta_mamba2", "safetensors", dict(metaplasticity=False, n_groups=1,
                                                                                   use_conv_bias=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_authors_checkpoint_converts_to_the_oracle(tmp_path, case):
    kind, fmt, overrides = CASES[case]
    cfg, state, oracle = source(tmp_path, kind, fmt, ip_log=cfg_ip_log(overrides), **overrides)
    ref = oracle(cfg, state, IDS)
    lines = []
    result = convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False, verify=True, log=lines.append)
    assert result.source_format == "authors" and result.architecture == {"palimpsa": "Palimpsa",
                                                                          "meta_mamba2": "MetaMamba2"}[kind]
    assert max(result.max_abs_diff, result.max_abs_diff_reloaded) <= 1e-5 * ref.abs().max()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert isinstance(model, MetaplasticForCausalLM)
    assert model.config.tie_word_embeddings == cfg["tie_word_embeddings"]
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"tiny": true}'
    got = logits(model, IDS)
    assert ref.abs().max() > 1.0  # not trivially small
    assert_close(got, ref, rtol=1e-5)
    prompt = IDS[:, :4]
    seq = prompt
    for _ in range(5):
        seq = torch.cat([seq, oracle(cfg, state, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    model.generation_config.eos_token_id = None  # the oracle's loop does not stop at their eos token
    assert model.generate(prompt, max_new_tokens=5, do_sample=False).tolist() == seq.tolist()


def cfg_ip_log(overrides):
    """A non-zero Ip_log where it is read (metaplastic layers), so that its mapping is checked too."""
    return overrides.get("metaplasticity", True)


# --- their surgery (docs/authors.md#their-surgery-script) ----------------------------------------------------------

def _std_close(x, expected, rel=0.15):
    return abs(x.std().item() - expected) < rel * expected


@pytest.mark.parametrize("init", ["paper", "paper-finetuning"])
def test_surgery_drops_and_redraws_by_their_laws(tmp_path, init):
    cfg, state, _ = source(tmp_path, "palimpsa", hidden_size=64, num_heads=4, head_dim=16, expand_v=1,
                           num_hidden_layers=2, ip_log=True)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--init", init, "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    r = math.ceil(64 / 16)
    for i, layer in enumerate(model.backbone.layers):
        mixer, a = layer.mixer, f"model.layers.{i}.attn."
        imp = mixer.importance
        assert imp.gamma is None and imp.W_b2.bias is None and imp.W_b1.out_features == r
        # kept: every key their surgery does not drop
        for ours, theirs in (("q_proj.weight", "q_proj.weight"), ("a_proj.weight", "dt_proj.weight"),
                             ("A_log", "A_log"), ("D", "D"), ("o_proj.weight", "o_proj.weight")):
            assert torch.equal(mixer.state_dict()[ours], state[a + theirs]), ours
        assert torch.equal(layer.mlp.up_proj.weight.detach(), state[f"model.layers.{i}.mlp.up_proj.weight"])
        # dropped and drawn again
        assert torch.equal(imp.Ip_log, torch.zeros(4)) and not torch.equal(imp.Ip_log, state[a + "Ip_log"])
        b_scale = imp.b_scale.detach()
        if init == "paper":
            assert torch.equal(b_scale, torch.ones(4))  # raw 1.0 (softplus 1.313)
        else:
            assert bool(((b_scale >= 0.1) & (b_scale <= 1.0)).all()) and b_scale.unique().numel() == 4
        w2, bound = imp.W_b2.weight.detach(), r ** -0.5  # U(±r^{-1/2}): 64·4 draws
        assert w2.abs().max() <= bound and w2.abs().max() > 0.9 * bound and _std_close(w2, bound / math.sqrt(3))
        assert _std_close(imp.W_b1.weight.detach(), 0.02)  # N(0, 0.02²), 4·64 draws
        assert _std_close(mixer.bs_proj.weight.detach(), 0.02) and abs(mixer.bs_proj.weight.mean()) < 0.005
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_surgery_of_a_plain_meta_mamba2_with_a_new_rank(tmp_path, capsys):
    cfg, state, oracle = source(tmp_path, "meta_mamba2", metaplasticity=False)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert "Infinity" in (tmp_path / "src" / "config.json").read_text()
    assert main(["convert", src, dst, "--verify", "--no-progress"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert all(torch.equal(layer.mixer.importance.gamma.detach(), torch.zeros(4)) for layer in model.backbone.layers)
    assert main(["convert", src, dst, "--init", "paper", "--rank", "3", "--force", "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst)
    imp = model.backbone.layers[0].mixer.importance
    assert imp.gamma is None and imp.W_b1.out_features == 3 and torch.equal(imp.b_scale.detach(), torch.ones(4))
    assert model.config.mixer_kwargs["norm_per_group"] is False
    assert relative_error(logits(model, IDS), oracle(cfg, state, IDS)) > 1e-3  # b ≠ 0: not output-preserving


BAD = {  # name -> (kind, config overrides, weight edit, words of the one-line message)
    "hybrid attention": ("palimpsa", dict(attn={"layers": [1], "num_heads": 2}), None, "attn="),
    "l2 warp": ("meta_mamba2", dict(use_l2warp=True), None, "use_l2warp"),
    "mlp activation": ("palimpsa", dict(hidden_act="gelu"), None, "hidden_act"),
    "missing key": ("palimpsa", {}, lambda s: s.pop("model.layers.1.attn.b_scale"),
                    "missing key 'model.layers.1.attn.b_scale'"),
    "unexpected key": ("meta_mamba2", {}, lambda s: s.update({"backbone.layers.0.mixer.b_proj.bias": torch.zeros(32)}),
                       "unexpected key 'backbone.layers.0.mixer.b_proj.bias'"),
    "shape mismatch": ("palimpsa", dict(intermediate_size=64), None, "shape mismatch"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsupported_checkpoints_exit_2_naming_the_problem(case, tmp_path, capsys):
    kind, overrides, edit, words = BAD[case]
    cfg = palimpsa_config() if kind == "palimpsa" else meta_mamba2_config()
    state = random_weights(palimpsa_shapes(cfg) if kind == "palimpsa" else meta_mamba2_shapes(cfg), seed=1)
    if edit is not None:
        edit(state)
    write_authors(tmp_path / "src", {**cfg, **overrides}, state)
    dst = tmp_path / "out" / "dst"
    assert main(["convert", str(tmp_path / "src"), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("metaplastic convert: error:") and words in err, err
    assert not dst.exists()


def test_identity_keeps_the_rank(tmp_path, capsys):
    source(tmp_path, "palimpsa")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--rank", "5", "--no-progress"]) == 2
    assert "--rank 5 differs from the checkpoint's importance rank 2" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the kernels' Triton paths)")
@pytest.mark.parametrize("case", ["palimpsa tied safetensors", "meta_mamba2 untied bin, biases, dt limit"])
def test_converted_model_on_gpu_equals_the_oracle(tmp_path, case, ieee_fp32):
    """The kernels' Triton scan on the authors' layers, in IEEE float32 (no TF32), against the float64 oracle
    on the CPU: float32 rounding summed over 80 tokens and two layers stays near 1e-6 relative."""
    kind, fmt, overrides = CASES[case]
    cfg, state, oracle = source(tmp_path, kind, fmt, ip_log=True, **overrides)
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(3))  # beyond one chunk
    with torch.no_grad():
        got = model(ids.cuda()).logits.float().cpu()
    assert_close(got, oracle(cfg, state, ids), rtol=1e-5)


def test_converted_authors_model_fine_tunes(tmp_path):
    """`metaplastic finetune --train metaplastic` on a converted Palimpsa checkpoint (their layer, no γ): only
    the importance path moves, and the loss on the (periodic) training stream falls."""
    import numpy as np
    source(tmp_path, "palimpsa", seed=4)
    convert_checkpoint(tmp_path / "src", tmp_path / "model", progress=False)
    (tmp_path / "model" / "tokenizer.json").unlink()  # the fake tokenizer is no tokenizer for the export
    stream = np.tile(np.arange(VOCAB, dtype=np.int64), 12)
    np.save(tmp_path / "tokens.npy", stream)
    assert main(["finetune", "--model", str(tmp_path / "model"), "--data", str(tmp_path / "tokens.npy"),
                 "--out", str(tmp_path / "run"), "--train", "metaplastic", "--steps", "8", "--seq-len", "16",
                 "--global-batch", "4", "--micro-batch", "2", "--lr", "3e-2", "--warmup", "1"]) == 0
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    w = "backbone.layers.0.mixer.importance.W_b2.weight"
    assert not torch.equal(tuned.state_dict()[w], before.state_dict()[w])  # the metaplastic path trained
    q = "backbone.layers.0.mixer.q_proj.weight"
    assert torch.equal(tuned.state_dict()[q], before.state_dict()[q])  # --train metaplastic: the rest is frozen
    ids = torch.from_numpy(stream[: 4 * 33].reshape(4, 33))
    with torch.no_grad():
        loss_before, loss_after = before(ids, labels=ids).loss.item(), tuned(ids, labels=ids).loss.item()
    assert math.isfinite(loss_after) and loss_after < loss_before, (loss_before, loss_after)
