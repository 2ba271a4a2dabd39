"""The package's shape: imports point one way (no cycle, lazy imports included) and functions stay short."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hetcomp_dist"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules ``name`` imports anywhere in its body (functions included)."""
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            # `from pkg import submodule` needs the submodule, not what pkg/__init__ imports
            targets = subs if all(s in known for s in subs) else [node.module, *subs]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {n: _imports(n, t, set(modules)) for n, t in modules.items()}
    graph = {n: {d for d in deps if d != "hetcomp_dist"} for n, deps in graph.items()}   # the empty __init__
    done, path = set(), []

    def visit(node: str) -> None:
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_models_import_no_distributed_code():
    modules = _modules()
    for name, tree in modules.items():
        if name.startswith("hetcomp_dist.models"):
            deps = _imports(name, tree, set(modules))
            bad = {d for d in deps if d.startswith(("hetcomp_dist.distributed", "hetcomp_dist.sharding", "hetcomp_dist.distill",
                                                    "hetcomp_dist.teachers", "hetcomp_dist.ray_cluster"))}
            assert not bad, f"{name} imports {bad}"


def test_functions_are_short():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over {} lines:\n".format(MAX_FUNCTION_LINES) + "\n".join(long)
