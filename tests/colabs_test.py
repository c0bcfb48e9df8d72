"""The notebooks of colabs/: generated from colabs/build_notebooks.py, stored without outputs,
with a Colab badge in colabs/README.md, and every cell runs headless at smoke-test sizes.

The notebooks run in a Jupyter kernel of this very interpreter (a kernelspec written to a
temporary directory), from the repository root, with DIFFUSION_JAX_SMOKE_TEST=1 and one work
directory shared by the three, so the digits run the quick start trains is reused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS_DIR = REPO_ROOT / "colabs"
NOTEBOOKS = ("quickstart", "samplers", "likelihood")
KERNEL_NAME = "diffusion_jax_colabs_test"
CELL_TIMEOUT_S = 900  # generous: the CPU may be shared; a healthy smoke run takes a few minutes


def load_builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebooks", COLABS_DIR / "build_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(COLABS_DIR / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = read_notebook(name)
    nbformat.validate(notebook)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_what_the_builder_writes(name):
    """Edits go through colabs/build_notebooks.py: the stored file is its output."""
    built = load_builder().build_notebook(name)
    stored = read_notebook(name)
    assert [(c.cell_type, c.source) for c in stored.cells] == [
        (c.cell_type, c.source) for c in built.cells
    ], "run `python colabs/build_notebooks.py`"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_in_colab_and_has_a_badge(name):
    notebook = read_notebook(name)
    setup = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "REPO_URL" in setup and '"google.colab" in sys.modules' in setup
    assert 'os.environ.get("DIFFUSION_JAX_SMOKE_TEST"' in "".join(c.source for c in notebook.cells)
    badge_url = f"/blob/main/colabs/{name}.ipynb"
    assert badge_url in (COLABS_DIR / "README.md").read_text()
    assert badge_url in notebook.cells[0].source


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory) -> pathlib.Path:
    """A kernelspec that starts this interpreter, whatever `python3` means on PATH."""
    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "diffusion_jax test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return kernels


@pytest.fixture(scope="module")
def shared_workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("colabs_workdir")


def run_notebook(notebook, kernel_spec_dir: pathlib.Path, workdir: pathlib.Path):
    env = dict(os.environ)
    # The kernel is a user's runtime: its real devices, not the 8 fake CPUs of conftest.py.
    env.pop("XLA_FLAGS", None)
    env["DIFFUSION_JAX_SMOKE_TEST"] = "1"
    env["DIFFUSION_JAX_COLABS_WORKDIR"] = str(workdir)
    # MPLBACKEND stays unset: ipykernel then draws with matplotlib-inline (Agg, headless).
    env.pop("MPLBACKEND", None)
    manager = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]),
    )
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,  # a failing cell raises CellExecutionError, failing the test
        resources={"metadata": {"path": str(REPO_ROOT)}},  # the kernel's working directory
    )
    client.execute(env=env)
    return notebook


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_kernel_is_this_interpreter(kernel_spec_dir, shared_workdir):
    cell = nbformat.v4.new_code_cell("import os, sys; print(sys.executable); print(os.getcwd())")
    notebook = run_notebook(nbformat.v4.new_notebook(cells=[cell]), kernel_spec_dir, shared_workdir)
    executable, cwd = stream_text(notebook.cells[0]).split()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert os.path.realpath(cwd) == os.path.realpath(REPO_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_spec_dir, shared_workdir):
    notebook = run_notebook(read_notebook(name), kernel_spec_dir, shared_workdir)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert figures, "the notebook drew no figure"
    device_line = stream_text(next(c for c in notebook.cells if "jax.devices()" in c.source))
    assert "devices:" in device_line
