"""Table 1: computed from the registry and the derivations, in four formats; markdown equals the golden file.

Regenerate the golden file (only after a deliberate change of the registry or the derivations) with

    metaplastic table1 --format markdown --out tests/golden/table1.md
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from metaplastic import registry
from metaplastic.cli import main
from metaplastic.derivations.record import TheoremRecord
from metaplastic.derivations.proofs import theorem_names
from metaplastic.derivations import table1
from metaplastic.derivations import proofs as theorems_module

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "table1.md"
REGENERATE = "metaplastic table1 --format markdown --out tests/golden/table1.md"


@pytest.fixture(scope="module")
def table():
    return table1.rows(progress=False)


def test_markdown_matches_golden(table):
    assert table1.render(table, "markdown") == GOLDEN.read_text(encoding="utf-8"), (
        f"Table 1 changed; if that is intended, regenerate the golden file with `{REGENERATE}`")


def test_every_model_has_a_verified_row(table):
    assert [row["model"] for row in table] == list(registry)
    assert all(row["verified"] for row in table), [row["model"] for row in table if not row["verified"]]


def test_json_rows_carry_the_documented_keys(table):
    rows = json.loads(table1.render(table, "json"))
    keys = {"model", "likelihood", "posterior", "solver", "forgetting", "update", "relation", "verified"}
    for row in rows:
        assert keys <= set(row)
        spec = registry[row["model"]]
        assert (row["likelihood"], row["posterior"], row["solver"], row["forgetting"]) == (
            spec.objective.likelihood, spec.objective.posterior, spec.objective.solver, spec.objective.forgetting)
        assert row["update"].startswith("$") and r"\leftarrow" in row["update"]


def test_csv_and_latex(table):
    rows = list(csv.DictReader(io.StringIO(table1.render(table, "csv"))))
    assert [r["model"] for r in rows] == list(registry)
    latex = table1.render(table, "latex")
    assert latex.startswith(r"\begin{tabular}") and latex.rstrip().endswith(r"\end{tabular}")
    body = [line for line in latex.splitlines() if line.endswith(r"\\")]
    assert len(body) == len(registry) + 1  # header + one row per model
    assert all(line.count(" & ") == len(table1.COLUMNS) - 1 for line in body)
    assert "meta\\_mamba2" in latex and "≡" not in latex


def _fake_run_all(failing: str):
    def run_all(names=None, closed_form=None, progress=None):
        records = [TheoremRecord(n, "", n != failing, 0.0) for n in theorem_names()]
        for r in records:
            if progress:
                progress(r)
        return records
    return run_all


def test_verified_is_computed_not_typed(monkeypatch):
    monkeypatch.setattr(theorems_module, "run_all", _fake_run_all("derive_gla"))
    rows = {r["model"]: r for r in table1.rows(progress=False)}
    assert not rows["gla"]["verified"]
    assert rows["meta_gla"]["verified"] and rows["mamba2"]["verified"]
    monkeypatch.setattr(theorems_module, "run_all", _fake_run_all("palimpsa_to_mamba2"))
    rows = {r["model"]: r for r in table1.rows(progress=False)}
    assert {m for m, r in rows.items() if not r["verified"]} == {
        name for name, spec in registry.items() if "palimpsa_to_mamba2" in spec.limits}


@pytest.mark.parametrize("fmt", table1.FORMATS)
def test_cli_writes_every_format(fmt, tmp_path, monkeypatch):
    monkeypatch.setattr(theorems_module, "run_all", _fake_run_all(""))
    out = tmp_path / f"table1.{fmt}"
    assert main(["table1", "--format", fmt, "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "palimpsa" in text and "meta_longhorn".replace("_", "\\_" if fmt == "latex" else "_") in text


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["table1", "--out", str(tmp_path / "file" / "t.md")]) == 2  # a parent that is a file
    assert "is not a directory" in capsys.readouterr().err
    monkeypatch.setattr(theorems_module, "run_all", _fake_run_all("derive_mesanet"))
    assert main(["table1", "--format", "json", "--out", str(tmp_path / "t.json")]) == 1
