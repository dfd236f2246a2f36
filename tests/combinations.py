"""The combination matrix: the groups whose values users combine, how to build any mix of
them quickly, which pairs the config refuses, and a set of rows that covers every pair
the config accepts (tests/test_combinations.py drives each row through a federation).

Building a config through Hydra takes ~0.2 s; the matrix needs over a thousand. Each
value is composed once through Hydra and kept as the keys it changes against the
default config; a combination is the default with its values' changes merged in, then
checked as every config is (`to_config`: the schema, each group's checks and the rules).
`test_combinations.py` checks that this gives the very config Hydra gives, row by row.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

#: Group -> value -> the overrides that select it (the first value is the default).
GROUPS: dict[str, dict[str, list[str]]] = {
    "scenario": {"fed": [], "global": ["scenario=global"], "local": ["scenario=local"]},
    "peft": {m: ([] if m == "lora" else [f"peft={m}"]) for m in (
        "lora", "dora", "adalora", "loha", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "ffa_lora")},
    "strategy": {s: ([] if s == "fedavg" else [f"strategy={s}"]) for s in (
        "fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "mifa", "median", "trimmed_mean", "zero_padding",
        "svd", "stacking")},
    "ranks": {"equal": [], "unequal": ["peft.client_ranks=[2,4]"]},
    "algorithm": {"none": [], "fedot": ["algorithm=fedot", "algorithm.adapter_layers=1"], "zo": ["algorithm=zo"],
                  "zo_full": ["algorithm=zo", "zo.params=full"]},
    "task": {"lm": [], "reward": ["task=reward"], "dpo": ["task=dpo"],
             "grpo": ["task=grpo", "grpo.rewards=[grpo_rewards:parity]", "grpo.group_size=2", "grpo.max_new_tokens=3"]},
    "compression": {"fp16": [], "fp32": ["compression=fp32"], "int8": ["compression=int8"],
                    "topk": ["compression=topk"]},
    "privacy": {"none": [], "dp": ["privacy=dp", "privacy.noise_multiplier=0.5"],
                "secagg": ["privacy=secagg", "privacy.max_weight=100"],
                "dp_sgd": ["privacy=dp_sgd", "privacy.noise_multiplier=0.5"],
                "dp_sgd_target": ["privacy=dp_sgd", "privacy.target_epsilon=8"],
                "dp_sgd_secagg": ["privacy=dp_sgd", "privacy.secagg=true", "privacy.max_weight=100"]},
    "personalize": {"none": [], "ft": ["personalize.ft_steps=1"], "private": ["personalize.private=[PRIVATE]"],
                    "ft_private": ["personalize.ft_steps=1", "personalize.private=[PRIVATE]"]},
    "availability": {"always": [], "uniform": ["strategy.availability=uniform", "strategy.available_p=0.7"],
                     "per_client": ["strategy.availability=per_client", "strategy.available_per_client=[1.0,0.6]"],
                     "category": ["strategy.availability=category", "strategy.available_per_category=[add:0.5]"]},
    "resume": {"no": [], "yes": ["resume=RESUME"]},
    "init": {"seeded": [], "adapter": ["init.adapter=INIT_ADAPTER"]},
    "share_base": {"true": [], "false": ["model.share_base=false"]},
}  # fmt: skip

#: The key each group's values are told apart by in a refusal (the message must name it).
KEYS = {"ranks": "peft.client_ranks", "personalize": "personalize.", "availability": "strategy.availability",
        "share_base": "model.share_base", "algorithm": "algorithm", "compression": "compression",
        "init": "init.adapter"}  # fmt: skip

#: personalize.private's pattern per method: some but not all of its adapter tensors.
PRIVATE_PATTERN = {"lora": "lora_B", "dora": "lora_B", "ffa_lora": "q_proj", "adalora": "lora_B",
                   "loha": "hada_w2", "ia3": "down_proj", "p_tuning": "mlp_head"}  # fmt: skip

Row = dict[str, str]


def key_of(group: str) -> str:
    return KEYS.get(group, group)


def overrides(row: Row) -> list[str]:
    """The Hydra overrides of a row (groups it leaves out keep their default)."""
    out = []
    for group, value in row.items():
        for item in GROUPS[group][value]:
            item = item.replace("PRIVATE", PRIVATE_PATTERN.get(row.get("peft", "lora"), "lora_B"))
            out.append(item.replace("RESUME", "/nonexistent/run").replace("INIT_ADAPTER", "/nonexistent/adapter"))
    return out


@functools.cache
def _default():  # noqa: ANN202 - the composed default, a typed DictConfig
    from fedllm_flwr.config import compose_cfg

    return compose_cfg([])


@functools.cache
def _changes(group: str, value: str) -> tuple[tuple[str, Any], ...]:
    """The (dotted key, value) pairs value `value` of `group` changes against the default
    (personalize.private's pattern left as the placeholder PRIVATE)."""
    from fedllm_flwr.config import compose_cfg

    items = [i.replace("RESUME", "/nonexistent/run").replace("INIT_ADAPTER", "/nonexistent/adapter")
             for i in GROUPS[group][value]]  # fmt: skip
    composed = OmegaConf.to_container(compose_cfg(items))
    return tuple(_diff(OmegaConf.to_container(_default()), composed))


def _diff(before: dict, after: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in after.items():
        if isinstance(value, dict):
            out.extend(_diff(before.get(key, {}), value, f"{prefix}{key}."))
        elif before.get(key) != value:
            out.append((f"{prefix}{key}", value))
    return out


def build(row: Row):  # noqa: ANN201 - a Config
    """The checked config of a row (UserError when the config refuses it): the default
    with each value's changes set, checked, and the default put back."""
    from fedllm_flwr.config import to_config

    tree, pattern = _default(), PRIVATE_PATTERN.get(row.get("peft", "lora"), "lora_B")
    changes = [(k, [pattern if x == "PRIVATE" else x for x in v] if isinstance(v, list) else v)
               for group, value in row.items() for k, v in _changes(group, value)]  # fmt: skip
    before = [(k, _plain(OmegaConf.select(tree, k))) for k, _ in changes]
    try:
        for key, value in changes:
            OmegaConf.update(tree, key, value, merge=False)
        return to_config(tree)
    finally:
        for key, value in reversed(before):
            OmegaConf.update(tree, key, value, merge=False)


def _plain(value: Any) -> Any:
    """A copy of a config value (a list node is changed in place by an update)."""
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def refusal(row: Row) -> str | None:
    """The config's one-line refusal of a row, or None when it builds."""
    from fedllm_flwr.errors import UserError

    try:
        build(row)
    except UserError as exc:
        return str(exc)
    return None


def all_pairs() -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Every pair of values of two different groups, non-default values only on at
    least one side (a pair of defaults is the default config)."""
    out = []
    for (g1, v1s), (g2, v2s) in itertools.combinations(GROUPS.items(), 2):
        for v1, v2 in itertools.product(v1s, v2s):
            if v1s[v1] or v2s[v2]:
                out.append(((g1, v1), (g2, v2)))
    return out


#: Config keys in refusals -> the matrix group whose values set them.
KEY_GROUPS = {
    "peft.client_ranks": "ranks", "peft.freeze_a": "peft", "zo.params": "algorithm", "compression.up": "compression",
    "compression.down": "compression", "compression.error_feedback": "compression", "personalize.ft_steps":
    "personalize", "personalize.private": "personalize", "strategy.availability": "availability",
    "model.share_base": "share_base", "init.adapter": "init", "privacy.secagg": "privacy",
    "privacy.target_epsilon": "privacy",
}  # fmt: skip
REFUSAL = re.compile(r"^invalid config: ([\w.]+)=.* cannot be combined with ([\w.]+)=.*?: \S")


def refused_groups(message: str) -> tuple[str, str] | None:
    """The two groups a rule's refusal names, or None if it is not a rule's one line."""
    match = REFUSAL.match(message)
    if not match or "\n" in message:
        return None
    return tuple(KEY_GROUPS.get(key, key) for key in match.groups())  # type: ignore[return-value]


@functools.cache
def pair_refusals() -> dict[frozenset, str]:
    """The refusal of every pair the config refuses with the rest at default."""
    out = {}
    for a, b in all_pairs():
        message = refusal(dict([a, b]))
        if message is not None:
            out[frozenset([a, b])] = message
    return out


@functools.cache
def conflicts() -> frozenset[frozenset]:
    """The pairs a rule refuses: their refusal names both of their groups (a pair refused
    for a third group's default is not one; another value of that group may serve)."""
    return frozenset(
        pair for pair, message in pair_refusals().items()
        if set(refused_groups(message) or ()) == {group for group, _ in pair}
    )  # fmt: skip


def complete(row: Row, prefer: Callable[[str, str], int] = lambda group, value: 0) -> Row | None:
    """`row` with a value for every other group, no two values in conflict (the values
    `prefer` scores highest first); None when no such row exists."""
    clash = conflicts()
    rest = [g for g in GROUPS if g not in row]

    def fits(group: str, value: str, chosen: Row) -> bool:
        return not any(frozenset([(group, value), item]) in clash for item in chosen.items())

    def search(chosen: Row, todo: list[str]) -> Row | None:
        if not todo:  # the config reports one conflict at a time: a whole row is built to be sure
            return chosen if refusal(chosen) is None else None
        group, *others = todo
        for value in sorted(GROUPS[group], key=lambda v: -prefer(group, v)):
            if fits(group, value, chosen):
                found = search({**chosen, group: value}, others)
                if found is not None:
                    return found
        return None

    if any(pair in clash for pair in pairs_of(row)):
        return None
    found = search(dict(row), rest)
    return {g: found[g] for g in GROUPS} if found is not None else None


@functools.cache
def compatible_pairs() -> frozenset[frozenset]:
    """The pairs some whole row holds: not in conflict themselves, nor through a third group."""
    return frozenset(frozenset(p) for p in all_pairs() if complete(dict(p)) is not None)


def pairs_of(row: Row) -> set[frozenset]:
    return {frozenset(p) for p in itertools.combinations(row.items(), 2)}


def cover() -> list[Row]:
    """Rows without conflicts that together hold every compatible pair: each starts from
    the first pair not yet held and takes, group by group, the value that adds the most
    pairs not yet held. (Our own: allpairspy's filter stops early with this many refused
    pairs, covering 386 of 838 pairs in 24 rows.)"""
    left, out = set(compatible_pairs()), []
    while left:
        seed = min(left, key=lambda p: sorted(p))
        chosen: Row = dict(seed)
        for group in GROUPS:  # greedily, where the search left a choice
            if group in chosen:
                continue
            options = [v for v in GROUPS[group] if complete({**chosen, group: v}) is not None]
            chosen[group] = max(options, key=lambda v: sum(frozenset([(group, v), c]) in left for c in chosen.items()))
        row = {g: chosen[g] for g in GROUPS}
        out.append(row)
        left -= pairs_of(row)
    return out


ROWS_FILE = Path(__file__).with_name("combination_rows.json")


def write() -> None:
    """Write the rows file. (The table of what does not combine is written from the rules
    each time the docs are built: docs/concepts.md asks docs/hooks.py for it.)"""
    ROWS_FILE.write_text(json.dumps(cover(), indent=1) + "\n")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    write()
    print(f"{ROWS_FILE.name}: {len(json.loads(ROWS_FILE.read_text()))} rows")
