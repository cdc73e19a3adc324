"""The package's shape, as rules: no import circles; one package per command, mirroring `cli/`;
a module at the top only when two or more packages use it; click only in `cli/`, llama.cpp only
in `engines/llama/`, rich only in `cli/` and `view/`; `--engine` from the registry."""

from __future__ import annotations

import ast
import importlib
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


# Third-party packages and the only folders of malt_local/ that may import them.
CONFINED = {"click": ("cli/",), "llama_cpp": ("engines/llama/",), "rich": ("cli/", "view/")}


def confinement_breaches(files: dict[str, set[str]]) -> list[str]:
    """'path: package' for each file importing a confined package outside its folders."""
    return [
        f"{rel}: {package}"
        for rel, used in sorted(files.items())
        for package, homes in CONFINED.items()
        if package in used and not rel.startswith(homes)
    ]


def test_click_llama_cpp_and_rich_stay_in_their_folders():
    files = {p.relative_to(PACKAGE).as_posix(): imports_anywhere(p) for p in PACKAGE.rglob("*.py")}
    assert "rich" in files["cli/_progress.py"] and "llama_cpp" in files["engines/llama/model.py"]
    assert confinement_breaches(files) == []
    # The checker can fail: rich in the library, click in a package, llama_cpp beside it.
    planted = {
        "run/tree.py": {"rich"},
        "export/pipeline.py": {"click"},
        "engines/base.py": {"llama_cpp"},
    }
    assert confinement_breaches(planted) == [
        "engines/base.py: llama_cpp",
        "export/pipeline.py: click",
        "run/tree.py: rich",
    ]


def top_level_users(package: Path) -> dict[str, set[str]]:
    """For each module at the top of the package, the sub-packages that import it (anywhere in
    a file, lazy imports included)."""
    tops = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    users: dict[str, set[str]] = {top: set() for top in tops}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).parts
        if len(parts) == 1:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                bits = name.split(".")
                if len(bits) > 1 and bits[0] == package.name and bits[1] in tops:
                    users[bits[1]].add(parts[0])
    return users


def test_a_module_stays_at_the_top_only_when_two_packages_use_it():
    users = top_level_users(PACKAGE)
    assert {"errors", "paths", "roles", "gguf", "hashing", "progress"} <= set(users)
    lonely = {top: sorted(by) for top, by in users.items() if len(by) < 2}
    assert lonely == {}, f"move each into the one package that uses it: {lonely}"


def test_the_checker_finds_a_top_module_with_one_user(tmp_path):
    package = tmp_path / "pkg"
    (package / "run").mkdir(parents=True)
    (package / "cli").mkdir()
    (package / "common.py").write_text("")
    (package / "lonely.py").write_text("")
    (package / "run" / "a.py").write_text("from pkg import common\nfrom pkg.lonely import x\n")
    (package / "cli" / "b.py").write_text("def f():\n    import pkg.common\n")
    assert top_level_users(package) == {"common": {"run", "cli"}, "lonely": {"run"}}


def test_one_cli_module_per_command():
    """`malt_local/cli/` reads like `malt --help`: a module for each command, named after it,
    plus the shared options, the progress bars and the signal handling."""
    modules = {p.stem for p in (PACKAGE / "cli").glob("*.py")}
    commands = set(cli.commands)
    assert {"run", "status", "show", "export", "eval", "train", "pull", "view"} <= commands
    assert modules - {"__init__", "_options", "_progress", "interrupts"} == commands
    for name in commands:
        module = importlib.import_module(f"malt_local.cli.{name}")
        assert module.command is cli.commands[name], name


def test_every_command_has_its_package():
    """Each command's work lives in a package of its own (or a shared one it names)."""
    homes = {"run": "run", "status": "run", "show": "run", "export": "export",
             "eval": "evaluate", "train": "training", "pull": "models", "models": "models",
             "view": "view", "db": "db", "tasks": "tasks", "questions": "questions",
             "study": "study"}  # fmt: skip
    assert set(homes) == set(cli.commands)
    for command, package in homes.items():
        assert (PACKAGE / package / "__init__.py").exists(), package
        source = (PACKAGE / "cli" / f"{command}.py").read_text()
        # `malt db path` only prints where the store is: the one command with no work to call.
        assert command == "db" or f"malt_local.{package}" in source, f"cli/{command}.py"


def test_old_flat_modules_are_gone():
    old = ("engine", "llama_engine", "batched_engine", "adapters", "chat", "runner", "runs",
           "tree", "credit", "fit", "judge", "report", "store", "migrations", "claims",
           "registry", "hub", "question_files", "questions", "voting", "evaluate", "export",
           "bench", "llama_server", "interrupts")  # fmt: skip
    assert [name for name in old if (PACKAGE / f"{name}.py").exists()] == []
    assert not (PACKAGE / "training" / "base.py").exists()


def test_engine_choices_are_the_registry_names():
    names = engine_names()
    assert names == list(ENGINES) and {"batched", "simple", "openai"} <= set(names)
    for command in ("run", "eval"):
        option = next(p for p in cli.commands[command].params if p.name == "engine_kind")
        assert isinstance(option.type, click.Choice)
        assert list(option.type.choices) == names, command
