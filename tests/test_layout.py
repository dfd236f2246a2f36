"""The house rules that code review would otherwise have to remember."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "fedllm_flwr"
#: The tooling around runs (harnesses, sweeps, reports, the command): not shipped to sites.
TOOLS = ROOT / "fedllm_tools"
APPS = (ROOT / "server_app.py", ROOT / "client_app.py")


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
    files = {module_name(p): p for p in [*PACKAGE.rglob("*.py"), *TOOLS.rglob("*.py"), *APPS]}
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


def core_files() -> dict[str, Path]:
    """What a FAB ships and a site runs: the two apps and the core package."""
    return {module_name(p): p for p in [*PACKAGE.rglob("*.py"), *APPS]}


def test_the_core_never_imports_the_tooling():
    tools = {module_name(p) for p in TOOLS.rglob("*.py")}
    assert "fedllm_tools.cli" in tools  # the check below looks at the package that holds the tooling
    wrong = {name: sorted(used) for name, path in core_files().items() if (used := imports_of(path, tools))}
    assert not wrong, f"core modules importing the tooling (which sites do not receive): {wrong}"


def test_every_core_module_is_reached_from_the_apps():
    """The core package is what the ServerApp and ClientApp import (at the top or
    inside a function): a module they never reach is tooling, and belongs in
    fedllm_tools rather than in every FAB."""
    files = core_files()
    reached, todo = set(), ["server_app", "client_app"]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += imports_of(files[name], set(files))
    assert sorted(set(files) - reached) == []


#: A config group whose value picks behaviour -> the one place that may branch on it (besides
#: fedllm_flwr/config/, which checks the values): its plug-in package or module.
GROUP_HOMES = {
    "task": "tasks", "reward_loss": "tasks", "dpo_loss": "tasks", "algorithm": "algorithms",
    "strategy": "strategy", "scenario": "strategy", "privacy": "privacy", "compression": "compression",
    "peft": "peft_methods", "dataset": "data",
}  # fmt: skip


def group_name_branches(root: Path) -> list[str]:
    """Every comparison of `<...>.<group>.name` (or `.method`) outside the group's home."""
    found = []
    for path in sorted([*(root / "fedllm_flwr").rglob("*.py"), root / "client_app.py", root / "server_app.py"]):
        if not path.is_file():
            continue
        rel = path.relative_to(root)
        home = rel.parts[1].removesuffix(".py") if rel.parts[0] == "fedllm_flwr" and len(rel.parts) > 1 else ""
        if home == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                if not (isinstance(side, ast.Attribute) and side.attr in ("name", "method")):
                    continue
                group = side.value.attr if isinstance(side.value, ast.Attribute) else None
                if group in GROUP_HOMES and home != GROUP_HOMES[group]:
                    found.append(f"{rel}:{node.lineno} {group}.{side.attr}")
    return found


def test_no_code_branches_on_a_groups_name_outside_its_own_home():
    """A feature's behaviour is asked of its plug-in (`task_of`, `algorithm_for`, the strategy
    registry, the privacy package), never picked by testing its name elsewhere."""
    assert group_name_branches(ROOT) == []


def test_the_branch_finder_sees_a_branch_on_a_name(tmp_path):
    (tmp_path / "fedllm_flwr" / "server").mkdir(parents=True)
    (tmp_path / "fedllm_flwr" / "server" / "x.py").write_text("if cfg.algorithm.name == 'zo':\n    pass\n")
    (tmp_path / "fedllm_flwr" / "tasks").mkdir()
    (tmp_path / "fedllm_flwr" / "tasks" / "y.py").write_text("ok = cfg.task.name in ('lm',)\n")
    assert group_name_branches(tmp_path) == ["fedllm_flwr/server/x.py:1 algorithm.name"]


def test_each_plug_in_declaration_imports_only_other_declarations():
    """A family's `compat` module (its names, kinds and conflicts) is read by the config,
    which every plug-in's code imports: a declaration may import only other declarations,
    and every package above one must import nothing of ours, or the config would load
    plug-in code (and the import graph would cycle)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    declarations = {module_name(p): p for p in PACKAGE.rglob("compat.py")}
    assert {"fedllm_flwr.compat", "fedllm_flwr.strategy.compat", "fedllm_flwr.algorithms.zo.compat"} <= set(
        declarations
    )

    def packages_above(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    packages = {name for name in modules if (ROOT / name.replace(".", "/") / "__init__.py").is_file()}
    wrong, heavy_packages = {}, set()
    for name, path in declarations.items():
        used = imports_of(path, modules)
        if bad := sorted(m for m in used if m not in declarations and m not in packages):
            wrong[name] = bad
        heavy_packages |= {p for p in (used & packages) | packages_above(name)}
    assert not wrong, f"declarations importing plug-in code: {wrong}"
    loaded = {
        p: sorted(used)
        for p in heavy_packages
        if (used := imports_of(ROOT / p.replace(".", "/") / "__init__.py", modules))
    }
    assert not loaded, f"packages above a declaration that import our modules: {loaded}"


def test_every_module_reads_in_one_sitting():
    """~400 lines at most (the style guide's measure): a longer module holds two things."""
    long = {str(p.relative_to(ROOT)): n for p in [*PACKAGE.rglob("*.py"), *TOOLS.rglob("*.py"), *APPS]
            if (n := len(p.read_text().splitlines())) > 400}  # fmt: skip
    assert not long, long
