"""The package's import graph: acyclic, and every module imports only its own layer or those below.

Read from the source (``ast``, :func:`forwardinf.hashing.imported_names`), so imports inside functions
count too; the package's modules are not imported.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator

from forwardinf.hashing import imported_names

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import modules of its own layer and of layers below it, never above.
LAYERS = [
    # the bottom layer: file and hash utilities, and the two contracts everything is written against
    ["forwardinf._version", "forwardinf.io", "forwardinf.hashing", "forwardinf.memory", "forwardinf.data.inputs", "forwardinf.tasks.base"],
    ["forwardinf.core"],
    ["forwardinf.tasks", "forwardinf.data", "forwardinf.models", "forwardinf.metrics", "forwardinf.storage"],
    # scoring.loaders: the user's model and data for `forwardinf score` (library code, no printing)
    ["forwardinf.estimators", "forwardinf.distributed", "forwardinf.training", "forwardinf.scoring.loaders"],
    ["forwardinf.baselines"],
    ["forwardinf.workloads"],  # experiment material: recipes, training of the experiments' models
    ["forwardinf.experiments", "forwardinf.scoring", "forwardinf.cli", "forwardinf"],
]
# Library code reports through return values, warnings and logging; only the experiments and the
# commands print (their tables are the output).
PRINTING = ("forwardinf.experiments", "forwardinf.scoring.command", "forwardinf.cli")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in (SRC / "forwardinf").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports: a package and, in ``from pkg import x``, ``pkg.x`` when a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for base, names in imported_names(path.read_text(), package):
        found |= {t for t in [base, *(f"{base}.{a}" for a in names)] if t in mods and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(name: str) -> int:
    # the most specific prefix wins: "forwardinf.data.inputs" is in the bottom layer, "forwardinf.data.loaders" is not
    best = max(((len(p), i) for i, layer in enumerate(LAYERS) for p in layer
                if name == p or name.startswith(p + ".")), default=None)
    assert best is not None, f"{name} is in no layer: add it to LAYERS in {__file__}"
    return best[1]


def test_every_module_imports_only_its_layer_or_below():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_core_imports_only_core_and_the_bottom_layer():
    for m, deps in _graph().items():
        if m == "forwardinf.core" or m.startswith("forwardinf.core."):
            assert all(_layer(d) <= 1 for d in deps), (m, deps)


def test_import_graph_is_acyclic():
    graph, done, path = _graph(), set(), []

    def visit(m: str) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def _nodes(library_only: bool) -> Iterator[tuple[str, ast.AST]]:
    """``(file, node)`` over the syntax trees of the package (of the library part: no experiments, no cli)."""
    for name, path in _modules().items():
        if not (library_only and name.startswith(PRINTING)):
            for node in ast.walk(ast.parse(path.read_text())):
                yield str(path.relative_to(SRC)), node


def test_library_code_does_not_print():
    offenders = [f"{f}:{node.lineno}" for f, node in _nodes(library_only=True)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert not offenders, "use logging (or return the text) instead of print: " + ", ".join(offenders)


def test_library_code_does_not_import_matplotlib():
    # matplotlib is the optional extra "plots": only the experiments' figures may use it
    users = []
    for f, node in _nodes(library_only=True):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        users += [f"{f}:{node.lineno}" for m in mods if m.split(".")[0] == "matplotlib"]
    assert not users, users


def test_no_absolute_machine_paths_in_the_package():
    # Data live where the loaders document (FORWARDINF_DATA, the user cache, Debian's dataset packages).
    allowed = re.compile(r"^/usr/share/datasets/")
    found = [f"{f}: {m.group()}" for f, node in _nodes(library_only=False)
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             for m in re.finditer(r"(?<![\w.~$}])/(?:work|home|mnt|data|tmp|Users|scratch)/[\w./-]*", node.value)
             if not allowed.match(m.group())]
    assert not found, found
