"""`metaplastic convert` on Gated DeltaNet checkpoints in fla's format.

The checkpoint is written by fla's own ``GatedDeltaNetForCausalLM`` (it instantiates on a CPU; its forward
does not). The expected logits are built here from code nobody here wrote: fla's naive recurrence
(``naive_recurrent_gated_delta_rule``), fla's pure-torch norms (``rms_norm_ref``, the gated one with
``norm_before_gate=True``), transformers' ``l2norm`` (written to match fla's kernel), plus the layer's
documented projections: depthwise causal short convolutions with SiLU, ``β = σ(b_proj h)``,
``g = −exp(A_log)·softplus(a_proj h + dt_bias)``, grouped value heads reading q/k head ``j // (HV/H)``,
and a SwiGLU MLP.
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
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import l2norm  # noqa: E402

from metaplastic import MetaplasticForCausalLM, convert_checkpoint  # noqa: E402

from helpers import assert_close, copy_dir, edit_config, edit_weights, tiny_gated_deltanet  # noqa: E402

VOCAB = 37
IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


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
    """fla's Gated DeltaNet LM, from its state dict and config, with the pure-torch pieces named above."""
    cfg, sd = model.config, model.state_dict()
    H, K = cfg.num_heads, cfg.head_dim
    HV = cfg.num_v_heads or H
    V = int(K * cfg.expand_v)
    eps = cfg.norm_eps
    x = sd["model.embeddings.weight"][ids]
    B, T, _ = x.shape
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = lambda name: sd[p + "attn." + name]  # noqa: E731
        h = rms_norm_ref(x, sd[p + "attn_norm.weight"], None, eps=eps)
        q = short_conv(h @ a("q_proj.weight").T, a("q_conv1d.weight")).view(B, T, H, K)
        k = short_conv(h @ a("k_proj.weight").T, a("k_conv1d.weight")).view(B, T, H, K)
        v = short_conv(h @ a("v_proj.weight").T, a("v_conv1d.weight")).view(B, T, HV, V)
        q, k = l2norm(q).repeat_interleave(HV // H, 2), l2norm(k).repeat_interleave(HV // H, 2)
        beta = torch.sigmoid(h @ a("b_proj.weight").T)
        g = -a("A_log").exp() * F.softplus(h @ a("a_proj.weight").T + a("dt_bias"))
        o, _ = naive_recurrent_gated_delta_rule(q, k, v, beta, g)  # argument order (beta, g); scale K^-1/2
        if cfg.use_gate:  # FusedRMSNormGated: norm, then the swish gate
            gate = (h @ a("g_proj.weight").T).view(B, T, HV, V)
            o = gated_rms_norm_ref(o, a("o_norm.weight"), None, z=gate, eps=eps, norm_before_gate=True)
        else:
            o = rms_norm_ref(o, a("o_norm.weight"), None, eps=eps)
        x = x + o.reshape(B, T, HV * V) @ a("o_proj.weight").T
        m = rms_norm_ref(x, sd[p + "mlp_norm.weight"], None, eps=eps)
        m = F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T)
        x = x + m @ sd[p + "mlp.down_proj.weight"].T
    x = rms_norm_ref(x, sd["model.norm.weight"], None, eps=eps)
    head = sd["model.embeddings.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return (x @ head.T).float()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("tie,num_v_heads,use_gate", [(True, None, True), (False, 4, True), (True, None, False)])
def test_fla_gdn_checkpoint_converts_and_reproduces_the_reference(tmp_path, tie, num_v_heads, use_gate):
    source = tiny_gated_deltanet(tie=tie, num_v_heads=num_v_heads, use_gate=use_gate)
    write_fla(source, tmp_path / "src")
    ref = reference_logits(source, IDS)
    lines = []
    result = convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False, verify=True, log=lines.append)
    assert result.source_format == "fla" and result.architecture == "Gated DeltaNet"
    assert max(result.max_abs_diff, result.max_abs_diff_reloaded) <= 1e-5 and len(lines) == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dst")
    assert isinstance(model, MetaplasticForCausalLM)
    assert model.config.mixer == "meta_gated_deltanet" and model.config.intermediate_size == 24
    assert model.config.tie_word_embeddings == tie
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"tiny": true}'
    # float32 everywhere; 11 tokens, 2 layers: accumulation error is a few 1e-7 of the largest logit
    got = logits(model, IDS)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (got - ref).abs().max()
    assert ref.abs().max() > 1.0  # the logits are not trivially small
    # greedy decoding through the cache equals greedy decoding by full forwards
    prompt = IDS[:, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    full = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == full.tolist()
    # ... and equals the reference's greedy continuation
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, reference_logits(source, seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert cached.tolist() == seq.tolist()


def test_gdn_paper_init_and_cli(tmp_path, capsys):
    source = tiny_gated_deltanet(seed=2)
    write_fla(source, tmp_path / "src")
    dst = tmp_path / "dst"
    assert main(["convert", str(tmp_path / "src"), str(dst), "--verify", "--no-progress", "--rank", "3"]) == 0
    out = capsys.readouterr().out
    assert "Gated DeltaNet, fla format" in out and "verify: OK" in out, out
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert model.config.mixer_kwargs["importance_rank"] == 3
    assert main(["convert", str(tmp_path / "src"), str(dst), "--init", "paper", "--force", "--no-progress"]) == 0
    model = AutoModelForCausalLM.from_pretrained(dst)
    assert all(torch.all(layer.mixer.importance.gamma == 1) for layer in model.backbone.layers)
    assert relative_error(logits(model, IDS), reference_logits(source, IDS)) > 1e-3
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


BAD = {  # name -> (mutation of the source directory, words the one-line message must contain)
    "hybrid attention": (lambda p: edit_config(p, attn={"layers": [1], "num_heads": 2}), "hybrid attention"),
    "negative eigenvalues": (lambda p: edit_config(p, allow_neg_eigval=True), "allow_neg_eigval"),
    "sigmoid gate": (lambda p: edit_config(p, output_gate_activation="sigmoid"), "output_gate_activation"),
    "no short conv": (lambda p: edit_config(p, use_short_conv=False), "use_short_conv"),
    "bad value heads": (lambda p: edit_config(p, num_v_heads=3), "num_v_heads=3"),
    "bad expand_v": (lambda p: edit_config(p, expand_v=1.3), "expand_v"),
    "missing key": (lambda p: edit_weights(p, lambda s: s.pop("model.layers.1.attn.dt_bias")),
                    "missing key 'model.layers.1.attn.dt_bias'"),
    "unexpected key": (lambda p: edit_weights(p, lambda s: s.update(extra=torch.zeros(2))), "unexpected key 'extra'"),
    "shape mismatch": (lambda p: edit_config(p, intermediate_size=32), "shape mismatch"),
    "tied head differs": (lambda p: edit_weights(p, lambda s: s.update({"lm_head.weight": torch.zeros(VOCAB, 16)})),
                          "lm_head.weight differs"),
    "mesanet": (lambda p: edit_config(p, model_type="mesa_net"), "MesaNet"),
}


@pytest.fixture(scope="module")
def gdn_src(tmp_path_factory):
    return write_fla(tiny_gated_deltanet(), tmp_path_factory.mktemp("gdn") / "src")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gdn_input_exit_code_2_and_no_dst(case, gdn_src, tmp_path, capsys):
    mutate, words = BAD[case]
    src = copy_dir(gdn_src, tmp_path / "src")
    mutate(src)
    dst = tmp_path / "out" / "dst"
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("metaplastic convert: error:") and words in err, err
    assert not dst.exists()
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's model runs only on a GPU (Triton)")
def test_fla_model_on_gpu_equals_the_oracle_and_the_converted_model(tmp_path, ieee_fp32):
    """fla's own GatedDeltaNetForCausalLM (its kernels, fused norms and convolutions) against the oracle built
    above and against the converted model. fla's chunked kernels call tl.dot on float32 without an input
    precision, which Triton runs in TF32 (rounding at 2^-11 = 4.9e-4), hence 1e-3 against fla; the converted
    model computes in IEEE float32 (``ieee_fp32``), hence 1e-5 against the float32 oracle."""
    source = tiny_gated_deltanet(tie=False, num_v_heads=4, seed=5)
    write_fla(source, tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", progress=False)
    fla_model = fla_models.GatedDeltaNetForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).cuda().eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32).cuda().eval()
    ref = reference_logits(source, IDS)
    with torch.no_grad():
        got_fla = fla_model(IDS.cuda()).logits.float().cpu()
        got_ours = ours(IDS.cuda()).logits.float().cpu()
    assert_close(got_fla, ref, rtol=1e-3)
    assert_close(got_ours, got_fla, rtol=1e-3)
    assert_close(got_ours, ref, rtol=1e-5)
