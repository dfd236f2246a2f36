"""The strategy registry's guards: one class per `strategy.name` and `scenario.name`, the
YAML presets and the combination matrix in step with it, nothing else branching on those
names, and nothing assigning a strategy's attributes from outside it."""

import ast
from pathlib import Path

import pytest
from combinations import GROUPS
from conftest import ROOT

from fedllm_flwr.config import load_cfg
from fedllm_flwr.strategy.compat import SCENARIOS as SCENARIO_NAMES
from fedllm_flwr.strategy.compat import STRATEGIES
from fedllm_flwr.strategy.registry import build_strategy

try:
    from fedllm_flwr.strategy.registry import SCENARIO_CLASSES as SCENARIOS
    from fedllm_flwr.strategy.registry import STRATEGY_CLASSES, strategy_class
except ImportError:  # reported by the tests that need them, not by the whole module
    SCENARIOS, STRATEGY_CLASSES, strategy_class = {}, {}, None

PACKAGE = ROOT / "fedllm_flwr"
#: Where code may branch on a strategy's or a scenario's name: the registry and the config check.
OWN_HOMES = (PACKAGE / "strategy", PACKAGE / "config")


def _sources() -> list[Path]:
    return [*PACKAGE.rglob("*.py"), ROOT / "client_app.py", ROOT / "server_app.py"]


def test_every_strategy_has_one_class_one_preset_and_one_matrix_row():
    presets = {p.stem for p in (ROOT / "conf" / "strategy").glob("*.yaml")}
    assert set(STRATEGY_CLASSES) == presets == set(STRATEGIES) == set(GROUPS["strategy"])
    assert all(STRATEGY_CLASSES[name].__name__ == kind for name, kind in STRATEGIES.items())


def test_every_scenario_has_one_class_one_preset_and_one_matrix_row():
    presets = {p.stem for p in (ROOT / "conf" / "scenario").glob("*.yaml")}
    assert set(SCENARIOS) == presets == set(GROUPS["scenario"])
    assert set(SCENARIOS) == set(SCENARIO_NAMES)


@pytest.mark.parametrize("name", sorted(STRATEGY_CLASSES))
def test_each_strategy_name_builds_its_registered_class(name):
    cfg = load_cfg([f"strategy={name}"])
    assert strategy_class(cfg) is STRATEGY_CLASSES[name]
    assert type(build_strategy(cfg)) is STRATEGY_CLASSES[name]


def test_what_clients_read_from_the_config_agrees_with_the_registered_class():
    """Clients do not import the server's strategy classes (ML code stays free of Flower's
    server side): the config says the same things about a strategy as its class does."""
    for name, kind in STRATEGY_CLASSES.items():
        cfg = load_cfg([f"strategy={name}"])
        assert cfg.strategy.ranked == kind.learns_ranks, name
        assert cfg.strategy.merges_stacks == kind.merges_stacks, name
    for name, kind in SCENARIOS.items():
        assert load_cfg([f"scenario={name}"]).scenario.one_holder == kind.holds_all_data, name


def _is_group_name(node: ast.AST) -> bool:
    """`<x>.strategy.name`, `<x>.scenario.name` or `s.name` (the strategy config's usual alias)."""
    if not (isinstance(node, ast.Attribute) and node.attr == "name"):
        return False
    owner = node.value
    return (isinstance(owner, ast.Attribute) and owner.attr in ("strategy", "scenario")) or (
        isinstance(owner, ast.Name) and owner.id == "s"
    )


def test_no_code_outside_the_strategy_package_and_the_config_branches_on_a_strategy_or_scenario_name():
    """A comparison of `cfg.strategy.name` / `cfg.scenario.name` outside their homes means
    a feature of one strategy leaked out of its class: ask the class (or the config) instead."""
    found = []
    for path in _sources():
        if any(path.is_relative_to(home) for home in OWN_HOMES):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(map(_is_group_name, [node.left, *node.comparators])):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def _names_a_strategy(node: ast.AST) -> bool:
    """`strategy`, `strat`, `self.strategy`, `x.inner` (the DP wrapper's strategy) ..."""
    if isinstance(node, ast.Name):
        return "strat" in node.id
    return isinstance(node, ast.Attribute) and ("strat" in node.attr or node.attr == "inner")


def test_no_attribute_is_assigned_to_a_strategy_from_outside_it():
    """A strategy gets what it needs in its constructor (`build_strategy`, `RoundSetup`);
    only its own methods (`self.x = ...`) set its attributes."""
    found = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                for part in ast.walk(target):
                    stored = isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store)
                    if stored and _names_a_strategy(part.value):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{part.attr}")
    assert not found, found


def test_arguments_meant_for_an_override_class_are_not_dropped_without_one():
    with pytest.raises(TypeError, match="ranks go to an `override` class only"):
        build_strategy(load_cfg([]), ranks={1: 2})
