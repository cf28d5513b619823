"""LoRA through PEFT on converted models (metaplastic.models.lora).

At initialisation (LoRA's B = 0, γ = 0) the wrapped model's logits equal the source's as computed by code
nobody here wrote (transformers' Mamba2; fla's naive recurrences for GDN and GLA), to the bound of the
conversion tests (1e-5 of the largest logit: float32 accumulation over 11 tokens and 2 layers). After a few
AdamW steps, ``merge_and_unload()`` + ``save_pretrained`` + ``from_pretrained`` gives the wrapped model's
logits: merging adds ``B A`` into each weight, a float32 re-association, hence 1e-5 relative. Only the adapters
(and, with ``train_importance``, the importance paths) receive gradients or change.
"""
import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from metaplastic import MetaplasticForCausalLM  # noqa: E402
from metaplastic.models.importance import project_importance_  # noqa: E402
from metaplastic.models.lora import lora_config, lora_target_modules, mixer_projections  # noqa: E402
from metaplastic.models.mixers import MIXERS  # noqa: E402

from helpers import TINY_MIXERS, assert_close  # noqa: E402
from tiny_lm import ARCHITECTURES, VOCAB, convert_sources, reference_logits  # noqa: E402

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
PROJECTIONS = {  # the table of metaplastic.models.lora's docstring
    "mamba2": ["in_proj", "out_proj"],
    "gated_deltanet": ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj"],
    "gla": ["q_proj", "k_proj", "v_proj", "g_proj", "gk_proj.0", "gk_proj.1", "o_proj"],
    "palimpsa": ["q_proj", "k_proj", "v_proj", "a_proj", "bs_proj", "g_proj", "o_proj"],
    "mesanet": ["q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "o_proj"],
    "longhorn": ["in_proj", "x_proj", "dt_proj", "out_proj"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``{arch: (source model, source dir, converted dir)}``."""
    return convert_sources(tmp_path_factory.mktemp("sources"))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("name", list(TINY_MIXERS))
def test_projections_of_every_mixer(name):
    mixer = MIXERS[name](16, **TINY_MIXERS[name])
    assert mixer_projections(mixer) == PROJECTIONS[name.removeprefix("meta_")]
    assert all(isinstance(mixer.get_submodule(p), torch.nn.Linear) for p in mixer_projections(mixer))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_model_equals_the_source_at_initialisation(converted, arch):
    source, _, dst = converted[arch]
    model = MetaplasticForCausalLM.from_pretrained(dst).eval()
    plain = logits(model)
    wrapped = peft.get_peft_model(model, lora_config(model, r=4, mlp=True))
    got = logits(wrapped)
    assert torch.equal(got, plain)  # B = 0: each adapter adds exact zeros
    ref = reference_logits(arch, source, IDS)
    assert_close(got, ref, rtol=1e-5)
    assert ref.abs().max() > 1.0
    adapted = {name.split(".mixer.")[-1].split(".lora_")[0] for name, _ in wrapped.named_parameters()
               if ".mixer." in name and "lora_A" in name}
    assert sorted(adapted) == sorted(PROJECTIONS[arch])


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("train_importance", [False, True])
def test_trained_adapters_merge_save_and_reload(converted, arch, train_importance, tmp_path):
    _, _, dst = converted[arch]
    model = MetaplasticForCausalLM.from_pretrained(dst)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped = peft.get_peft_model(model, lora_config(model, r=4, train_importance=train_importance))
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or (train_importance and ".importance.modules_to_save." in n)
                             for n in trainable), sorted(trainable)
    assert any(".importance." in n for n in trainable) == train_importance
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=2e-2)
    wrapped.train()
    for step in range(3):
        ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(step + 1))
        loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is None for n, p in wrapped.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
        project_importance_(wrapped)
    wrapped.eval()
    trained = logits(wrapped)
    assert (trained - logits(MetaplasticForCausalLM.from_pretrained(dst).eval())).abs().max() > 1e-3  # it learned
    merged = wrapped.merge_and_unload()
    assert isinstance(merged, MetaplasticForCausalLM)
    assert_close(logits(merged), trained, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(reloaded, MetaplasticForCausalLM)
    assert_close(logits(reloaded), trained, rtol=1e-5)
    targets = lora_target_modules(model)
    for name, p in reloaded.named_parameters():  # what LoRA does not target is the base weight, unchanged
        if ".importance." in name and train_importance:
            continue  # trained in full
        if not any(name.endswith(t + ".weight") for t in targets):
            assert torch.equal(p, before[name]), name
    if train_importance:  # γ leaves 0 (its gradient is not zero there) and stays ≥ 0 by the projection
        gammas = torch.cat([layer.mixer.importance.gamma for layer in reloaded.backbone.layers])
        assert (gammas >= 0).all() and (gammas > 0).any()
