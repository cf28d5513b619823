"""`metaplastic finetune` input handling: the data rule, the file formats, and the one-line errors (exit 2)."""

import numpy as np
import pytest
import torch

from metaplastic.cli import main
from metaplastic.finetune_data import DataError, PackedSequences, load_tokens


def stream(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50, n).astype(np.int64)


@pytest.mark.parametrize("world,micro", [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (8, 1)])
def test_every_sharding_sees_the_same_global_batch(world, micro):
    tokens, L, G = stream(10 * 6 + 3), 6, 8  # 10 sequences (3 tail tokens dropped): steps straddle epochs
    data = PackedSequences(tokens, L, G, seed=3)
    for step in range(4):
        one = torch.cat(list(data.batch(step, 0, 1, G)))
        sharded = torch.cat([b for r in range(world) for b in data.batch(step, r, world, micro)])
        assert torch.equal(sharded, one)
        assert all(b.shape == (micro, L) for r in range(world) for b in data.batch(step, r, world, micro))
    # the stream is epoch after epoch of permutations of the 10 sequences, each a slice of the file
    ids = np.concatenate([data.sequence_ids(s) for s in range(5)])  # 40 = 4 epochs
    for e in range(4):
        assert sorted(ids[10 * e:10 * (e + 1)]) == list(range(10))
    rows = torch.cat([torch.cat(list(data.batch(s, 0, 1, G))) for s in range(5)])
    for row, i in zip(rows, ids):
        assert torch.equal(row, torch.from_numpy(tokens[i * L:(i + 1) * L]))
    assert not np.array_equal(ids[:10], ids[10:20])  # reshuffled per epoch


def test_bin_and_npy_files(tmp_path):
    tokens = stream(100).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", tokens.astype(np.int32))
    assert np.array_equal(load_tokens(tmp_path / "t.bin"), tokens)
    assert np.array_equal(load_tokens(tmp_path / "t.bin", dtype="uint32")[:2],
                          tokens[:4].view(np.uint32))
    assert np.array_equal(load_tokens(tmp_path / "t.npy"), tokens)
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(DataError, match="not integer token ids"):
        load_tokens(tmp_path / "f.npy")


def test_text_file_uses_the_tokenizer_beside_the_model(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    (tmp_path / "t.txt").write_text("the cat sat the dog")
    assert load_tokens(tmp_path / "t.txt", tokenizer_dir=tmp_path / "model").tolist() == [1, 2, 3, 1, 0]
    with pytest.raises(DataError, match="no tokenizer could be loaded"):
        load_tokens(tmp_path / "t.txt", tokenizer_dir=tmp_path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metaplastic import MetaplasticConfig, MetaplasticForCausalLM
    path = tmp_path_factory.mktemp("ft_err") / "model"
    cfg = MetaplasticConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, mixer="meta_mamba2",
                            mixer_kwargs=dict(head_dim=8, state_size=4, importance_rank=2))
    MetaplasticForCausalLM(cfg).save_pretrained(path)
    return path


def _run(capsys, model, data, out, *extra):
    code = main(["finetune", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--seq-len", "8", "--global-batch", "4", "--steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_errors_are_one_line_exit_2(tmp_path, model_dir, capsys, monkeypatch):
    good = tmp_path / "good.npy"
    np.save(good, stream(64) % 32)
    from transformers import Mamba2Config
    Mamba2Config(vocab_size=32, hidden_size=16, num_heads=4, head_dim=8).save_pretrained(tmp_path / "mamba2")
    (tmp_path / "nothing").mkdir()
    np.save(tmp_path / "empty.npy", np.zeros(0, dtype=np.int64))
    np.save(tmp_path / "short.npy", stream(31) % 32)  # 3 sequences of 8 < one global batch of 4
    np.save(tmp_path / "big.npy", stream(64) + 32)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((model_dir / "config.json").read_text())
    cases = [
        (tmp_path / "mamba2", good, (), "is a 'mamba2' model, not a metaplastic one"),
        (tmp_path / "nothing", good, (), "is not a model directory (no config.json)"),
        (tmp_path / "noweights", good, (), "could not be loaded"),
        (model_dir, tmp_path / "empty.npy", (), "is empty"),
        (model_dir, tmp_path / "nothing", (), "is not a file"),
        (model_dir, tmp_path / "empty.txt", (), "is empty"),
        (model_dir, tmp_path / "short.npy", (), "is too short: 31 tokens make 3 sequences"),
        (model_dir, tmp_path / "missing.npy", (), "does not exist"),
        (model_dir, tmp_path / "big.npy", (), "outside the model's vocabulary [0, 32)"),
        (model_dir, good, ("--micro-batch", "3"), "--micro-batch 3 does not divide the per-rank batch 4"),
        (model_dir, good, ("--resume", str(tmp_path)), "is not a DCP checkpoint directory"),
    ]
    for model, data, extra, message in cases:
        code, line = _run(capsys, model, data, tmp_path / "out", *extra)
        assert code == 2 and message in line and line.startswith("metaplastic finetune: error:"), (message, line)
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun --nproc_per_node=3 would set it
    code, line = _run(capsys, model_dir, good, tmp_path / "out")
    assert code == 2 and "world size 3 does not divide --global-batch 4" in line, line
