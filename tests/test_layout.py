"""The house rules that code review would otherwise have to remember."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "fedllm_flwr"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Our modules that `path` imports anywhere (at the top or inside a function): an
    import inside a function still runs, so it may not hide a cycle either."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            # Importing a.b.c runs a/__init__ and a/b/__init__ first.
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return found


def test_no_import_cycle_among_our_modules():
    files = {module_name(p): p for p in [*PACKAGE.rglob("*.py"), ROOT / "client_app.py", ROOT / "server_app.py"]}
    modules = set(files)
    graph = {}
    for name, path in files.items():
        own_parents = {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}
        # A module's own parent packages import it, not the other way round.
        graph[name] = imports_of(path, modules) - own_parents - {name}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)
