"""GLA and MetaGLA: fla's parameter names; the layer against fla's layer maths written out here around fla's
``naive_recurrent_gla``; the twin at γ = 0; grouped importance with per-key decay against the reference scan;
on a GPU, against fla's ``GatedLinearAttention`` itself."""
import pytest
import torch
import torch.nn.functional as F

from metaplastic import MetaplasticConfig, MetaplasticForCausalLM, build_mixer, to_metaplastic
from metaplastic.oracles import relative_error

from helpers import assert_close

fla_layers = pytest.importorskip("fla.layers")
naive = pytest.importorskip("fla.ops.gla.naive")

CASES = {  # fla GatedLinearAttention options (hidden_size 16)
    "default": dict(num_heads=2),
    "conv_kv_heads_relu": dict(num_heads=4, num_kv_heads=2, use_short_conv=True, feature_map="relu", expand_k=1.0),
    "no_gate_clamped": dict(num_heads=2, use_output_gate=False, clamp_min=-0.05, gate_logit_normalizer=4),
    "unfused_norm": dict(num_heads=2, fuse_norm=False, expand_v=2.0),
}


@torch.no_grad()
def perturb(module, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def fla_pair(case, seed=0):
    """fla's layer (random weights, perturbed so that every norm weight differs from 1) and our ``gla`` holding
    its state dict (loaded strictly)."""
    torch.manual_seed(seed)
    ref = fla_layers.GatedLinearAttention(hidden_size=16, **CASES[case])
    perturb(ref, seed + 1)
    ours = build_mixer("gla", 16, **CASES[case])
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def fla_maths(state, opts, h):
    """fla's ``GatedLinearAttention.forward`` (fla/layers/gla.py) written out with torch and fla's
    ``naive_recurrent_gla``, from the layer's state dict."""
    H = opts.get("num_heads", 4)
    Hkv = opts.get("num_kv_heads") or H
    D = h.shape[-1]
    K, V = int(D * opts.get("expand_k", 0.5)) // H, int(D * opts.get("expand_v", 1.0)) // H

    def proj(name):
        x = h @ state[f"{name}_proj.weight"].T
        if opts.get("use_short_conv"):  # depthwise causal conv of width W, then SiLU
            w = state[f"{name}_conv1d.weight"]
            x = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (w.shape[-1] - 1, 0)), w, groups=x.shape[-1]).transpose(1, 2))
        return x

    q, k, v = proj("q"), proj("k"), proj("v")
    gk = (h @ state["gk_proj.0.weight"].T) @ state["gk_proj.1.weight"].T + state["gk_proj.1.bias"]
    B, T = h.shape[:2]
    q = q.view(B, T, H, K)
    k = k.view(B, T, Hkv, K).repeat_interleave(H // Hkv, 2)
    v = v.view(B, T, Hkv, V).repeat_interleave(H // Hkv, 2)
    gk = (F.logsigmoid(gk) / opts.get("gate_logit_normalizer", 16)).view(B, T, Hkv, K).repeat_interleave(H // Hkv, 2)
    if opts.get("clamp_min") is not None:
        gk = gk.clamp_min(opts["clamp_min"])
    if opts.get("feature_map") == "relu":
        q, k = F.relu(q), F.relu(k)
    o, _ = naive.naive_recurrent_gla(q, k, v, gk)
    norm_key = "g_norm_swish_gate.weight" if opts.get("use_output_gate", True) and opts.get("fuse_norm", True) \
        else "g_norm.weight"
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * state[norm_key]
    if opts.get("use_output_gate", True):
        o = o * F.silu((h @ state["g_proj.weight"].T).view(B, T, H, V))
    return o.reshape(B, T, H * V) @ state["o_proj.weight"].T


@pytest.mark.parametrize("case", list(CASES))
def test_gla_loads_fla_state_dicts_and_equals_fla_layer_maths(case):
    ref, ours = fla_pair(case)
    h = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = fla_maths(ref.state_dict(), CASES[case], h)
        got = ours(h)
    assert_close(got, expected, rtol=1e-5, msg=case)


@pytest.mark.parametrize("case", ["default", "conv_kv_heads_relu"])
def test_meta_gla_at_gamma_zero_is_gla_and_opens_with_gamma(case):
    gla = fla_pair(case)[1].double()
    twin = to_metaplastic(gla, rank=3)
    assert twin.registry_name == "meta_gla" and twin.importance.groups == twin.head_v_dim
    h = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = twin(h)
    # b ≡ 0 and Ip = 1: the diagonal path (M / I with I = 1) and the point path differ by float64 rounding only
    assert_close(out, gla(h), rtol=1e-12, msg="meta_gla at γ = 0 vs gla")
    (out * torch.randn_like(out)).sum().backward()
    assert twin.importance.gamma.grad.abs().max() > 0
    with torch.no_grad():
        twin.importance.gamma.fill_(1.0)
    assert relative_error(twin(h).detach(), gla(h).detach()) > 1e-4


def open_importance(mixer):
    with torch.no_grad():
        mixer.importance.gamma.fill_(1.0)
        mixer.importance.b_scale.fill_(3.0)
        mixer.importance.W_b2.weight.normal_(0, 1.0)
        mixer.importance.W_b2.bias.normal_(0, 1.0)
    return mixer


@pytest.mark.parametrize("G", [1, 2])
def test_grouped_meta_gla_equals_the_reference_scan_with_b_expanded(G, monkeypatch):
    """The grouped path with per-key decay (the mixer's own scan) against the reference scan given b per value
    row, each group's rate repeated over its rows (docs/theory.md#limit-8-grouped-importance), float64."""
    import metaplastic.models.gla as gla_module
    from metaplastic.kernels.dispatch import scan
    torch.manual_seed(0)
    mixer = open_importance(build_mixer("meta_gla", 16, num_heads=2, expand_k=1.0, importance_rank=3,
                                        importance_groups=G)).double()
    V = mixer.head_v_dim
    h = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        fast = mixer(h)
    calls = []

    def reference(objective, q, k, v, **kw):
        assert kw["b"].shape[-1] == G and kw["log_decay"].shape == q.shape  # grouped b, one decay per key
        calls.append(G)
        kw = dict(kw, backend="reference", b=kw["b"].repeat_interleave(V // G, -1))
        return scan(objective, q, k, v, **kw)

    monkeypatch.setattr(gla_module, "scan", reference)
    with torch.no_grad():
        slow = mixer(h)
    assert calls == [G]
    assert_close(fast, slow, rtol=1e-10, msg=f"G={G}")


def test_groups_not_dividing_the_value_width_are_refused_by_name():
    with pytest.raises(ValueError, match=r"importance_groups=3 .*head_v_dim=8"):
        build_mixer("meta_gla", 16, num_heads=2, importance_groups=3)
    with pytest.raises(ValueError, match="feature_map='tanh'"):
        build_mixer("gla", 16, feature_map="tanh")
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        build_mixer("gla", 16, num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("groups", [None])  # G = 2: tests/models/test_grouped_importance_models.py
def test_meta_gla_generate_with_cache_equals_full_forward(groups):
    cfg = MetaplasticConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, mixer="meta_gla",
                            mixer_kwargs=dict(num_heads=2, use_short_conv=True, importance_rank=3),
                            importance_groups=groups, intermediate_size=24)
    torch.manual_seed(2)
    model = MetaplasticForCausalLM(cfg).double().eval()
    for layer in model.backbone.layers:
        open_importance(layer.mixer)
        assert layer.mixer.importance.groups == (groups or layer.mixer.head_v_dim)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
        full = model(out, use_cache=False).logits
        cached = model(out[:, :6], use_cache=True)
        steps = [cached.logits]
        for t in range(6, out.shape[1]):
            cached = model(out[:, t:t + 1], cache=cached.cache, use_cache=True)
            steps.append(cached.logits)
    assert torch.equal(out[:, 6:], full[:, 5:-1].argmax(-1))
    assert_close(torch.cat(steps, 1), full, rtol=1e-5, msg="cached vs full logits")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's layers need a GPU (Triton)")
@pytest.mark.parametrize("case", ["default", "conv_kv_heads_relu"])
@pytest.mark.parametrize("T", [32, 96])  # fla runs fused_recurrent at T ≤ 64, chunk above
def test_gla_equals_fla_layer_on_gpu(case, T, ieee_fp32):
    ref, ours = fla_pair(case)
    ref, ours = ref.cuda().eval(), ours.cuda().eval()
    h = torch.randn(2, T, 16, device="cuda")
    with torch.no_grad():
        expected = ref(h)[0].float()
        got = ours(h).float()
    # fla's chunked kernels use TF32 in tl.dot on float32 (rounding at 2^-11): 1e-3, as for Gated DeltaNet
    assert_close(got, expected, rtol=1e-3)
