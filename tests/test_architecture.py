"""The module map in docs/architecture.md is the truth: every module is listed, imports only what
its row allows, and no import cycle exists under builder/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "builder"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "builder"


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def imports() -> dict[str, set[str]]:
    """Every builder module → the builder modules it imports anywhere in its file (lazy ones too)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "builder":
                base = node.module.removeprefix("builder").lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    deps.add(sub if _is_module(sub) else (base or "builder"))
            elif isinstance(node, ast.Import):
                deps.update(a.name.removeprefix("builder.") for a in node.names if a.name.startswith("builder."))
        graph[me] = deps - {me}
    return graph


def documented() -> dict[str, set[str]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    rows: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| `([\w.]+)` \| [^|]+ \| ([^|]+) \|", line.strip())
        if m:
            rows[m.group(1)] = set(re.findall(r"`([\w.]+)`", m.group(2)))
    return rows


def test_every_module_is_in_the_module_map_and_nothing_else() -> None:
    assert set(documented()) == set(imports())


def test_every_module_imports_only_what_its_row_allows() -> None:
    allowed = documented()
    extra = {m: sorted(deps - allowed.get(m, set())) for m, deps in imports().items() if deps - allowed.get(m, set())}
    assert extra == {}, f"imports not in docs/architecture.md's module map: {extra}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_under_builder() -> None:
    cycle = find_cycle(imports())
    assert cycle is None, " → ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    graph = imports()
    graph["errors"] = {"cli"}  # errors importing the command line would close a loop
    assert find_cycle(graph) is not None
