"""The package works however Python is started from the repository root, where the root is ``sys.path[0]``.

Every invocation runs in a fresh process with the repository root as its working directory and none of the
test set-up's path changes. The root folders ``kernels/``, ``models/``, ``derivations/`` share their names
with PyPI distributions (transformers imports the one named ``kernels``); they must never shadow them.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ["unify", "models", "kernels", "derivations", "notebooks", "tests"]

# Builds transformers' Mamba2 after ``import metaplastic``: transformers then imports the PyPI ``kernels``.
BUILD_MAMBA2 = (
    "import metaplastic, transformers as t\n"
    "config = t.Mamba2Config(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_heads=2, head_dim=8,"
    " state_size=4, n_groups=1, expand=1)\n"
    "model = t.Mamba2ForCausalLM(config)\n"
    "print('built', type(model).__name__, metaplastic.MetaplasticForCausalLM.__module__)\n"
)


def run_from_root(args: list, stdin: str = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300, env=env)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"


@pytest.mark.parametrize("folder", TOP_FOLDERS)
def test_no_root_folder_is_a_regular_package(folder):
    """A root folder with an ``__init__.py`` is importable under its own name from the root: shadowing."""
    assert not (ROOT / folder / "__init__.py").exists()


def test_module_entry_point_from_the_root():
    proc = run_from_root([sys.executable, "-m", "metaplastic", "registry", "--json"])
    assert_ok(proc)
    assert '"palimpsa"' in proc.stdout


def test_dash_c_then_transformers_mamba2_from_the_root():
    proc = run_from_root([sys.executable, "-c", BUILD_MAMBA2])
    assert_ok(proc)
    assert "built Mamba2ForCausalLM metaplastic.models.modeling" in proc.stdout


def test_script_on_stdin_from_the_root():
    proc = run_from_root([sys.executable, "-"], stdin=BUILD_MAMBA2)
    assert_ok(proc)
    assert "built Mamba2ForCausalLM" in proc.stdout


def _distribution_installed(name: str) -> bool:
    from importlib import metadata
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _distribution_installed("kernels"), reason="the PyPI package kernels is not installed")
def test_the_pypi_kernels_package_wins_from_the_root():
    code = "import kernels, metaplastic.kernels.dispatch as d; print(kernels.__file__); print(d.__file__)"
    proc = run_from_root([sys.executable, "-c", code])
    assert_ok(proc)
    pypi, ours = proc.stdout.split()
    assert "site-packages" in pypi and not Path(pypi).resolve().is_relative_to(ROOT / "kernels")
    assert Path(ours).resolve() == (ROOT / "kernels" / "dispatch.py").resolve()


def test_torchrun_module_from_the_root():
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    proc = run_from_root([torchrun, "--nproc_per_node", "1", "-m", "metaplastic", "finetune", "--help"])
    assert_ok(proc)
    assert "usage" in proc.stdout.lower()


def test_every_source_folder_is_a_declared_package():
    """pyproject.toml lists the packages explicitly: a folder of modules left out would be missing from wheels."""
    import re
    listed = re.search(r"^packages = \[([^\]]*)\]", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    declared = set(re.findall(r'"([\w.]+)"', listed))
    roots = {"metaplastic": ROOT / "unify" / "metaplastic", "metaplastic.models": ROOT / "models",
             "metaplastic.kernels": ROOT / "kernels", "metaplastic.derivations": ROOT / "derivations"}
    found = set()
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.parent.relative_to(folder)
            if package == "metaplastic" and rel.parts[:1] in (("models",), ("kernels",), ("derivations",)):
                continue  # the links to the namespace subpackages, found under their own names
            found.add(".".join([package, *rel.parts]))
    assert found == declared
