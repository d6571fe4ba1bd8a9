"""The notebooks are stored clean and run end to end on real asv results, drawing every figure."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from analysis_history import analysis_history
from machines_history import machines_history
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def rich_results(tmp_path_factory) -> Path:
    return analysis_history(tmp_path_factory).results_dir


def _tagged(cell, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


def test_there_are_the_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "1_choosing_a_variant.ipynb",
        "2_scaling_and_roofline.ipynb",
        "3_regression_history.ipynb",
        "4_machines_and_mlx_releases.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameter_cell_first_and_says_what_to_read(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert _tagged(code[0], "parameters") and code[0].source.startswith('RESULTS_DIR = "../.asv/results"')
    assert sum(_tagged(c, "parameters") for c in code) == 1
    for i, cell in enumerate(nb.cells):
        if "plots." in cell.source and cell.cell_type == "code":
            assert _tagged(cell, "figure"), f"cell {i} draws a figure but is not tagged 'figure'"
            assert "Read it like this" in nb.cells[i - 1].source, f"no sentence on what to read before cell {i}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_every_figure_cell_draws_an_image(path, rich_results, asv_history, tmp_path_factory):
    # The history notebook reads the shared history with its planted regression; the machines and releases one
    # two machines' results and two MLX releases' (tests/machines_history.py); the others the richer one.
    results = asv_history.results_dir if "regression" in path.stem else rich_results
    if path.stem.startswith("4_"):
        results = machines_history(tmp_path_factory).history.results_dir
    nb = nbformat.read(path, as_version=4)
    parameters = next(c for c in nb.cells if _tagged(c, "parameters"))
    # jupyter_client starts "python3" kernels with sys.executable; the assert proves it is this venv's.
    parameters.source = f"RESULTS_DIR = {str(results)!r}\nimport sys\nassert sys.prefix == {sys.prefix!r}, sys.prefix"
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(path.parent)}}).execute()
    figures = [c for c in nb.cells if _tagged(c, "figure")]
    assert figures
    for cell in figures:
        assert any("image/png" in out.get("data", {}) for out in cell.outputs), f"no image from: {cell.source}"
    if "regression" in path.stem:
        code = [c for c in nb.cells if c.cell_type == "code"]
        text = "".join(str(out.get("data", {}).get("text/plain", "")) for c in code for out in c.outputs)
        assert asv_history.slowed in text  # the regressions table names the planted commit
