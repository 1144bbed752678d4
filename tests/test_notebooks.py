"""The notebooks: committed without outputs, public API only, they run, and every figure renders.

Every ``notebooks/*.ipynb`` and ``notebooks/solutions/*.ipynb`` is picked up, so a new
notebook is tested without editing this file.  Execution uses the ``python3`` kernel of the
interpreter running the tests (the venv's ipykernel), with the notebook's folder as the
working directory and matplotlib's **inline** backend: ``plt.show()`` then really draws
the figure (text, mathtext labels, colour bars) into a PNG, so a broken label or an empty
axis fails here instead of passing silently as it would under ``Agg``.

The numbers the prose quotes are checked by ``assert`` cells inside the notebooks; an
assert that fails is a cell error, which fails :func:`test_notebook_runs`.
"""

from __future__ import annotations

import ast
import base64
import io
import re
from pathlib import Path

import pytest

import fixedpoint

nbformat = pytest.importorskip("nbformat")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
SOLUTION_DIR = NOTEBOOK_DIR / "solutions"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb")) + sorted(SOLUTION_DIR.glob("*.ipynb"))
IDS = [str(path.relative_to(NOTEBOOK_DIR)) for path in NOTEBOOKS]

# The package's public modules; everything else (fixedpoint.solve, .methods, ...) is an
# implementation detail that notebooks must not reach into.
PUBLIC_MODULES = {
    "fixedpoint",
    "fixedpoint.testing",
    "fixedpoint.testing.systems",
    "fixedpoint.tarflow",
    "fixedpoint.tarflow.checkpoint",
    "fixedpoint.data",
    "fixedpoint.tarflow.train",
    "fixedpoint.diffusion",
}
PUBLIC_NAMES = set(fixedpoint.__all__) | {"systems", "testing", "__version__"}

# "**Exercise 3** ..." in a notebook, "## Solution 3" in its solutions notebook.
EXERCISE = re.compile(r"\*\*Exercise (\d+)\b")
SOLUTION = re.compile(r"^#+ Solution (\d+)\b", re.MULTILINE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code_cells(path: Path) -> list[tuple[int, str]]:
    return [(i, c.source) for i, c in enumerate(_read(path).cells) if c.cell_type == "code"]


def _markdown(path: Path) -> str:
    return "\n".join(c.source for c in _read(path).cells if c.cell_type == "markdown")


def _python_source(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so ``ast`` can parse it."""
    return "\n".join("" if re.match(r"\s*[%!]", line) else line for line in source.splitlines())


def _solutions_of(path: Path) -> Path:
    return SOLUTION_DIR / f"{path.stem}_solutions.ipynb"


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


# The course notebooks set exercises; notebook 05 (diffusion over time) does not yet.
WITHOUT_EXERCISES = {"05_diffusion_in_time.ipynb"}


@pytest.mark.parametrize(
    "path", [p for p in NOTEBOOKS if p.parent == NOTEBOOK_DIR], ids=lambda p: p.name
)
def test_exercises_have_solutions(path: Path):
    """A notebook that sets exercises has a solutions notebook with one solution each."""
    exercises = sorted({int(n) for n in EXERCISE.findall(_markdown(path))})
    if path.name in WITHOUT_EXERCISES:
        assert not exercises, f"{path.name} now sets exercises: drop it from WITHOUT_EXERCISES"
        assert not _solutions_of(path).exists()
        return
    assert 3 <= len(exercises) <= 5, f"{path.name} sets {len(exercises)} exercises"
    solutions_path = _solutions_of(path)
    assert solutions_path.exists(), f"{path.name} sets exercises; add {solutions_path.name}"
    solved = sorted({int(n) for n in SOLUTION.findall(_markdown(solutions_path))})
    assert solved == exercises, (
        f"{path.name} sets exercises {exercises}, {solutions_path.name} solves {solved}"
    )


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the IHDR chunk of a PNG."""
    assert data.startswith(PNG_SIGNATURE), "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _check_image(data: bytes, where: str) -> None:
    width, height = _png_size(data)
    assert width > 50 and height > 50, f"{where}: a {width}x{height} image"
    image = pytest.importorskip("matplotlib.image").imread(io.BytesIO(data))
    # A figure whose axes, lines and labels were drawn is not one flat colour.
    assert float(image[..., :3].std()) > 0.01, f"{where}: the image is blank"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib_inline")
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    assert "python3" in specs, f"no python3 kernel found (have {sorted(specs)}); install ipykernel"
    # The kernel inherits this environment (and, with the test's interpreter substituted
    # for "python" by jupyter_client, the same venv).  The inline backend renders every
    # shown figure to PNG, text included.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = _read(path)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    images = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        assert all(o.get("output_type") != "error" for o in outputs), f"{path.name}: cell {i}"
        pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
        if "plt.show()" in cell.source:
            assert pngs, f"{path.name}: cell {i} calls plt.show() but displayed no image"
        for png in pngs:
            _check_image(base64.b64decode(png), f"{path.name}, cell {i}")
        images += len(pngs)
    shows = sum(c.source.count("plt.show()") for c in nb.cells if c.cell_type == "code")
    assert images >= shows, f"{path.name}: {shows} plt.show() calls, {images} images rendered"
