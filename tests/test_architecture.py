"The shape of the package: no import cycle between its modules, and the command-line module imported by none."
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent/"fundus_lab"


def imported_modules(path:Path) -> set[str]:
    "The fundus_lab modules a file imports anywhere in it (at the top or inside a function)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 0 and not base.startswith("fundus_lab."): continue
            base = base.removeprefix("fundus_lab.")
            names = [base] if base else [a.name for a in node.names]
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fundus_lab."))
    return found


def import_graph() -> dict[str, set[str]]:
    "module -> the package modules it imports."
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "_modidx")}
    return {m: imported_modules(PACKAGE/f"{m}.py") & modules - {m} for m in sorted(modules)}


def find_cycle(graph:dict[str, set[str]]) -> list[str] | None:
    "One import cycle as a list of modules (first = last), or None."
    state, stack = {}, []
    def visit(m):
        state[m] = "open"; stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open": return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)): return cycle
        state[m] = "done"; stack.pop()
    for m in graph:
        if m not in state and (cycle := visit(m)): return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_seen_at_top_and_in_functions(tmp_path):
    source = tmp_path/"m.py"
    source.write_text("from .core import x\nimport fundus_lab.data\ndef f():\n    from fundus_lab.train import y\n    from . import cli\n")
    assert imported_modules(source) == {"core", "data", "train", "cli"}


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_no_module_imports_the_command_line():
    assert [m for m, targets in import_graph().items() if "cli" in targets] == []


def function_lengths() -> dict[str, int]:
    "'module.function' -> its length in lines (decorators and signature included), for every function of the package."
    lengths = {}
    for path in PACKAGE.glob("*.py"):
        if path.stem == "_modidx": continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lengths[f"{path.stem}.{node.name}:{node.lineno}"] = node.end_lineno - start + 1
    return lengths


def test_every_function_fits_on_a_screen():
    longest = sorted(function_lengths().items(), key=lambda kv: -kv[1])[:3]
    assert longest[0][1] < 80, longest


def test_tasks_are_dispatched_through_the_registry():
    "Task-specific behaviour lives in the `Task` classes of the training chapter, not in `task == ...` chains."
    branching = {p.stem: p.read_text().count("task ==") for p in PACKAGE.glob("*.py")}
    assert {m: n for m, n in branching.items() if n} == {}
