"""What combines with what: the mechanism each plug-in declares its limits with.

A plug-in family (PEFT methods, strategies and scenarios, algorithms, tasks, privacy,
personalization and resuming) keeps a `compat` module beside its code, with the
vocabulary the config needs (its names, which of them share a property) and
`CONFLICTS`: every pair of settings it cannot serve, and why. Those modules import
nothing but this one (and each other), so the config reads them without loading any
plug-in's code; `fedllm_flwr.config.rules` gathers them for the config check, the
combination tests and the docs' table (docs/concepts.md).

A rule is two `Setting`s (a condition on one config key each) and a reason; `only_if`
narrows a rule to configs where a third setting holds (`zo.params` only matters under
`algorithm=zo`). Rules on a single key (a value out of range) stay in the key's own
group (`__post_init__` of its dataclass).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: A config group shown by its name, read from the field that holds it.
GROUP_FIELDS = {
    "scenario": "scenario.name", "peft": "peft.method", "strategy": "strategy.name", "algorithm": "algorithm.name",
    "task": "task.name", "privacy": "privacy.name", "compression": "compression.name",
}  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """A condition on one config key: `key` (a group name or a dotted key), true for the
    values `test` accepts; `label` says which, for the docs' table."""

    key: str
    test: Callable[[Any], bool]
    label: str

    def value(self, cfg: Any) -> Any:
        return operator.attrgetter(GROUP_FIELDS.get(self.key, self.key))(cfg)

    def holds(self, cfg: Any) -> bool:
        return bool(self.test(self.value(cfg)))

    def show(self, cfg: Any) -> str:
        """The key and the value this config has: `privacy=secagg`."""
        value = self.value(cfg)
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, list | tuple):
            value = "[" + ",".join(map(str, value)) + "]"
        return f"{self.key}={value}"


def one_of(key: str, *values: Any) -> Setting:
    return Setting(key, lambda v: v in values, f"{key}={'|'.join(map(_text, values))}")


def not_in(key: str, *values: Any) -> Setting:
    return Setting(key, lambda v: v not in values, f"{key}≠{'|'.join(map(_text, values))}")


def is_set(key: str, label: str = "") -> Setting:
    """A number above 0, a non-empty list or string, or true."""
    return Setting(key, bool, label or f"{key} set")


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Conflict:
    """`first` and `second` cannot run together (where `only_if` holds), for `reason`."""

    first: Setting
    second: Setting
    reason: str
    only_if: Setting | None = None

    def applies(self, cfg: Any) -> bool:
        return (self.only_if is None or self.only_if.holds(cfg)) and self.first.holds(cfg) and self.second.holds(cfg)

    def message(self, cfg: Any) -> str:
        return f"{self.first.show(cfg)} cannot be combined with {self.second.show(cfg)}: {self.reason}"

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.first.key, self.second.key) + ((self.only_if.key,) if self.only_if else ())


#: Settings several plug-ins name.
FED_ONLY = not_in("scenario", "fed")
PRIVATE = not_in("privacy", "none")
FT_STEPS = is_set("personalize.ft_steps", "personalize.ft_steps>0")
PRIVATE_TENSORS = is_set("personalize.private")
