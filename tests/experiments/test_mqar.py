"""MQAR: the generator's exact structure, and the trainer end to end."""
import json

import pytest
import torch

from metaplastic.experiments.mqar_data import IGNORE, check_setting, mqar


@pytest.mark.parametrize("seq_len,pairs,vocab", [(16, 4, 32), (64, 8, 64), (66, 16, 40), (32, 1, 8)])
def test_generator_structure(seq_len, pairs, vocab):
    inputs, labels = mqar(50, seq_len, pairs, vocab, torch.Generator().manual_seed(1))
    assert inputs.shape == labels.shape == (50, seq_len)
    half = vocab // 2
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
        assert len(set(keys)) == pairs  # no key repeated within an example
        answer = dict(zip(keys, values))
        assert all(lab == IGNORE for lab in y[:2 * pairs])  # no loss in the context
        query_positions = [t for t in range(2 * pairs, seq_len) if x[t] != 0]
        assert sorted(x[t] for t in query_positions) == sorted(keys)  # every key queried exactly once
        assert all((t - 2 * pairs) % 2 == 0 for t in query_positions)  # on the query slots
        for t in range(2 * pairs, seq_len):
            if x[t] == 0:
                assert y[t] == IGNORE
            else:
                assert y[t] == answer[x[t]]  # the answer sits at the query position
        # a key occurs once in the context and once as a query, nowhere else; values only in the context
        assert all(x.count(k) == 2 for k in keys)
        assert all(x.count(v) == 1 for v in values)


def test_generator_is_reproducible_and_random():
    a = mqar(8, 32, 4, 32, torch.Generator().manual_seed(3))
    b = mqar(8, 32, 4, 32, torch.Generator().manual_seed(3))
    c = mqar(8, 32, 4, 32, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_queries_favour_short_gaps():
    """Zoology's power law: the first query slot is used far more often than the last."""
    inputs, _ = mqar(2000, 64, 2, 64, torch.Generator().manual_seed(0))
    first, last = (inputs[:, 4] != 0).float().mean(), (inputs[:, 62] != 0).float().mean()
    assert first > 3 * last


@pytest.mark.parametrize("seq_len,pairs,vocab,match", [(15, 4, 32, "seq_len=15 is too short"),
                                                        (64, 16, 32, "vocab_size=32 has 15 keys"),
                                                        (64, 0, 32, "num_pairs must be positive")])
def test_bad_settings(seq_len, pairs, vocab, match):
    with pytest.raises(ValueError, match=match):
        check_setting(seq_len, pairs, vocab)


# ------------------------------------------------------------------------------ training (needs models/)

def _tiny(**kw):
    from metaplastic.experiments.mqar import MQARConfig
    base = dict(name="tiny", vocab_size=16, d_model=16, settings=((16, 2), (16, 4)), state_budget=256,
                train_examples=64, test_examples=16, epochs=1, batch_size=16, lrs=(1e-2,), seeds=(0,),
                models=("mamba2",))
    base.update(kw)
    return MQARConfig(**base)


def test_models_have_matched_state_size():
    pytest.importorskip("metaplastic.models")
    from metaplastic.experiments.mqar import MQARModel
    sizes = {name: MQARModel(name, 16, 32, 512).state_size() for name in ("mamba2", "meta_mamba2")}
    assert all(256 < s <= 512 for s in sizes.values()), sizes


def test_training_is_reproducible_from_seed():
    pytest.importorskip("metaplastic.models")
    from metaplastic.experiments.mqar import train_run
    cfg = _tiny()
    a = train_run(cfg, "mamba2", 16, 1e-2, 3, torch.device("cpu"))
    b = train_run(cfg, "mamba2", 16, 1e-2, 3, torch.device("cpu"))
    c = train_run(cfg, "mamba2", 16, 1e-2, 4, torch.device("cpu"))
    assert a["final_loss"] == b["final_loss"] and a["accuracy"] == b["accuracy"]
    assert a["final_loss"] != c["final_loss"]


def test_cli_quick_writes_files(tmp_path):
    pytest.importorskip("metaplastic.models")
    from metaplastic.cli import main
    rc = main(["mqar", "--config", "quick", "--models", "mamba2", "--epochs", "1", "--lrs", "1e-2",
               "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "mqar.json").read_text())
    r = result["results"]["mamba2"]
    assert r["best_lr"] == 1e-2 and [s["pairs"] for s in r["settings"]] == [2, 4, 8]
    assert all(len(s["accuracy"]) == 1 and 0 <= s["mean"] <= 1 for s in r["settings"])
    assert (tmp_path / "mqar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_quick_full(tmp_path):
    from metaplastic.cli import main
    assert main(["mqar", "--config", "quick", "--out", str(tmp_path)]) == 0


def test_cli_rejects_bad_input(tmp_path, capsys):
    pytest.importorskip("metaplastic.models")
    from metaplastic.cli import main
    assert main(["mqar", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert main(["mqar", "--lrs", "-1", "--out", str(tmp_path)]) == 2
    assert "--lrs must be positive" in capsys.readouterr().err
