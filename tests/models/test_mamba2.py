"""Mamba2 / MetaMamba2 against transformers' Mamba2 (nobody here wrote it), on random tiny models."""

import pytest
import torch

from metaplastic import MetaplasticConfig, MetaplasticForCausalLM, build_mixer, to_metaplastic
from metaplastic.oracles import relative_error

transformers = pytest.importorskip("transformers")
from transformers import Mamba2ForCausalLM  # noqa: E402
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402

from helpers import assert_close, mamba2_config, perturb_, skip_unless_grouped  # noqa: E402

CONFIGS = [  # (hidden, heads, head_dim, state, groups, conv, use_bias, conv_bias, time_step_limit)
    dict(hidden_size=16, num_heads=4, head_dim=8, state_size=8, n_groups=1, conv_kernel=4),
    dict(hidden_size=16, num_heads=4, head_dim=8, state_size=6, n_groups=2, conv_kernel=3, use_bias=True),
    dict(hidden_size=12, num_heads=6, head_dim=4, state_size=5, n_groups=3, conv_kernel=4, use_conv_bias=False,
         time_step_limit=(0.02, 0.3)),
]


def mixer_kwargs(cfg):
    return dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim, state_size=cfg.state_size, expand=cfg.expand,
                n_groups=cfg.n_groups, conv_kernel=cfg.conv_kernel, use_bias=cfg.use_bias,
                use_conv_bias=cfg.use_conv_bias, time_step_limit=list(cfg.time_step_limit),
                layer_norm_epsilon=cfg.layer_norm_epsilon)


def our_config(cfg, mixer="mamba2"):
    return MetaplasticConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             num_hidden_layers=cfg.num_hidden_layers, mixer=mixer, mixer_kwargs=mixer_kwargs(cfg),
                             layer_norm_epsilon=cfg.layer_norm_epsilon, residual_in_fp32=cfg.residual_in_fp32,
                             tie_word_embeddings=cfg.tie_word_embeddings)


@pytest.mark.parametrize("kw", CONFIGS)
def test_mixer_equals_transformers_mamba2_mixer(kw):
    cfg = mamba2_config(tie_word_embeddings=False, **kw)
    skip_unless_grouped(cfg.n_groups)
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    perturb_(ref)
    ours = build_mixer("mamba2", cfg.hidden_size, **mixer_kwargs(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    h = torch.randn(2, 11, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(h), ref(h), rtol=1e-5)


@pytest.mark.parametrize("kw,tie,vocab", [(CONFIGS[0], True, 37), (CONFIGS[1], False, 50), (CONFIGS[2], True, 29)])
def test_lm_logits_equal_transformers(kw, tie, vocab):
    cfg = mamba2_config(vocab_size=vocab, tie_word_embeddings=tie, **kw)
    skip_unless_grouped(cfg.n_groups)
    torch.manual_seed(0)
    ref = Mamba2ForCausalLM(cfg).eval()
    perturb_(ref)
    ours = MetaplasticForCausalLM(our_config(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    if tie:
        assert ours.lm_head.weight.data_ptr() == ours.backbone.embeddings.weight.data_ptr()
    ids = torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
    assert a.shape == (2, 13, vocab)
    assert_close(a, b, rtol=1e-5)


def test_greedy_generate_cache_equals_full_forwards_and_transformers():
    cfg = mamba2_config(vocab_size=41, tie_word_embeddings=True, **CONFIGS[1])
    skip_unless_grouped(cfg.n_groups)
    torch.manual_seed(0)
    ref = Mamba2ForCausalLM(cfg).eval()
    perturb_(ref, seed=3)
    ours = MetaplasticForCausalLM(our_config(cfg)).eval()
    ours.load_state_dict(ref.state_dict())
    prompt = torch.randint(0, 41, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = ours.generate(prompt, max_new_tokens=8, do_sample=False)
    full = ours.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    # by hand: append the argmax of a full forward pass each time
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            ids = torch.cat([ids, ours(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cached.tolist() == full.tolist() == ids.tolist()
    assert cached.tolist() == ref.generate(prompt, max_new_tokens=8, do_sample=False).tolist()


def test_cache_state_in_pieces_equals_whole():
    """Prefill in two chunks through the cache gives the logits of one pass (conv and scan states carry)."""
    cfg = mamba2_config(vocab_size=23, tie_word_embeddings=False, **CONFIGS[2])
    torch.manual_seed(1)
    model = MetaplasticForCausalLM(our_config(cfg, mixer="meta_mamba2")).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.importance.gamma.fill_(0.7)
    ids = torch.randint(0, 23, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        first = model(ids[:, :4], use_cache=True)
        second = model(ids[:, 4:], cache=first.cache, use_cache=True)
    assert first.cache.get_seq_length() == 9
    assert_close(torch.cat([first.logits, second.logits], 1), whole, rtol=1e-5)


def test_to_metaplastic_identity_then_gamma_opens_the_path():
    cfg = mamba2_config(tie_word_embeddings=False, **CONFIGS[1])
    skip_unless_grouped(cfg.n_groups)
    ref = Mamba2Mixer(cfg, layer_idx=0).eval()
    perturb_(ref, seed=7)
    mixer = build_mixer("mamba2", cfg.hidden_size, **mixer_kwargs(cfg))
    mixer.load_state_dict(ref.state_dict())
    twin = to_metaplastic(mixer, init="identity", rank=5)
    assert type(twin).__name__ == "MetaMamba2" and twin.objective.posterior == "diagonal"
    assert twin.state_size() == 2 * mixer.state_size()
    for name, p in mixer.state_dict().items():  # every original weight kept, not shared
        assert torch.equal(twin.state_dict()[name], p)
        assert twin.state_dict()[name].data_ptr() != p.data_ptr()
    h = torch.randn(2, 10, cfg.hidden_size, generator=torch.Generator().manual_seed(8))
    out_ref = ref(h).detach()
    out = twin(h)
    assert_close(out.detach(), out_ref, rtol=1e-5)  # limit 1: γ = 0 is Mamba2, against transformers
    (out * torch.randn_like(out)).sum().backward()
    assert twin.importance.gamma.grad is not None and twin.importance.gamma.grad.abs().max() > 0
    paper = to_metaplastic(mixer, init="paper", rank=5)
    assert relative_error(paper(h).detach(), out_ref) > 1e-3  # the paper's surgery changes the outputs


def test_to_metaplastic_rejects_non_point_mixers():
    mixer = build_mixer("meta_mamba2", 16, num_heads=4, head_dim=8, state_size=4)
    with pytest.raises(ValueError, match="point-posterior"):
        to_metaplastic(mixer)


def test_bad_mixer_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        build_mixer("mamba2", 16, num_heads=3, head_dim=8)
    with pytest.raises(ValueError, match="unknown mixer"):
        build_mixer("nope", 16)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        MetaplasticConfig(num_hidden_layers=2, mixer=["mamba2"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the kernels' Triton paths)")
@pytest.mark.parametrize("mixer", ["mamba2", "meta_mamba2"])
def test_lm_on_gpu_equals_transformers(mixer, ieee_fp32):
    """On CUDA the mixers run the kernels' Triton scan; transformers runs its torch path.

    Both sides compute in IEEE float32 here: the Triton kernels use ``input_precision="ieee"`` unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set, and the ``ieee_fp32`` fixture turns TF32 off for torch's
    matmuls and cuDNN's convolutions. float32 rounds at 6e-8; the two sides sum in different orders over
    T = 96 tokens and two layers, which leaves ~1e-6 relative on the logits, hence the CPU tests' 1e-5."""
    cfg = mamba2_config(vocab_size=101, tie_word_embeddings=True, hidden_size=64, num_heads=4, head_dim=32,
                        state_size=16, n_groups=2)
    skip_unless_grouped(cfg.n_groups)
    torch.manual_seed(0)
    ref = Mamba2ForCausalLM(cfg).eval()
    perturb_(ref, seed=9)
    ours = MetaplasticForCausalLM(our_config(cfg, mixer=mixer)).eval()
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".importance." in key for key in missing)
    ids = torch.randint(0, 101, (2, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.cuda()(ids.cuda()).logits
        got = ours.cuda()(ids.cuda()).logits
    assert_close(got, expected, rtol=1e-5)
