"""The data package imports downward: training reads through the indexed reader only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, subprocess_env

DATA = REPO / "ling_pretrain" / "data"
READER = "ling_pretrain.data.indexed"
PRETOKENIZE = "ling_pretrain.data.pretokenize"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def data_imports() -> dict[str, set[str]]:
    """Every ``ling_pretrain.data`` module and the data modules it imports anywhere in its
    body, function-local imports included."""
    paths = {module_name(p): p for p in sorted(DATA.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_data():
    graph = data_imports()
    assert PRETOKENIZE + ".run" in graph and READER in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_reader_is_the_bottom_and_only_builtin_runs_the_pretokenizer():
    graph = data_imports()
    assert graph[READER] == set()
    pretokenize = {m for m in graph if m == PRETOKENIZE or m.startswith(PRETOKENIZE + ".")}
    users = {m for m, targets in graph.items() if m not in pretokenize and targets & pretokenize}
    assert users == {"ling_pretrain.data.builtin"}
    assert graph["ling_pretrain.data.gpt"] == {READER, "ling_pretrain.data.builtin"}
    for module in pretokenize - {PRETOKENIZE}:
        assert PRETOKENIZE not in graph[module], f"{module} imports the package's __init__"


def test_reading_indexed_data_does_not_load_the_pretokenizer():
    code = (
        "import sys, ling_pretrain.data.gpt; "
        f"print(sorted(m for m in sys.modules if m.startswith('{PRETOKENIZE}')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "[]"
