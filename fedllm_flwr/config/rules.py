"""What combines with what: every plug-in family's declarations, gathered.

Each family declares the settings it cannot serve, and why, in its own `compat` module
(the mechanism: `fedllm_flwr.compat`). One list serves three readers:
`Config.__post_init__` refuses the first conflict a config holds (one line naming both
keys, their values and the reason), the combination tests (tests/test_combinations.py)
check every pair of the matrix's values against it, and the docs' table of what
does not combine is generated from it (`markdown_table`, docs/concepts.md), so the three cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fedllm_flwr.algorithms import compat as algorithms
from fedllm_flwr.compat import Conflict
from fedllm_flwr.peft_methods import compat as peft_methods
from fedllm_flwr.privacy import compat as privacy
from fedllm_flwr.server import compat as server
from fedllm_flwr.strategy import compat as strategy
from fedllm_flwr.tasks import compat as tasks

#: Each family's declarations, by the module that holds them.
DECLARED: dict[str, tuple[Conflict, ...]] = {
    module.__name__: module.CONFLICTS for module in (strategy, peft_methods, server, algorithms, tasks, privacy)
}
RULES: tuple[Conflict, ...] = tuple(rule for rules in DECLARED.values() for rule in rules)


def conflicts(cfg: Any, rules: Iterable[Conflict] = RULES) -> list[Conflict]:
    """The rules `cfg` breaks, in declaration order."""
    return [rule for rule in rules if rule.applies(cfg)]


def check(cfg: Any) -> None:
    """ValueError with the first conflict's one-line message, if `cfg` has any."""
    broken = conflicts(cfg)
    if broken:
        raise ValueError(broken[0].message(cfg))


def markdown_table() -> str:
    """The docs' table: one row per rule, with the module that declares it."""
    lines = ["| setting | does not combine with | why | declared in |", "|---|---|---|---|"]
    for module, rules in DECLARED.items():
        home = module.removeprefix("fedllm_flwr.")
        for rule in rules:
            first = f"`{rule.first.label}`" + (f" (with `{rule.only_if.label}`)" if rule.only_if else "")
            lines.append(f"| {first} | `{rule.second.label}` | {rule.reason} | `{home}` |")
    return "\n".join(lines) + "\n"
