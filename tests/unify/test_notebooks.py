"""Every notebook in notebooks/ executes without error (at small sizes: METAPLASTIC_NB_SMALL=1)."""
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_the_objective_and_table1.ipynb", "02_convert_a_mamba2_checkpoint.ipynb",
            "03_memory_capacity_and_mqar.ipynb"]


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == EXPECTED


def test_notebooks_are_committed_with_outputs():
    """Readers see the results without running them: every code cell has run and the plots are embedded."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cells = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in cells), f"{path.name} has unexecuted cells"
        assert not [o for c in cells for o in c.outputs if o.output_type == "error"], f"{path.name} has errors"
    nb3 = nbformat.read(NOTEBOOKS[2], as_version=4)
    pngs = [o for c in nb3.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2, "notebook 03 must show the capacity and MQAR plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("METAPLASTIC_NB_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors; a shared CPU is easily oversubscribed
    nb = nbformat.read(path, as_version=4)
    # the kernel is this interpreter (the venv's), whatever kernelspecs the machine has
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.kernel_manager_class = _kernel_manager()
    client.execute()  # raises CellExecutionError on the first failing cell


def _kernel_manager():
    from jupyter_client import KernelManager

    class ThisPython(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file]

    return ThisPython
