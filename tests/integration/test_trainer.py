"""The stock transformers ``Trainer`` and ``gradient_checkpointing_enable()`` on converted models.

Gradient checkpointing recomputes each block's forward during the backward pass with the same float32
operations in the same order, so its gradients equal those without it to float32 rounding (1e-6 relative to
each parameter's largest gradient). The conversion uses
``--init paper`` so that the importance path is active (γ = 1) and every parameter has a gradient.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from metaplastic import MetaplasticForCausalLM, convert_checkpoint

from helpers import assert_close
from tiny_lm import ARCHITECTURES, VOCAB, write_source

pytest.importorskip("accelerate")  # the Trainer needs it


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = {}
    for arch in ARCHITECTURES:
        root = tmp_path_factory.mktemp(arch)
        write_source(arch, root / "src")
        convert_checkpoint(root / "src", root / "dst", progress=False, init="paper")
        out[arch] = root / "dst"
    return out


def gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids, use_cache=False).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradient_checkpointing_gives_the_same_gradients(converted, arch):
    model = MetaplasticForCausalLM.from_pretrained(converted[arch]).train()
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    plain = gradients(model, ids)
    assert len(plain) == len(list(model.parameters()))
    calls = []
    hook = model.backbone.layers[0].mixer.register_forward_pre_hook(lambda *args: calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpointed = gradients(model, ids)
    hook.remove()
    assert len(calls) == 2  # the forward, then its recomputation in the backward pass: checkpointing is active
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_close(checkpointed[name], plain[name], rtol=1e-6, msg=name)


class TokenDataset(torch.utils.data.Dataset):
    """``n`` random sequences of ``length`` token ids, labels equal to the inputs (the model shifts them)."""

    def __init__(self, n: int = 8, length: int = 12, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trainer_trains_saves_and_reloads(converted, arch, tmp_path):
    model = MetaplasticForCausalLM.from_pretrained(converted[arch])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             gradient_checkpointing=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert result.global_step == 4
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
    trainer.save_model(str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert isinstance(reloaded, MetaplasticForCausalLM)
    ids = TokenDataset(n=2, seed=1).ids
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
