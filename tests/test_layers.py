"""The layers of docs/architecture.md hold in the code: a module imports only from its own
layer and the layers below it (imports inside functions included), and the bottom three
layers never import fairseq. The table here and the one in docs/architecture.md must name
the same layers and places."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fairseq_knnvq"

# Bottom to top. A module belongs to the layer of the longest place that holds it.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    (
        "base",
        (
            "files.py",
            "folder_lock.py",
            "checkpoint_safety.py",
            "preflight.py",
            "verdict.py",
            "quiet_logs.py",
            "image_metrics.py",
        ),
    ),
    ("core", ("quantization/",)),
    ("preparation", ("preparation/",)),
    ("fairseq parts", ("__init__.py", "models/", "criterions/", "tasks/", "data/")),
    (
        "library",
        (
            "checkpoints.py",
            "code_histograms.py",
            "launch_checks.py",
            "report.py",
            "study.py",
            "study_launchers.py",
            "hydra_callbacks.py",
            "hf.py",
            "evaluation/",
        ),
    ),
    ("console scripts", ("cli/", "__main__.py")),
]
FAIRSEQ_FREE = ("base", "core", "preparation")


def layer_of(relative: str) -> int:
    """Index in LAYERS of a path relative to the package (``tasks/run_folder.py``)."""
    matches = [
        (len(place), index)
        for index, (_, places) in enumerate(LAYERS)
        for place in places
        if relative == place or (place.endswith("/") and relative.startswith(place))
    ]
    if not matches:
        raise AssertionError(f"fairseq_knnvq/{relative} is in no layer: add it to LAYERS and docs/architecture.md")
    return max(matches)[1]


def module_path(dotted: str) -> str:
    """``fairseq_knnvq.tasks.run_folder`` -> ``tasks/run_folder.py`` (a package: its
    ``__init__.py``; a name inside a module: that module)."""
    parts = dotted.split(".")[1:]
    while parts:
        candidate = PACKAGE.joinpath(*parts)
        if candidate.is_dir():
            return "/".join(parts) + "/__init__.py" if parts else "__init__.py"
        if candidate.with_suffix(".py").is_file():
            return "/".join(parts) + ".py"
        parts = parts[:-1]  # ``from fairseq_knnvq.x import name``: name is not a module
    return "__init__.py"


def imported_modules(relative: str, source: str) -> Iterator[Tuple[int, str]]:
    """(line, dotted name) of every ``fairseq_knnvq`` module that ``source``, standing at
    ``fairseq_knnvq/relative``, imports (relative and function-level imports included)."""
    package_parts = ["fairseq_knnvq", *Path(relative).parent.parts]
    for node in ast.walk(ast.parse(source, relative)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "fairseq_knnvq":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "fairseq_knnvq":
                continue
            for alias in node.names:  # ``from . import models``: the submodule itself
                yield node.lineno, f"{module}.{alias.name}"


def upward_imports(relative: str, source: str) -> List[str]:
    """One line per import of ``source`` from a layer above its own."""
    own = layer_of(relative)
    problems = []
    for line, dotted in imported_modules(relative, source):
        target = layer_of(module_path(dotted))
        if target > own:
            problems.append(
                f"fairseq_knnvq/{relative}:{line} ({LAYERS[own][0]}) imports {dotted} ({LAYERS[target][0]})"
            )
    return problems


def package_files() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_imports_only_its_own_layer_and_those_below():
    problems = []
    for path in package_files():
        problems += upward_imports(path.relative_to(PACKAGE).as_posix(), path.read_text())
    assert problems == []


def test_an_upward_import_is_reported():
    """A lazy, relative import of a task inside the core, and an absolute one of the
    library from a fairseq part."""
    core = (PACKAGE / "quantization" / "knn.py").read_text()
    lazy = core + "\n\ndef _lazy():\n    from ..tasks import run_folder\n"
    line = len(lazy.splitlines())
    assert upward_imports("quantization/knn.py", lazy) == [
        f"fairseq_knnvq/quantization/knn.py:{line} (core) imports fairseq_knnvq.tasks.run_folder (fairseq parts)"
    ]
    assert upward_imports("tasks/x.py", "from fairseq_knnvq.report import parse_log_lines\n") == [
        "fairseq_knnvq/tasks/x.py:1 (fairseq parts) imports fairseq_knnvq.report.parse_log_lines (library)"
    ]
    assert upward_imports("cli/x.py", "from ..quantization import knn\nimport fairseq_knnvq\n") == []


def test_every_module_is_in_a_layer():
    for path in package_files():
        layer_of(path.relative_to(PACKAGE).as_posix())  # raises for a module in no layer


def architecture_table() -> Dict[str, List[str]]:
    """layer name -> the places (backticked paths) that docs/architecture.md's Layers table
    gives it."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    table: Dict[str, List[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("layer", "---") and not set(cells[0]) <= {"-"}:
            table[cells[0]] = re.findall(r"`([^`]+)`", cells[1])
    return table


def test_docs_architecture_names_the_same_layers_and_places():
    table = architecture_table()
    package_layers = {name: sorted(places) for name, places in LAYERS}
    documented = {name: sorted(places) for name, places in table.items() if name in package_layers}
    assert documented == package_layers
    # the repository row (configs, scripts ...) is documented too, outside the package
    assert set(table) - set(package_layers) == {"repository"}
    # listed top to bottom in the docs
    assert [name for name in table if name in package_layers] == [name for name, _ in reversed(LAYERS)]


@pytest.mark.parametrize("layer", FAIRSEQ_FREE)
def test_the_bottom_layers_do_not_import_fairseq(layer):
    """In a fresh interpreter: importing every module of the layer loads no fairseq (and
    the preparation layer no torch either)."""
    places = dict(LAYERS)[layer]
    modules = []
    for path in package_files():
        relative = path.relative_to(PACKAGE).as_posix()
        if LAYERS[layer_of(relative)][0] == layer:
            dotted = ".".join(["fairseq_knnvq", *Path(relative).with_suffix("").parts])
            modules.append(dotted.removesuffix(".__init__"))
    assert modules, places
    forbidden = ["fairseq"] + (["torch"] if layer == "preparation" else [])
    code = (
        "import importlib, sys\n"
        "sys.modules['fairseq_knnvq'] = type(sys)('fairseq_knnvq')\n"  # skip the package __init__
        f"sys.modules['fairseq_knnvq'].__path__ = [{str(PACKAGE)!r}]\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in {forbidden!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", (layer, result.stdout)
