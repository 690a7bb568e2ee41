"""The package's shape, measured: no import circle among busi's modules, no module grown past
what one reader holds in mind, ``busi predict`` never entering evaluation code, and no import
inside a function without the reason it is not at the top.

Imports are read from the source (``ast``), at module level and inside functions alike: an
import hidden in a function is still a dependency, only a later one. Nothing is imported, so
these checks take milliseconds. Run the file as a script to print the cycles and the longest
modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "busi"
MAX_LINES = 450

#: Modules allowed over MAX_LINES (none since issue 14's branches were merged; a name here needs
#: a reason beside it).
TOO_LONG_FOR_NOW: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the busi package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _absolute(node: ast.ImportFrom, name: str) -> str:
    """The module a ``from ... import`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    if not modules()[name].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The busi modules ``name`` imports anywhere in its source. ``from a import b`` counts as
    importing ``a.b`` when that is a module, else ``a``. Imports inside functions count (they
    run, only later); those under ``if TYPE_CHECKING:`` do not: they never run, and a type hint
    naming the config in the module the config reads its registries from is no circle."""
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, name)
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = set(modules())
    return {name: imports_of(name, path, known) for name, path in modules().items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: every
    import circle lies inside one of them."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph[node])
    return seen


def line_counts() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules().items()}


def test_no_import_cycles_among_busi_modules() -> None:
    assert cycles(import_graph()) == []


def test_no_module_is_too_long() -> None:
    long = {name: count for name, count in line_counts().items()
            if count > MAX_LINES and name not in TOO_LONG_FOR_NOW}
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"


def test_the_allow_list_names_existing_modules() -> None:
    assert TOO_LONG_FOR_NOW <= set(modules())


def _in(package: str, names: set[str]) -> set[str]:
    return {name for name in names if name == package or name.startswith(package + ".")}


def test_prediction_never_enters_evaluation() -> None:
    """``busi predict`` must not depend on scoring or training code: the path that delivers masks
    needs inference (model files, runtimes, post-processing) and data only."""
    reached = reachable(import_graph(), "busi.inference.prediction")
    assert not _in("busi.evaluation", reached)
    assert not _in("busi.training", reached)


def test_the_lower_stages_do_not_reach_up() -> None:
    """The pipeline's order shows in the imports: what a model is (models) and how images are
    read (data, but for the run-split module that needs a run folder) know nothing of training,
    inference or evaluation; applying post-processing knows nothing of choosing it."""
    graph = import_graph()
    upper = {"busi.training", "busi.inference", "busi.evaluation", "busi.cli", "busi.notebook"}
    lower = _in("busi.models", set(graph)) | _in("busi.data", set(graph))
    for name in lower - {"busi.data.run_parts"}:
        reached = reachable(graph, name)
        assert not {m for package in upper for m in _in(package, reached)}, name
    assert not _in("busi.evaluation", reachable(graph, "busi.inference.postprocess"))


def test_the_run_folder_is_only_a_folder() -> None:
    """``busi.runs.folder`` names a run's files and keeps its records and lock; what a run is used
    for (the images of its parts, its model and masks, its evaluations) lives with the stage that
    uses it. Naming a folder must not pull those stages in, nor may they become a circle
    through it. (It does reach data modules through the config's registries.)"""
    graph = import_graph()
    direct = graph["busi.runs.folder"]
    assert not _in("busi.data", direct)
    stages = (_in("busi.inference", set(graph)) | _in("busi.evaluation", set(graph))
              | _in("busi.training", set(graph))
              | {"busi.runs.evaluations", "busi.data.parts", "busi.data.run_parts"})
    assert not direct & stages
    assert not reachable(graph, "busi.runs.folder") & stages


MAX_TOP_LEVEL = 13
"""Entries of ``src/busi``: seven stage packages (config, data, models, training, inference,
evaluation, runs) and utils, the two front ends (cli, notebook), errors, the Keras guard that
runs first (_keras) and ``__init__``. A new module goes into the package of its stage."""


def test_the_top_level_holds_the_stages() -> None:
    entries = sorted(path.name for path in PACKAGE.iterdir()
                     if path.name != "__pycache__" and (path.suffix == ".py" or path.is_dir()))
    assert len(entries) <= MAX_TOP_LEVEL, entries
    packages = [path for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"]
    assert all((path / "__init__.py").exists() for path in packages)


def test_each_stage_package_names_a_surface_that_exists() -> None:
    """``busi.inference.predict_images`` and the like: the names a package's ``__init__`` offers
    are defined where it says (imported here, so this test loads TensorFlow)."""
    import importlib

    for package in ("config", "models", "training", "inference", "evaluation", "runs"):
        module = importlib.import_module(f"busi.{package}")
        assert module.__all__, package
        for name in module.__all__:
            assert getattr(module, name) is not None, f"busi.{package}.{name}"


def test_the_checker_sees_function_level_imports() -> None:
    """evaluation scores predictions: it reaches inference, whose import sits where it sits."""
    graph = import_graph()
    assert "busi.inference.predictor" in reachable(graph, "busi.evaluation.evaluator")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: Modules (a package name covers its modules) whose imports inside functions are not checked
#: yet: they were being rewritten (config sections, schedules) when this check came in.
IMPORTS_LEFT_FOR_NOW: set[str] = set()

#: Comments that are tool directives, not reasons.
PRAGMAS = ("type:", "noqa", "pragma:")


def function_imports(path: Path) -> dict[int, ast.stmt]:
    """The imports inside the functions and methods of ``path``, by line; those under ``if
    TYPE_CHECKING:`` never run and are left out."""
    found: dict[int, ast.stmt] = {}
    for function in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.update((node.lineno, node) for node in _runtime_nodes(function)
                         if isinstance(node, (ast.Import, ast.ImportFrom)))
    return found


def reason(line: str) -> str:
    """The comment of a source line without tool directives (``# type: ignore``, ``# noqa``);
    "" when there is none. Only import lines are read, and they hold no strings."""
    parts = line.split("#")[1:]
    return " ".join(part.strip() for part in parts
                    if part.strip() and not part.strip().startswith(PRAGMAS))


def _left_for_now(name: str) -> bool:
    return any(name == left or name.startswith(left + ".") for left in IMPORTS_LEFT_FOR_NOW)


def unexplained_imports() -> list[str]:
    """``module:line: import`` of each import inside a function with no reason on its line."""
    found = []
    for name, path in modules().items():
        if _left_for_now(name):
            continue
        lines = path.read_text().splitlines()
        found += [f"{name}:{line}: {lines[line - 1].strip()}"
                  for line in sorted(function_imports(path)) if not reason(lines[line - 1])]
    return found


def test_imports_inside_functions_say_why() -> None:
    """Imports sit at the top of their module. One inside a function says on its first line why
    it may not: ``# start-up: ...`` (it loads TensorFlow, matplotlib or the like, and its module
    is imported where that must not happen: ``import busi``, ``busi --help``, config checks,
    ``import busi.data``, the inference modules tests/test_export.py keeps light), ``# back
    edge: ...`` (at the top it would close an import circle) or ``# optional: ...`` (a
    dependency that may be missing)."""
    assert unexplained_imports() == []


def test_the_import_check_reads_functions_only(tmp_path: Path) -> None:
    source = tmp_path / "example.py"
    source.write_text(
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    import json\n"
        "def f():\n"
        "    if TYPE_CHECKING:\n"
        "        import csv\n"
        "    import tensorflow  # start-up: TensorFlow\n"
        "    import onnx  # type: ignore[import-not-found]\n"
        "    class A:\n"
        "        def g(self):\n"
        "            from x import y\n"
        "class B:\n"
        "    import sys\n"
    )
    lines = source.read_text().splitlines()
    found = function_imports(source)
    assert sorted(found) == [8, 9, 12]
    assert [line for line in sorted(found) if not reason(lines[line - 1])] == [9, 12]


if __name__ == "__main__":
    graph = import_graph()
    for component in cycles(graph):
        print("cycle among:", ", ".join(component))
    for name, count in sorted(line_counts().items(), key=lambda item: -item[1])[:12]:
        print(f"{count:5d} {name}")
    for found in unexplained_imports():
        print("import inside a function without a reason:", found)
    sys.exit(1 if cycles(graph) else 0)
