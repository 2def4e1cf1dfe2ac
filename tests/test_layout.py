"""The package's shape: verbs at the top, parts in subpackages, imports that only go down or sideways, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "phi3tune"
VERBS = {"cli", "train", "evaluate", "merge", "chat", "report", "data_check", "plan", "export", "errors", "__main__"}
SUBPACKAGES = {"config", "data", "model", "training", "fastpath", "evaluation"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phi3tune"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("phi3tune"))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_top_level_holds_only_verbs_and_subpackages() -> None:
    files = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert files <= VERBS, files - VERBS
    assert folders == SUBPACKAGES


def test_subpackages_never_import_the_verbs() -> None:
    modules = _modules()
    verbs = {f"phi3tune.{v}" for v in VERBS - {"errors"}}
    upward = {name: sorted(_imports(path, top_level_only=False) & verbs) for name, path in modules.items()
              if name.count(".") >= 2 or name in {f"phi3tune.{s}" for s in SUBPACKAGES}}
    assert not {k: v for k, v in upward.items() if v}


def test_module_imports_have_no_cycles() -> None:
    modules = _modules()
    def own_package(name: str) -> str:
        return ".".join(name.split(".")[:2])

    # A module never waits on its own package's __init__ (Python has begun it already).
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name
                    and not (m == own_package(name) and name != m)}
             for name, path in modules.items()}
    # Importing phi3tune.pkg.mod from outside pkg runs phi3tune.pkg's __init__ first.
    for name in list(graph):
        for target in list(graph[name]):
            package = ".".join(target.split(".")[:2])
            if package in graph and package != target and not name.startswith(package):
                graph[name].add(package)
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_modules_stay_small() -> None:
    # attention.py keeps its reference path and kernel glue together (docs/design.md, "Layout").
    allowed = {"phi3tune/fastpath/attention.py": 360}
    sizes = {str(p.relative_to(REPO_ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_big = {k: v for k, v in sizes.items() if v > allowed.get(k, 330)}
    assert not too_big, too_big
