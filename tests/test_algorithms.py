"""The algorithms (`cfg.algorithm.name`) are plug-ins: one registry, one YAML and one test
row each, and no core module that branches on their names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from combinations import GROUPS, ROWS_FILE
from conftest import ROOT
from omegaconf import OmegaConf

from fedllm_flwr.algorithms.base import Algorithm
from fedllm_flwr.algorithms.compat import ALGORITHMS as CONFIG_ALGORITHMS
from fedllm_flwr.algorithms.registry import ALGORITHMS, algorithm_for
from fedllm_flwr.config import load_cfg

#: Where the name may be read: the plug-ins themselves and the config's checks.
OWNERS = (ROOT / "fedllm_flwr" / "algorithms", ROOT / "fedllm_flwr" / "config")


def _reads_of_algorithm_name(path: Path) -> list[int]:
    """Lines of `path` that read `<anything>.algorithm.name`."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "name"
        and isinstance(node.value, ast.Attribute) and node.value.attr == "algorithm"
    ]  # fmt: skip


def test_no_core_module_branches_on_the_algorithm_name():
    files = [*(ROOT / "fedllm_flwr").rglob("*.py"), ROOT / "client_app.py", ROOT / "server_app.py"]
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in files
        if not any(path.is_relative_to(owner) for owner in OWNERS)
        for line in _reads_of_algorithm_name(path)
    ]
    assert not found, "ask the plug-in (fedllm_flwr.algorithms.registry.algorithm_for) instead: " + ", ".join(found)


def _algorithm_of(selecting: list[str]) -> str:
    """The algorithm a test row's overrides select (none: the default)."""
    names = [o.split("=", 1)[1] for o in selecting if o.startswith("algorithm=")]
    return names[-1] if names else "none"


def test_registry_yaml_config_and_test_rows_name_the_same_algorithms():
    registry = set(ALGORITHMS)
    shipped = {p.stem: OmegaConf.load(p).name for p in (ROOT / "conf" / "algorithm").glob("*.yaml")}
    assert all(stem == name for stem, name in shipped.items()), shipped  # each YAML is named by its algorithm
    assert set(shipped.values()) == registry == set(CONFIG_ALGORITHMS)
    in_groups = {_algorithm_of(selecting) for selecting in GROUPS["algorithm"].values()}
    in_rows = {_algorithm_of(GROUPS["algorithm"][row["algorithm"]]) for row in json.loads(ROWS_FILE.read_text())}
    assert in_groups == in_rows == registry
    assert all(issubclass(plugin, Algorithm) for plugin in ALGORITHMS.values())


def test_each_shipped_algorithm_config_finds_its_plug_in():
    for name in ALGORITHMS:
        assert type(algorithm_for(load_cfg([f"algorithm={name}"]))) is ALGORITHMS[name]
