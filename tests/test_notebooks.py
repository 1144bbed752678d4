"""The notebooks: committed without outputs, public API only, and they run without errors.

Every ``notebooks/*.ipynb`` is picked up, so a new notebook is tested without editing this
file.  Execution uses the ``python3`` kernel of the interpreter running the tests (the
venv's ipykernel), with ``notebooks/`` as the working directory and a non-interactive
matplotlib backend.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import fixedpoint

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]

# The package's public modules; everything else (fixedpoint.solve, .methods, ...) is an
# implementation detail that notebooks must not reach into.
PUBLIC_MODULES = {
    "fixedpoint",
    "fixedpoint.systems",
    "fixedpoint.testing",
    "fixedpoint.tarflow",
    "fixedpoint.tarflow.checkpoint",
    "fixedpoint.data",
    "fixedpoint.tarflow.train",
}
PUBLIC_NAMES = set(fixedpoint.__all__) | {"systems", "testing", "__version__"}


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(path: Path) -> list[tuple[int, str]]:
    return [(i, c.source) for i, c in enumerate(_read(path).cells) if c.cell_type == "code"]


def _python_source(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so ``ast`` can parse it."""
    return "\n".join("" if re.match(r"\s*[%!]", line) else line for line in source.splitlines())


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_without_outputs(path: Path):
    nb = _read(path)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs; clear them"
        assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_uses_public_api_only(path: Path):
    for i, source in _code_cells(path):
        tree = ast.parse(_python_source(source), filename=f"{path.name}, cell {i}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
                names: list[str] = []
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
                names = [alias.name for alias in node.names]
                if node.module == "fixedpoint":
                    # from fixedpoint import systems, testing, solve, Jacobi, ...
                    unknown = [n for n in names if n not in PUBLIC_NAMES]
                    assert not unknown, f"{path.name}, cell {i}: imports non-public {unknown}"
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("fp", "fixedpoint", "fpt"):
                    pytest.fail(f"{path.name}, cell {i}: private attribute {base.id}.{node.attr}")
                continue
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "fixedpoint":
                    allowed = sorted(PUBLIC_MODULES)
                    assert module in PUBLIC_MODULES, (
                        f"{path.name}, cell {i}: imports {module}; use only {allowed}"
                    )
            if any(m.split(".")[0] == "fixedpoint" for m in modules):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name}, cell {i}: imports private names {private}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert "python3" in specs, f"no python3 kernel found (have {sorted(specs)}); install ipykernel"
    # The kernel inherits this environment: no GUI backend, and (with the test's
    # interpreter substituted for "python" by jupyter_client) the same venv.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _read(path)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{path.name}: cell {i} raised"
