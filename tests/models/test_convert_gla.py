"""`metaplastic convert` on Gated Linear Attention checkpoints in fla's format.

The checkpoint is written by fla's own ``GLAForCausalLM`` (it instantiates on a CPU; its forward does not).
The expected logits are built here from code nobody here wrote: fla's naive recurrence
(``naive_recurrent_gla``, scale K^-1/2), fla's pure-torch norms (``rms_norm_ref``, the gated one with
``norm_before_gate=True`` for ``FusedRMSNormGated``), plus the layer's documented maths (fla/layers/gla.py):
depthwise causal short convolutions with SiLU, ``gk = logsigmoid(W2 W1 h) / 16`` clamped below at ``clamp_min``,
key / value / decay heads shared by ``num_heads / num_kv_heads`` query heads (head j reads j // groups), the
feature map on q and k, the output norm then the swish gate, and a SwiGLU MLP.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from metaplastic.cli import main
from metaplastic.oracles import relative_error

pytest.importorskip("transformers")
fla_models = pytest.importorskip("fla.models")
from fla.modules.norm.layernorm import rms_norm_ref  # noqa: E402
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from metaplastic import MetaplasticForCausalLM, convert_checkpoint  # noqa: E402
from metaplastic.models.convert import open_checkpoint, point_model  # noqa: E402

from helpers import assert_close, copy_dir, edit_config, edit_weights, tiny_gla  # noqa: E402

VOCAB = 37
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
FEATURE_MAPS = {"relu": F.relu, "sqrelu": lambda x: F.relu(x) ** 2}  # fla's ACT2FN entries used below

CASES = {  # fla GLAConfig options on top of tiny_gla's
    "tied_default": dict(tie=True),
    "untied_kv_heads_conv_relu_clamped": dict(tie=False, num_heads=4, num_kv_heads=2, expand_k=1.0,
                                              use_short_conv=True, feature_map="relu", clamp_min=-0.1),
    "unfused_norm_sqrelu": dict(tie=True, fuse_norm=False, expand_v=2.0, feature_map="sqrelu"),
    "no_output_gate_mlp_ratio": dict(tie=False, use_output_gate=False, intermediate_size=None, hidden_ratio=2),
}


def write_fla(model, path):
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"tiny": true}')
    return path


def short_conv(x, weight):
    """Depthwise causal convolution over time, then SiLU: ``x [B, T, C]``, ``weight [C, 1, W]``."""
    T = x.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight, padding=weight.shape[-1] - 1, groups=x.shape[-1])[..., :T]
    return F.silu(y).transpose(1, 2)


@torch.no_grad()
def reference_logits(model, ids):
    """fla's GLA LM, from its state dict and config, with the pure-torch pieces named above."""
    cfg, sd = model.config, model.state_dict()
    H = cfg.num_heads
    Hkv = cfg.num_kv_heads or H
    K, V = int(cfg.hidden_size * cfg.expand_k) // H, int(cfg.hidden_size * cfg.expand_v) // H
    eps = cfg.norm_eps
    x = sd["model.embeddings.weight"][ids]
    B, T, _ = x.shape
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = lambda name: sd[p + "attn." + name]  # noqa: E731
        h = rms_norm_ref(x, sd[p + "attn_norm.weight"], None, eps=eps)

        def proj(name):
            y = h @ a(f"{name}_proj.weight").T
            return short_conv(y, a(f"{name}_conv1d.weight")) if cfg.use_short_conv else y

        q = proj("q").view(B, T, H, K)
        k = proj("k").view(B, T, Hkv, K).repeat_interleave(H // Hkv, 2)
        v = proj("v").view(B, T, Hkv, V).repeat_interleave(H // Hkv, 2)
        gk = (h @ a("gk_proj.0.weight").T) @ a("gk_proj.1.weight").T + a("gk_proj.1.bias")
        gk = (F.logsigmoid(gk) / 16).view(B, T, Hkv, K).repeat_interleave(H // Hkv, 2)
        if cfg.clamp_min is not None:
            gk = gk.clamp_min(cfg.clamp_min)
        if cfg.feature_map is not None:
            q, k = FEATURE_MAPS[cfg.feature_map](q), FEATURE_MAPS[cfg.feature_map](k)
        o, _ = naive_recurrent_gla(q, k, v, gk)
        if cfg.use_output_gate:  # norm, then the swish gate (fused or not: the same maths)
            gate = (h @ a("g_proj.weight").T).view(B, T, H, V)
            weight = a("g_norm_swish_gate.weight" if cfg.fuse_norm else "g_norm.weight")
            o = gated_rms_norm_ref(o, weight, None, z=gate, eps=eps, norm_before_gate=True)
        else:
            o = rms_norm_ref(o, a("g_norm.weight"), None, eps=eps)
        x = x + o.reshape(B, T, H * V) @ a("o_proj.weight").T
        m = rms_norm_ref(x, sd[p + "mlp_norm.weight"], None, eps=eps)
        m = F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
        x = x + m @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm_ref(x, sd["model.norm.weight"], None, eps=eps)
    head = sd["model.embeddings.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return (x @ head.T).float()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def greedy_reference(source, prompt, steps):
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, reference_logits(source, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("case", list(CASES))
def test_fla_gla_checkpoint_converts_and_reproduces_the_reference(tmp_path, case):
    source = tiny_gla(**CASES[case])
    write_fla(source, tmp_path / "src")
    ref = reference_logits(source, IDS)
    assert ref.abs().max() > 1.0  # the logits are not trivially small
    lines = []
    result = convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False, verify=True, log=lines.append)
    assert result.source_format == "fla" and result.architecture == "GLA" and len(lines) == 3
    assert max(result.max_abs_diff, result.max_abs_diff_reloaded) <= 1e-5 * ref.abs().max()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert isinstance(model, MetaplasticForCausalLM) and model.config.mixer == "meta_gla"
    assert model.config.tie_word_embeddings == CASES[case]["tie"]
    assert model.config.intermediate_size == source.model.layers[0].mlp.intermediate_size  # fla's GatedMLP width
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"tiny": true}'
    # float32 everywhere; 11 tokens, 2 layers: accumulation error is a few 1e-7 of the largest logit
    assert_close(logits(model, IDS), ref, rtol=1e-5, msg=case)
    # at γ = 0 the twin is our point-posterior gla LM holding the same weights, up to float64 rounding
    point = point_model(open_checkpoint(tmp_path / "src")).double()
    assert point.config.mixer == "gla"
    assert_close(logits(model.double(), IDS), logits(point, IDS), rtol=1e-12, msg=f"{case}: meta_gla γ=0 vs gla")
    # greedy decoding through the cache equals the reference's greedy continuation
    prompt = IDS[:, :4]
    cached = model.float().generate(prompt, max_new_tokens=6, do_sample=False)
    assert cached.tolist() == greedy_reference(source, prompt, 6).tolist()


def test_gla_importance_groups_paper_init_and_cli(tmp_path, capsys):
    source = tiny_gla(seed=2, tie=False, num_heads=4, num_kv_heads=2, use_short_conv=True)
    write_fla(source, tmp_path / "src")
    ref = reference_logits(source, IDS)
    dst = tmp_path / "dst"
    assert main(["convert", str(tmp_path / "src"), str(dst), "--verify", "--no-progress", "--rank", "3",
                 "--importance-groups", "2"]) == 0
    out = capsys.readouterr().out
    assert "GLA, fla format" in out and "verify: OK" in out, out
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.mixer_kwargs["importance_rank"] == 3 and model.config.importance_groups == 2
    assert all(layer.mixer.importance.groups == 2 for layer in model.backbone.layers)
    assert_close(logits(model, IDS), ref, rtol=1e-5, msg="--importance-groups 2")
    # a G that does not divide the head's value width (4) is refused before anything is written
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "g3"), "--importance-groups", "3",
                 "--no-progress"]) == 2
    assert "--importance-groups 3" in capsys.readouterr().err and not (tmp_path / "g3").exists()
    for init in ("paper", "paper-finetuning"):
        assert main(["convert", str(tmp_path / "src"), str(dst), "--init", init, "--force", "--no-progress"]) == 0
        model = AutoModelForCausalLM.from_pretrained(dst)
        assert all(torch.all(layer.mixer.importance.gamma == 1) for layer in model.backbone.layers)
        assert relative_error(logits(model, IDS), ref) > 1e-3
    scales = model.backbone.layers[0].mixer.importance.b_scale
    assert scales.min() < scales.max()  # paper-finetuning draws b_scale
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


BAD = {  # name -> (mutation of the source directory, words the one-line message must contain)
    "hybrid attention": (lambda p: edit_config(p, attn={"layers": [1], "num_heads": 2}), "hybrid attention"),
    "attention residuals": (lambda p: edit_config(p, attnres_block_size=2), "attnres_block_size=2"),
    "feature map": (lambda p: edit_config(p, feature_map="gelu"), "feature_map='gelu'"),
    "hidden_act": (lambda p: edit_config(p, hidden_act="powlu"), "hidden_act='powlu'"),
    "no norm weight": (lambda p: edit_config(p, elementwise_affine=False), "elementwise_affine=False"),
    "attn_mode": (lambda p: edit_config(p, attn_mode="parallel"), "attn_mode='parallel'"),
    "positive clamp": (lambda p: edit_config(p, clamp_min=0.5), "clamp_min=0.5"),
    "bad kv heads": (lambda p: edit_config(p, num_kv_heads=3), "num_kv_heads=3"),
    "bad expand_k": (lambda p: edit_config(p, expand_k=0.3), "expand_k"),
    "fuse_norm renames the norm": (lambda p: edit_config(p, fuse_norm=False),
                                   "missing key 'model.layers.0.attn.g_norm.weight'"),
    "missing key": (lambda p: edit_weights(p, lambda s: s.pop("model.layers.1.attn.gk_proj.1.bias")),
                    "missing key 'model.layers.1.attn.gk_proj.1.bias'"),
    "shape mismatch": (lambda p: edit_config(p, expand_v=2.0), "shape mismatch"),
    "tied head differs": (lambda p: edit_weights(p, lambda s: s.update({"lm_head.weight": torch.zeros(VOCAB, 16)})),
                          "lm_head.weight differs"),
}


@pytest.fixture(scope="module")
def gla_src(tmp_path_factory):
    return write_fla(tiny_gla(), tmp_path_factory.mktemp("gla") / "src")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gla_input_exit_code_2_and_no_dst(case, gla_src, tmp_path, capsys):
    mutate, words = BAD[case]
    src = copy_dir(gla_src, tmp_path / "src")
    mutate(src)
    dst = tmp_path / "out" / "dst"
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("metaplastic convert: error:") and words in err, err
    assert case == "tied head differs" or "GLA checkpoint:" in err, err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's model runs only on a GPU (Triton)")
@pytest.mark.parametrize("case", ["tied_default", "untied_kv_heads_conv_relu_clamped"])
def test_fla_gla_model_on_gpu_equals_the_oracle_and_the_converted_model(tmp_path, case, ieee_fp32):
    """fla's own GLAForCausalLM (its kernels, fused norms and convolutions) against the oracle built above and
    against the converted model: 1e-3 against fla (its float32 tl.dot runs in TF32), 1e-5 between the
    converted model (IEEE float32, ``ieee_fp32``) and the float32 oracle."""
    source = tiny_gla(seed=5, **CASES[case])
    write_fla(source, tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    fla_model = fla_models.GLAForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).cuda().eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).cuda().eval()
    ref = reference_logits(source, IDS)
    with torch.no_grad():
        got_fla = fla_model(IDS.cuda()).logits.float().cpu()
        got_ours = ours(IDS.cuda()).logits.float().cpu()
    assert_close(got_fla, ref, rtol=1e-3)
    assert_close(got_ours, got_fla, rtol=1e-3)
    assert_close(got_ours, ref, rtol=1e-5)
