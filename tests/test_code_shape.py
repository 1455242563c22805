"""The codebase's shape, read from its syntax trees (nothing imported or run):

- the core (the top-level modules) imports no module of the built-in world: the world reaches it
  only as a problem source (data.PLUGINS, world/source.py), loaded by name at run time;
- the project's modules import each other without a cycle, counting imports inside functions too;
- train.py's loop stays the paper's step (at most LOOP_LINES lines) and no core function grows past
  FUNCTION_LINES lines;
- no line of the project's Python is wider than LINE_WIDTH characters.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the project's packages beside the core
FOLDERS = ("analysis", "benchmarks", "gram_sets", "scale_out", "world")
LOOP_LINES = 25
FUNCTION_LINES = 60
LINE_WIDTH = 100


def module_files() -> dict[str, Path]:
    """Module name -> file, for the core and the FOLDERS packages."""
    files = {path.stem: path for path in ROOT.glob("*.py") if path.stem != "conftest"}
    for folder in FOLDERS:
        files |= {f"{folder}.{path.stem}": path for path in (ROOT / folder).glob("*.py")
                  if path.stem != "__init__"}
    return files


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (`import a.b`, `from a import b`,
    `from a.b import c`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name in known or name.split(".")[0] in FOLDERS}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path [a, b, ..., a], or None (depth-first search, three
    colours)."""
    state, path = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_core_module_imports_the_world():
    graph = import_graph()
    core = [name for name in graph if "." not in name]
    leaks = {name: sorted(m for m in graph[name] if m.split(".")[0] == "world") for name in core}
    assert core and not {name: found for name, found in leaks.items() if found}


def test_the_modules_import_each_other_without_a_cycle():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"data": {"world.tasks"}, "world.tasks": {"cli", "data"}, "cli": set()}) == [
        "data", "world.tasks", "data"]


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_train_loop_is_short_and_no_core_function_is_long():
    train = next(node
                 for node in ast.walk(ast.parse((ROOT / "train.py").read_text(encoding="utf-8")))
                 if isinstance(node, ast.FunctionDef) and node.name == "train")
    loop = next(node for node in ast.walk(train) if isinstance(node, ast.For))
    assert loop.end_lineno - loop.lineno + 1 <= LOOP_LINES
    long = {f"{path.name}:{name}": lines for path in sorted(ROOT.glob("*.py"))
            for name, lines in function_lengths(path).items() if lines > FUNCTION_LINES}
    assert not long


def test_no_line_is_wider_than_the_width():
    files = [*ROOT.glob("*.py")]
    for folder in (*FOLDERS, "tests"):
        files += (ROOT / folder).glob("*.py")
    wide = [f"{path.relative_to(ROOT)}:{number}" for path in files
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > LINE_WIDTH]
    assert len(files) > 40 and not wide
