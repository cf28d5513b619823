"""Left-padded batches: every row decodes exactly as its prompt alone, for every mixer of the catalogue.

The reference is the same model run on each prompt by itself (no padding, no mask); the padded batch goes
through transformers' ``generate`` with an ``attention_mask``, with and without the recurrent cache.
"""
import pytest
import torch

from metaplastic import MIXERS, MetaplasticConfig, MetaplasticForCausalLM

from helpers import TINY_MIXERS, assert_close

TINY = {**TINY_MIXERS, "mamba2": dict(TINY_MIXERS["mamba2"], time_step_limit=(0.01, 0.5))}
VOCAB, PAD = 29, 0
PROMPTS = [[5, 7, 3, 9, 11, 2], [4, 8], [13, 6, 1, 10]]


def test_every_mixer_is_covered():
    assert set(TINY) == set(MIXERS)


def tiny_lm(name, seed=0):
    config = MetaplasticConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, mixer=name,
                               mixer_kwargs=TINY[name], intermediate_size=24, tie_word_embeddings=False,
                               pad_token_id=PAD)
    torch.manual_seed(seed)
    model = MetaplasticForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every weight off its initial value; metaplastic paths open (γ > 0)
        for pname, p in model.named_parameters():
            if pname.endswith("gamma"):
                p.fill_(0.8)
            elif not pname.endswith(("A_log", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def left_pad(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("name", list(TINY))
def test_left_padded_batch_decodes_each_row_as_alone(name):
    model = tiny_lm(name)
    ids, mask = left_pad(PROMPTS)
    new = 5
    alone = [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)[0, -new:].tolist()
             for p in PROMPTS]
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert batch[:, -new:].tolist() == alone
    nocache = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, use_cache=False)
    assert nocache.tolist() == batch.tolist()
    # the logits at real tokens equal those of the prompt alone
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        for row, p in enumerate(PROMPTS):
            single = model(torch.tensor([p]), use_cache=False).logits[0]
            assert_close(padded[row, -len(p):], single, rtol=1e-5)


def test_a_mask_changes_the_padded_rows_only():
    """Without the mask, the padding tokens would enter the memory: the masked logits must differ from the
    unmasked ones on padded rows (so the test above cannot pass by ignoring the mask) and not elsewhere."""
    model = tiny_lm("palimpsa", seed=3)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        masked = model(ids, attention_mask=mask).logits
        plain = model(ids).logits
    assert_close(masked[0], plain[0], rtol=1e-6)  # row 0 has no padding
    difference = (masked[1, -2:] - plain[1, -2:]).abs().max() / plain[1, -2:].abs().max()
    assert difference > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the kernels' Triton paths)")
@pytest.mark.parametrize("name", list(TINY))
def test_left_padded_batch_on_gpu(name):
    """On CUDA the scan runs the Triton kernels: padded tokens must leave their states unchanged too."""
    model = tiny_lm(name).cuda()
    ids, mask = left_pad(PROMPTS)
    new = 5
    alone = [model.generate(torch.tensor([p]).cuda(), max_new_tokens=new, do_sample=False)[0, -new:].tolist()
             for p in PROMPTS]
    batch = model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=new, do_sample=False)
    assert batch[:, -new:].tolist() == alone
