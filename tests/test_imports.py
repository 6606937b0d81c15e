"""The import graph of greencode_jax, read from the code, is the one docs/architecture.md draws:
package by package, the imports at module top and the lazy ones (inside functions), no cycle among
the imports at module top (between packages or between modules), and nothing but `cli` imports `cli`."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "greencode_jax"
TOP_MODULES = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _package(module: str) -> str | None:
    """'greencode_jax.train.loop' -> 'train'; a top-level module (errors, atomic, ...) -> 'top'."""
    parts = module.split(".")
    if parts[0] != "greencode_jax":
        return None
    return "top" if len(parts) == 1 or parts[1] in TOP_MODULES else parts[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, at module top?) for every `import` of ours in the file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "greencode_jax":  # `from greencode_jax import interrupts`: the module itself
                names += [f"greencode_jax.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "greencode_jax":
                yield name, id(node) in top


def code_graph():
    """{package: set of packages} at module top and lazily (a lazy edge also at top is not repeated)."""
    top, lazy = defaultdict(set), defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        source = _package(_module_name(path))
        for name, at_top in _imports(path):
            target = _package(name)
            if target != source:
                (top if at_top else lazy)[source].add(target)
    return ({k: v for k, v in top.items()},
            {k: v - top.get(k, set()) for k, v in lazy.items() if v - top.get(k, set())})


def documented_graph():
    """The graph drawn in docs/architecture.md's import-graph block: `pkg -> a, b` (module top) and
    `pkg ~> c, d` (lazy, inside functions)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- import graph: held by tests/test_imports.py -->\n```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no import-graph block"
    top, lazy = {}, {}
    for line in block.group(1).splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\w+)\s+(->|~>)\s*(.*)", line)
        assert match, f"unreadable line in the import-graph block: {line!r}"
        names = {n.strip() for n in match.group(3).split(",") if n.strip()}
        (top if match.group(2) == "->" else lazy)[match.group(1)] = names
    return ({k: v for k, v in top.items() if v}, {k: v for k, v in lazy.items() if v})


def test_the_package_graph_is_the_documented_one():
    assert code_graph() == documented_graph()


def _cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_cycle_among_imports_at_module_top():
    packages, _ = code_graph()
    assert _cycle({k: v - {"top"} for k, v in packages.items()}) is None
    modules = defaultdict(set)
    known = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        source = _module_name(path)
        for name, at_top in _imports(path):
            # `from greencode_jax.x import y` loads x's __init__ first: an edge to the package, then the module
            if at_top and name in known and name != source and not source.startswith(name + "."):
                modules[source].add(name)
    assert _cycle(modules) is None


def test_nothing_but_cli_imports_cli_and_only_cli_imports_bench():
    top, lazy = code_graph()
    for graph in (top, lazy):
        assert [p for p, targets in graph.items() if "cli" in targets and p != "cli"] == []
        assert [p for p, targets in graph.items() if "bench" in targets and p not in ("cli", "bench")] == []
