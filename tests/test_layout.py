"""The package's shape: no import circles, llama.cpp only under engines/, `--engine` from the
registry, and no click outside the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import click

from malt_local.cli import cli
from malt_local.engines import ENGINES, engine_names
from tests.conftest import ROOT

PACKAGE = ROOT / "malt_local"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Modules imported when the module is imported: everything outside function bodies and
    `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    visit([child])

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = top_level_imports(tree, name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    # The checker itself can fail: a planted circle is found, a chain is not.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import x\nfrom . import y\ndef f():\n    import z\n")
    assert top_level_imports(tree, "p.m", False) == {"x", "p", "p.y"}


def test_malt_local_has_no_import_cycle():
    graph = import_graph()
    assert "malt_local.engines.registry" in graph and "malt_local.run.judge" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def imports_anywhere(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out


def test_llama_cpp_only_under_engines_llama_and_click_only_in_cli():
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        used = imports_anywhere(path)
        if "llama_cpp" in used:
            assert rel.startswith("engines/llama/"), rel
        if "click" in used:
            assert rel.startswith("cli/"), rel
    # The old top-level llama.cpp modules are gone.
    for old in ("engine", "llama_engine", "batched_engine", "adapters", "chat"):
        assert not (PACKAGE / f"{old}.py").exists(), old


def test_engine_choices_are_the_registry_names():
    names = engine_names()
    assert names == list(ENGINES) and {"batched", "simple", "openai"} <= set(names)
    for command in ("run", "eval"):
        option = next(p for p in cli.commands[command].params if p.name == "engine_kind")
        assert isinstance(option.type, click.Choice)
        assert list(option.type.choices) == names, command
