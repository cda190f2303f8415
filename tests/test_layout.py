"""The code layout (README, "Code layout"): data flows one way, with no import cycles, and functions stay short.

Layers, bottom to top: ``config``, ``runtime`` and ``processes``; ``cache``; ``model``; ``data``; ``pipeline`` (the
recipes); ``cli``. A module may import from its own layer or below, never above.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import caer

PACKAGE = Path(caer.__file__).parent
LAYERS = {"config": 0, "runtime": 0, "processes": 0, "files": 0, "cache": 1, "model": 2, "data": 3, "pipeline": 4, "cli": 5}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """caer modules that ``name`` imports anywhere in its file (lazy imports inside functions included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES and m != name}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else -1  # the top-level package ``caer`` itself


def test_every_module_sits_in_a_layer():
    assert {n.split(".")[1] for n in MODULES if n != "caer"} == set(LAYERS)


def test_imports_point_down_or_sideways_never_up():
    upward = [(a, b) for a in MODULES for b in imports_of(a) if layer(b) > layer(a)]
    assert not upward, f"imports against the layering: {upward}"


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_relative_and_lazy_imports():
    """Guards the two tests above against passing vacuously."""
    assert "caer.pipeline.train" in imports_of("caer.cli")  # a lazy import inside a command
    assert "caer.runtime" in imports_of("caer.pipeline.train")  # ``from .. import runtime``
    assert "caer.model.encoder" in imports_of("caer.data.datasets")  # ``from ..model.encoder import ...``


def test_functions_are_short():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_ruff_finds_nothing():
    """Lint and import order (rules in pyproject.toml) over the package, the tests and the benchmarks."""
    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "caer", "tests", "bench"],
                            cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
