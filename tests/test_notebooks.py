"""Every notebook in notebooks/ runs top to bottom, headless, on a fresh registry.

Each notebook is executed with nbclient in a temporary copy of the folder (so nothing is written next to the
committed files) on a kernelspec that points at this interpreter. A cell that raises fails the test with that
cell's error. New notebooks are picked up by the parametrization without touching this file. The executed
copies are kept under test-artifacts/notebooks/ so a failure can be read cell by cell.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest
from _jupyter_server import ARTIFACTS, KERNEL_NAME, NOTEBOOKS, copy_notebooks, isolated_env

NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # the first cell loads the demo model and evaluates a baseline: ~15-45 s on 2 busy cores
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def _execute(path: Path, tmp_path: Path) -> tuple[nbformat.NotebookNode, str]:
    """Run the notebook at ``path`` from a temp copy of its folder; returns the executed notebook and registry."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    work = copy_notebooks(tmp_path / "notebooks", path.parent)
    registry_url = f"sqlite:///{tmp_path / 'runs.db'}"
    env = isolated_env(tmp_path / "jupyter", registry_url)
    specs = KernelSpecManager(kernel_dirs=[str(Path(env["JUPYTER_DATA_DIR"]) / "kernels")])
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    assert km.kernel_spec is not None and km.kernel_spec.argv[0] == sys.executable

    nb = nbformat.read(work / path.name, as_version=4)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(work)}},  # the kernel's working folder, as in JupyterLab
    )
    out = ARTIFACTS / "notebooks" / path.name
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        pytest.fail(f"{path.name}: a cell raised\n{err}", pytrace=False)
    finally:
        nbformat.write(nb, out)
    return nb, registry_url


def _text_outputs(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
            parts.extend(output.get("traceback", []))
    return "\n".join(parts)


def test_there_is_a_quickstart_notebook_with_cleared_outputs() -> None:
    """The committed notebooks carry no outputs: the diff stays readable and nothing stale is shown."""
    assert (NOTEBOOKS / "00_quickstart.ipynb") in NOTEBOOK_FILES
    for path in NOTEBOOK_FILES:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=[p.name for p in NOTEBOOK_FILES])
def test_notebook_runs_headless_without_errors(path: Path, tmp_path: Path) -> None:
    nb, registry_url = _execute(path, tmp_path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.source.strip():
            assert cell.execution_count is not None, f"{path.name} cell {i} did not run"
    text = _text_outputs(nb)
    assert "Traceback (most recent call last)" not in text, (
        f"{path.name} printed a traceback:\n{text[-3000:]}"
    )
    # A notebook runs clean: no warning box (deprecations, library chatter) in front of the reader.
    warnings = [
        o.get("text", "")
        for c in nb.cells
        for o in c.get("outputs", [])
        if o.get("name") == "stderr" and "Warning" in o.get("text", "")
    ]
    assert not warnings, f"{path.name} printed warnings:\n" + "\n".join(w[-800:] for w in warnings)
    if path.name == "00_quickstart.ipynb":
        _check_quickstart(nb, registry_url)


def _check_quickstart(nb: nbformat.NotebookNode, registry_url: str) -> None:
    """The quickstart's promise: a baseline in the registry, the runs table, and the app as a live widget."""
    from workbench.registry import Registry

    reg = Registry.open(registry_url)
    try:
        runs = reg.runs_frame()
    finally:
        reg.close()
    assert len(runs) == 1 and runs["pipeline"].iloc[0] == "baseline", runs
    assert runs["status"].iloc[0] == "done"

    text = _text_outputs(nb)
    assert f"run {int(runs['run_id'].iloc[0])}: done" in text
    assert "| run_id" in text and "baseline" in text, "the registry table is missing"
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any(WIDGET_MIME in o.get("data", {}) for o in last.outputs), (
        "the Workbench did not display as a widget"
    )
