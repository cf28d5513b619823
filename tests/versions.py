"""The versions the suite runs with: the floors ``pyproject.toml`` declares, the versions installed, and the
record of a run of the suite at the floors (``tests/results/floor_run.json``).

Run as a script (standard library only, so it works before anything is installed)::

    python tests/versions.py floors [EXTRA ...]   # one pip constraint per line: NAME==FLOOR (markers kept)
    python tests/versions.py installed           # one line: the versions of the packages the suite uses
    python tests/versions.py record JUNIT OUT     # write the floor run's record (JSON) from pytest's JUnit XML

``make test`` prints ``installed`` before pytest; ``make test-floor`` installs ``floors dev`` into a separate
venv, runs the suite there and writes its ``record``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
FLOOR_RECORD = ROOT / "tests" / "results" / "floor_run.json"

# The distributions whose versions a run reports: what the package and its tests import.
REPORTED = ("torch", "triton", "transformers", "flash-linear-attention", "fla-core", "numpy", "sympy",
            "safetensors", "matplotlib", "tqdm", "kernels", "huggingface-hub", "pytest", "hypothesis")

# ``name[extra, ...] >= version`` followed by anything (more clauses, a ``; marker``).
_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*(.*)$")


def _toml(path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # pragma: no cover - Python 3.10: pytest's dependency, else pip's own copy
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return tomllib.load(f)


def canonical(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(extras: List[str], path: Path = PYPROJECT) -> List[str]:
    """The requirement strings of ``[project].dependencies`` and of the named optional extras, in order."""
    project = _toml(path)["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in project.get("optional-dependencies", {}):
            raise SystemExit(f"pyproject.toml has no extra named {extra!r}")
        reqs += project["optional-dependencies"][extra]
    return reqs


def declared_floors(extras: List[str], path: Path = PYPROJECT) -> Dict[str, dict]:
    """``{canonical name: {"name", "extras", "floor", "marker"}}`` for every ``>=`` requirement; a requirement
    without a floor is an error (every dependency states the oldest release it was tested with)."""
    floors: Dict[str, dict] = {}
    for req in requirements(extras, path):
        m = _FLOOR.match(req)
        if not m:
            raise SystemExit(f"pyproject.toml: {req!r} declares no floor (NAME>=VERSION)")
        name, extra, floor, rest = m.groups()
        marker = rest.split(";", 1)[1].strip() if ";" in rest else ""
        floors[canonical(name)] = {"name": name, "extras": extra or "", "floor": floor, "marker": marker}
    return floors


def floor_pins(extras: List[str], path: Path = PYPROJECT) -> List[str]:
    """One pip constraint per declared floor, pinned: ``name==floor; marker`` (constraints take no extras)."""
    return [f"{d['name']}=={d['floor']}" + (f"; {d['marker']}" if d["marker"] else "")
            for d in declared_floors(extras, path).values()]


def installed(names=REPORTED) -> Dict[str, Optional[str]]:
    """``{name: version or None}`` of the installed distributions, and ``python``."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def installed_line() -> str:
    """One line naming the versions this environment runs with (absent distributions shown as ``-``)."""
    return "versions: " + ", ".join(f"{k} {v or '-'}" for k, v in installed().items())


def junit_counts(path: Path) -> Dict[str, float]:
    """``{"tests", "passed", "failed", "errors", "skipped", "seconds"}`` summed over pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"tests": tot["tests"], "passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"],
            "seconds": round(sum(float(s.get("time", 0.0)) for s in suites), 1)}


def write_record(junit: Path, out: Path, extras: List[str], pytest_args: str) -> dict:
    """Write the floor run's record: date, machine, the floors asked for, what was installed, the counts.
    Written beside ``out`` and renamed in, so a reader never sees half a file."""
    floors = declared_floors(extras)
    record = {
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "pytest_args": pytest_args,
        "extras": extras,
        "floors": {k: d["floor"] for k, d in floors.items()},
        "installed": installed(tuple(dict.fromkeys(tuple(floors) + REPORTED))),
        "result": junit_counts(junit),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    return record


def main(argv: List[str]) -> int:
    usage = "usage: versions.py floors [EXTRA ...] | installed | record JUNIT OUT [EXTRA ...]"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "floors":
        print("\n".join(floor_pins(args)))
    elif cmd == "installed":
        print(installed_line())
    elif cmd == "record" and len(args) >= 2:
        r = write_record(Path(args[0]), Path(args[1]), args[2:] or ["dev"], os.environ.get("PYTEST_ARGS", ""))
        res = r["result"]
        print(f"floor run {r['date']}: {res['passed']} passed, {res['failed']} failed, {res['errors']} errors, "
              f"{res['skipped']} skipped in {res['seconds']} s -> {args[1]}")
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
