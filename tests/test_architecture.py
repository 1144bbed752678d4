"""The package's architecture: no import cycles, and every layer imports only downwards.

Layers, lowest first (README "Architecture"):

0. core: ``fixedpoint`` itself, ``result``, ``maps``, ``methods/*``, ``solve``,
   ``precision``, ``causality`` (and ``levels_probe``, which reads the map only);
1. ``fixedpoint.testing`` (synthetic systems, assertions, hypothesis strategies);
2. shared services: ``quality``, ``data``, ``atomic``, ``distributed``, ``benchmark``;
3. applications: ``tarflow``, ``diffusion``, ``finc`` (and ``demo``, the demo command's
   implementation);
4. the command line: ``cli``, ``__main__``;
5. ``studies`` (outside the package).

A module may import its own layer or lower ones: the core imports no testing helper,
service or application; testing imports only the core; services import only the core,
testing and other services; applications import no CLI and no study; the CLI imports no
study.  Imports are read statically with :mod:`ast` (also those inside functions, which
run later but are dependencies all the same; not those under ``if TYPE_CHECKING:``), so
the test needs no import of the package and sees lazy imports too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fixedpoint"

# (layer, module prefixes); a module belongs to the layer of its longest matching prefix.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("fixedpoint", "fixedpoint.result", "fixedpoint.maps", "fixedpoint.methods",
              "fixedpoint.solve", "fixedpoint.precision", "fixedpoint.causality",
              "fixedpoint.levels_probe")),
    ("testing", ("fixedpoint.testing",)),
    ("services", ("fixedpoint.quality", "fixedpoint.data", "fixedpoint.atomic",
                  "fixedpoint.distributed", "fixedpoint.benchmark")),
    ("applications", ("fixedpoint.tarflow", "fixedpoint.diffusion", "fixedpoint.finc",
                      "fixedpoint.demo")),
    ("cli", ("fixedpoint.cli", "fixedpoint.__main__")),
    ("studies", ("studies",)),
)
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}


# ----------------------------------------------------------------------------------------
# Reading the import graph
# ----------------------------------------------------------------------------------------
def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir``."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of ``tree``, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _under_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imported_names(module: str, path: Path) -> set[str]:
    """Absolute dotted names ``module`` imports: ``a.b`` for ``import a.b``, and both
    ``base`` and ``base.name`` for ``from base import name`` (a name may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in _imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            parts = package.split(".")
            anchor = parts[: len(parts) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        names.add(base)
        names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports (resolved to the longest
    existing module name).  A module's import of one of its own parent packages is
    dropped: Python runs the parent first anyway, and it is how a package's own
    ``__init__`` re-exports are read, not a dependency that can form a cycle."""
    modules = module_files(package_dir)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for name in imported_names(module, path):
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if not target or target == module or module.startswith(target + "."):
                continue
            graph[module].add(target)
    return graph


def external_imports(package_dir: Path, top: str) -> dict[str, set[str]]:
    """Module -> imported names whose first component is ``top`` (e.g. ``studies``)."""
    found = {}
    for module, path in module_files(package_dir).items():
        hits = {n for n in imported_names(module, path) if n.split(".")[0] == top}
        if hits:
            found[module] = hits
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a (layer) imports b (layer)"`` for every import of a higher layer."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = layer_of(module), layer_of(target)
            if a is not None and b is not None and RANK[b] > RANK[a]:
                bad.append(f"{module} ({a}) imports {target} ({b})")
    return bad


# ----------------------------------------------------------------------------------------
# The package
# ----------------------------------------------------------------------------------------
GRAPH = import_graph(PACKAGE)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in GRAPH if layer_of(m) is None)
    assert not unplaced, f"add these modules to a layer in tests/test_architecture.py: {unplaced}"


def test_no_import_cycles_inside_fixedpoint():
    assert cycles(GRAPH) == [], "import cycles: " + "; ".join(
        " <-> ".join(c) for c in cycles(GRAPH)
    )


def test_every_layer_imports_only_downwards():
    assert upward_imports(GRAPH) == []


@pytest.mark.parametrize("layer", ["core", "testing"])
def test_core_and_testing_import_only_the_core(layer):
    """The two strictest rules, spelled out: the core imports only the core, testing only
    the core (and itself)."""
    allowed = {"core", layer}
    bad = [
        f"{m} imports {t}"
        for m, targets in sorted(GRAPH.items()) if layer_of(m) == layer
        for t in sorted(targets) if layer_of(t) not in allowed
    ]
    assert bad == []


def test_nothing_in_the_package_imports_the_studies():
    assert external_imports(PACKAGE, "studies") == {}


def test_the_core_is_what_the_issue_names():
    core = {m for m in GRAPH if layer_of(m) == "core"}
    for name in ("fixedpoint.result", "fixedpoint.maps", "fixedpoint.methods.base",
                 "fixedpoint.methods.sweep", "fixedpoint.solve", "fixedpoint.precision",
                 "fixedpoint.causality"):
        assert name in core
    assert "fixedpoint.testing.systems" not in core


def test_testing_systems_and_assertions_need_no_hypothesis():
    """Only fixedpoint.testing.strategies imports hypothesis: the systems and the
    assertions load with hypothesis made unimportable."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "from fixedpoint.testing.systems import LinearSystem\n"
        "from fixedpoint.testing import assert_matches_sequential, systems\n"
        "import fixedpoint as fp\n"
        "s = LinearSystem.random(2, 5, 2)\n"
        "assert_matches_sequential(s, s.noise_guess(), fp.Jacobi())\n"
        "assert systems.MarkovSystem is not None\n"
        "try:\n"
        "    systems(max_length=3)\n"
        "except ImportError:\n"
        "    print('strategies need hypothesis')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "strategies need hypothesis"
    users = sorted(m for m, p in module_files(PACKAGE).items()
                   if any(n.split(".")[0] == "hypothesis" for n in imported_names(m, p)))
    assert users == ["fixedpoint.testing.strategies"]


# ----------------------------------------------------------------------------------------
# The checker itself finds what it should (so the tests above can fail)
# ----------------------------------------------------------------------------------------
def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root / "fixedpoint"


def test_checker_finds_a_cycle_through_relative_and_lazy_imports(tmp_path):
    pkg = write_package(tmp_path, {
        "fixedpoint/__init__.py": "from .solve import solve\n",
        "fixedpoint/solve.py": "from .maps import M\n",
        "fixedpoint/maps.py": "def f():\n    from fixedpoint.solve import solve\n",
        "fixedpoint/result.py": "from typing import TYPE_CHECKING\n"
                                "if TYPE_CHECKING:\n    from .solve import solve\n",
    })
    graph = import_graph(pkg)
    assert graph["fixedpoint"] == {"fixedpoint.solve"}
    assert cycles(graph) == [["fixedpoint.maps", "fixedpoint.solve"]]
    assert graph["fixedpoint.result"] == set()  # TYPE_CHECKING imports are not runtime


def test_checker_finds_upward_imports(tmp_path):
    pkg = write_package(tmp_path, {
        "fixedpoint/__init__.py": "",
        "fixedpoint/maps.py": "from .testing import systems\n",
        "fixedpoint/testing/__init__.py": "",
        "fixedpoint/testing/systems.py": "from ..quality import fcd\n",
        "fixedpoint/quality.py": "import fixedpoint.tarflow.model\n",
        "fixedpoint/tarflow/__init__.py": "",
        "fixedpoint/tarflow/model.py": "from ..cli import common\nimport studies.lib\n",
        "fixedpoint/cli/__init__.py": "",
        "fixedpoint/cli/common.py": "from .. import solve\n",
        "fixedpoint/solve.py": "",
    })
    graph = import_graph(pkg)
    assert upward_imports(graph) == [
        "fixedpoint.maps (core) imports fixedpoint.testing (testing)",
        "fixedpoint.maps (core) imports fixedpoint.testing.systems (testing)",
        "fixedpoint.quality (services) imports fixedpoint.tarflow.model (applications)",
        "fixedpoint.tarflow.model (applications) imports fixedpoint.cli (cli)",
        "fixedpoint.tarflow.model (applications) imports fixedpoint.cli.common (cli)",
        "fixedpoint.testing.systems (testing) imports fixedpoint.quality (services)",
    ]
    assert external_imports(pkg, "studies") == {"fixedpoint.tarflow.model": {"studies.lib"}}
    assert cycles(graph) == []
