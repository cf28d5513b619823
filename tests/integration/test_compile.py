"""``torch.compile`` on converted models (CPU): forward and backward equal eager, in one graph
(docs/finetune_tools.md#torchcompile).

Compiled and eager runs compute the same float32 maths with operations fused or reordered, so logits and
gradients agree to float32 rounding: 1e-5 relative to the largest value (11 tokens; the same bound as the
conversion tests). ``aot_eager`` (Dynamo's capture and AOTAutograd's joint graph, run by eager kernels) runs
on the 2-layer models with ``fullgraph=True`` (a graph break fails it). ``inductor`` (generated C++) runs on
1-layer models with static shapes, so that it compiles one forward and one backward graph per model. The
conversion uses ``--init paper`` so the importance path is active.
"""
import pytest
import torch

from metaplastic import MetaplasticForCausalLM, convert_checkpoint, registry
from metaplastic.kernels.dispatch import scan

from helpers import assert_close
from tiny_lm import ARCHITECTURES, VOCAB, write_source

IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
# The most graph breaks allowed per model (torch._dynamo.explain, training mode with labels; measured on torch
# 2.13 CPU: none). The scan's value checks become in-graph asserts under compile, the CPU C kernel is a
# torch.library custom op, and the non-finite scan computes its masks instead of reading them.
MAX_BREAKS = {"mamba2": 0, "gated_deltanet": 0, "gla": 0}


def convert(tmp_path_factory, layers: int):
    out = {}
    for arch in ARCHITECTURES:
        root = tmp_path_factory.mktemp(f"{arch}_{layers}")
        write_source(arch, root / "src", num_hidden_layers=layers)
        convert_checkpoint(root / "src", root / "dst", progress=False, init="paper")
        out[arch] = root / "dst"
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def converted_one_layer(tmp_path_factory):
    return convert(tmp_path_factory, 1)


def run(model, call=None):
    """Logits and the gradients of ``model``'s parameters, computed by ``call`` (default: ``model``)."""
    model.zero_grad()
    out = (model if call is None else call)(IDS, labels=IDS, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def check_compiled_equals_eager(path, **compile_kwargs):
    model = MetaplasticForCausalLM.from_pretrained(path).train()
    logits, grads = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, **compile_kwargs)
    got_logits, got_grads = run(model, compiled)
    assert_close(got_logits, logits, rtol=1e-5)
    assert logits.abs().max() > 1.0
    for name in grads:
        assert grads[name].abs().max() > 0, name
        assert_close(got_grads[name], grads[name], rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_forward_backward_equal_eager_aot(converted, arch):
    check_compiled_equals_eager(converted[arch], backend="aot_eager", fullgraph=True)


# 60-95 s per model with a cold inductor cache on a shared 2-core CPU (Mamba2 73 s wall, 64 s of CPU at load
# 4; GLA 60 s, Gated DeltaNet 85 s at load 5-11): over a minute for the three, so outside `make test`
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_compiled_forward_backward_equal_eager_inductor(converted_one_layer, arch):
    check_compiled_equals_eager(converted_one_layer[arch], backend="inductor", dynamic=False, fullgraph=True)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_graph_breaks_at_most_the_documented_ones(converted, arch):
    model = MetaplasticForCausalLM.from_pretrained(converted[arch]).train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(IDS, labels=IDS, use_cache=False)
    reasons = [(r.reason.splitlines()[0], r.user_stack[-1].filename if r.user_stack else None)
               for r in explained.break_reasons]
    assert explained.graph_break_count <= MAX_BREAKS[arch], reasons
    assert explained.graph_count == explained.graph_break_count + 1


def scan_inputs(log_decay_sign: float = -1.0):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 2, 4, generator=gen) for _ in range(3))
    log_decay = log_decay_sign * torch.rand(1, 6, 2, generator=gen)
    beta = torch.rand(1, 6, 2, generator=gen)
    return q, k, v, log_decay, beta


def mamba2_scan(q, k, v, log_decay, beta):
    return scan(registry["mamba2"].objective, q, k, v, log_decay=log_decay, beta=beta, backend="auto").output


def test_compiled_scan_still_checks_values():
    """The value checks run under compile (docs/finetune_tools.md#torchcompile): a growing decay is refused."""
    torch._dynamo.reset()
    compiled = torch.compile(mamba2_scan, backend="aot_eager", fullgraph=True)
    assert_close(compiled(*scan_inputs()), mamba2_scan(*scan_inputs()), rtol=1e-6)
    with pytest.raises(ValueError, match="log_decay must be ≤ 0"):
        mamba2_scan(*scan_inputs(1.0))
    with pytest.raises(RuntimeError, match="log_decay must be ≤ 0"):
        compiled(*scan_inputs(1.0))


def test_compiled_scan_propagates_non_finite_inputs_as_eager():
    """A NaN in the input shows in the same outputs, compiled or not (the masks of kernels/nonfinite.py)."""
    q, k, v, log_decay, beta = scan_inputs()
    q[0, 2, 1, 0] = float("nan")
    eager = mamba2_scan(q, k, v, log_decay, beta)
    torch._dynamo.reset()
    got = torch.compile(mamba2_scan, backend="aot_eager", fullgraph=True)(q, k, v, log_decay, beta)
    assert torch.equal(torch.isnan(got), torch.isnan(eager)) and torch.isnan(eager).any()
    finite = ~torch.isnan(eager)
    assert_close(got[finite], eager[finite], rtol=1e-6)
