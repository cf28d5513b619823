"""The model card ``README.md`` of ``metaplastic convert``: its provenance equals ``conversion.json``, its
``--verify`` figures are those the command printed, its metadata is what the Hugging Face Hub reads, and the
directory still loads with ``from_pretrained``."""
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
import yaml  # noqa: E402
from huggingface_hub import ModelCard  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from metaplastic.cli import main  # noqa: E402
from metaplastic.models.convert import convert_checkpoint, verify_verdict  # noqa: E402
from metaplastic.models.convert.model_card import write_model_card  # noqa: E402

from helpers import assert_close, tiny_mamba2, write_hf  # noqa: E402

IDS = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))


def card_parts(dst):
    """(front matter as a dict, the conversion table as {row: value}, the figures of the verify table in order)."""
    text = (dst / "README.md").read_text()
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:200]
    body = match[2]
    table = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", body.split("## Verification")[0], re.M))
    figures = re.findall(r"^\| [^|]*?(?:\\\|)?[^|]* \| ([0-9.e+-]+) \|$", body.split("## Verification")[1], re.M)
    return yaml.safe_load(match[1]), table, figures


def printed_figures(lines):
    """The ``= X`` figures of ``--verify``'s log lines, as printed."""
    return [line.rsplit("= ", 1)[1] for line in lines if "max |logit difference|" in line]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_card_records_the_conversion_and_the_verify_figures(tmp_path, dtype):
    source = tiny_mamba2()
    write_hf(source, tmp_path / "src")
    lines = []
    result = convert_checkpoint(tmp_path / "src", tmp_path / "dst", dtype=dtype, verify=True, progress=False,
                                log=lines.append)
    dst = tmp_path / "dst"
    meta, table, figures = card_parts(dst)
    assert meta["library_name"] == "transformers" and "metaplastic" in meta["tags"] and "mamba2" in meta["tags"]
    assert "base_model" not in meta  # a local directory: its Hub id is unknown
    assert ModelCard.load(dst / "README.md").data.library_name == "transformers"  # the Hub's own parser

    marker = json.loads((dst / "conversion.json").read_text())
    assert table["source"] == f"`{marker['source']}`"
    assert table["source architecture, format"] == f"Mamba2, `{marker['format']}`"
    assert table["`--init`"] == f"`{marker['init']}`" and table["`--dtype`"] == f"`{marker['dtype']}`" == f"`{dtype}`"
    assert table["importance rank"] == str(marker["importance_rank"])
    assert table["importance groups"] == "one per value channel"

    printed = printed_figures(lines)
    assert len(printed) == (2 if dtype == "float32" else 3)
    assert figures[:len(printed)] == printed  # in memory, reloaded, (rounded reference)
    expected = [result.max_abs_diff, result.max_abs_diff_reloaded]
    if dtype != "float32":
        expected += [result.max_abs_diff_rounded, result.rounding_effect]
    assert figures == [f"{value:.3e}" for value in expected]
    text = (dst / "README.md").read_text()
    passed, line = verify_verdict(result, "identity")
    assert passed is True and f"`{line}`" in text and "- verdict: **OK**" in text
    assert f"relative to the largest \\|source logit\\|: {result.max_rel_diff:.2e}" in text
    assert "<= 0.0001 and <= 1e-05 relative" in text  # convert.VERIFY_ABS, VERIFY_REL

    model = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32)  # the card does not disturb loading
    if dtype == "float32":
        with torch.no_grad():
            assert_close(model(IDS).logits, source(IDS).logits, rtol=1e-5)


def test_card_of_the_command_line_says_what_was_printed(tmp_path, capsys):
    write_hf(tiny_mamba2(), tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--init", "paper", "--verify",
                 "--rank", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    meta, table, figures = card_parts(tmp_path / "dst")
    assert figures == printed_figures(out)
    verdict = next(line for line in out if line.startswith("verify: no verdict"))
    text = (tmp_path / "dst" / "README.md").read_text()
    assert f"`{verdict}`" in text and "- verdict: **no verdict**" in text and "bounds" not in text
    assert table["`--init`"] == "`paper`" and table["importance rank"] == "3"


def test_card_without_verify_and_with_a_failed_verify(tmp_path, monkeypatch):
    write_hf(tiny_mamba2(), tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "plain", progress=False)
    assert "`--verify` was not run" in (tmp_path / "plain" / "README.md").read_text()
    assert card_parts(tmp_path / "plain")[2] == []

    from metaplastic.models import checkpoint_io
    write = checkpoint_io.StreamingSafetensorsWriter.write
    monkeypatch.setattr(checkpoint_io.StreamingSafetensorsWriter, "write", lambda self, name, tensor: write(
        self, name, tensor * 1.01 if name == "backbone.norm_f.weight" else tensor))  # the stored file departs
    result = convert_checkpoint(tmp_path / "src", tmp_path / "bad", verify=True, progress=False, log=lambda _: None)
    text = (tmp_path / "bad" / "README.md").read_text()
    assert "- verdict: **FAILED**" in text and f"`{verify_verdict(result, 'identity')[1]}`" in text


def test_hub_snapshot_source_is_the_base_model(tmp_path):
    src = tmp_path / "hub" / "models--state-spaces--mamba2-tiny" / "snapshots" / "0123abc"
    write_hf(tiny_mamba2(), src)
    convert_checkpoint(src, tmp_path / "dst", progress=False)
    meta, table, _ = card_parts(tmp_path / "dst")
    assert meta["base_model"] == "state-spaces/mamba2-tiny"
    assert ModelCard.load(tmp_path / "dst" / "README.md").data.base_model == "state-spaces/mamba2-tiny"
    assert "(Hub: `state-spaces/mamba2-tiny`)" in table["source"]


def test_a_readme_the_command_did_not_write_is_kept(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(ValueError, match="not written over it"):
        write_model_card(tmp_path, {}, None)
    assert (tmp_path / "README.md").read_text() == "mine"
