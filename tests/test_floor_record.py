"""The declared version floors are the versions the suite last passed with: ``pyproject.toml``'s floors against
the committed record of ``make test-floor`` (``tests/results/floor_run.json``), and the figures that
``docs/testing.md`` quotes against the same record."""
import json
import re

import pytest
from packaging.version import Version

from versions import FLOOR_RECORD, PYPROJECT, ROOT, _toml, declared_floors

RECORD = json.loads(FLOOR_RECORD.read_text())


def _same_release(installed: str, floor: str) -> bool:
    """``2.8.0`` is the floor ``2.8``; a local build tag (``+cpu``) is the same release."""
    return Version(Version(installed).public) == Version(floor)


@pytest.mark.parametrize("name,declared", sorted(declared_floors(RECORD["extras"]).items()))
def test_floor_was_installed_in_the_floor_run(name, declared):
    assert RECORD["floors"].get(name) == declared["floor"], (
        f"pyproject.toml declares {name}>={declared['floor']} but the floor run pinned "
        f"{RECORD['floors'].get(name)}: rerun `make test-floor`")
    installed = RECORD["installed"].get(name)
    assert installed is not None and _same_release(installed, declared["floor"]), (
        f"{name}: the floor run installed {installed}, not the declared floor {declared['floor']}")


def test_record_covers_every_floor():
    """No floor was dropped from pyproject.toml without a rerun: the record pins exactly the declared floors."""
    assert set(RECORD["floors"]) == set(declared_floors(RECORD["extras"]))
    assert "dev" in RECORD["extras"], "the floor run must install the test dependencies at their floors too"


def test_floor_run_passed():
    r = RECORD["result"]
    assert r["failed"] == 0 and r["errors"] == 0, f"the floor run failed: {r}"
    assert r["passed"] > 0 and r["passed"] + r["skipped"] == r["tests"]


def test_floor_run_used_the_oldest_python():
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", _toml(PYPROJECT)["project"]["requires-python"].strip())
    assert floor, "requires-python is expected as >=MAJOR.MINOR"
    assert RECORD["installed"]["python"].rsplit(".", 1)[0] == floor.group(1)


def test_testing_doc_quotes_the_record():
    doc = (ROOT / "docs" / "testing.md").read_text()
    r = RECORD["result"]
    for figure in (RECORD["date"], f"{r['passed']} passed", f"{r['skipped']} skipped"):
        assert figure in doc, f"docs/testing.md does not quote the floor run's {figure!r}"
    for name, floor in RECORD["floors"].items():
        assert f"{name} {floor}" in doc, f"docs/testing.md does not list the floor {name} {floor}"
