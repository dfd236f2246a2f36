"""What combines with what: every pair of settings that cannot run together, and why.

One declaration serves three readers: `Config.__post_init__` refuses the first
conflict a config holds (one line naming both keys, their values and the reason),
the combination tests (tests/test_combinations.py) check every pair of the matrix's
values against it, and the README's table of what does not combine is generated from
it (`markdown_table`), so the three cannot disagree.

A rule is two `Setting`s (a condition on one config key each) and a reason; `only_if`
narrows a rule to configs where a third setting holds (`zo.params` only matters under
`algorithm=zo`). Rules on a single key (a value out of range) stay in the key's own
group (`__post_init__` of its dataclass).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fedllm_flwr.config.federation import RANKED_STRATEGIES
from fedllm_flwr.config.model import LAYERED_METHODS, LORA_METHODS, TARGETED_METHODS

#: A config group shown by its name, read from the field that holds it.
GROUP_FIELDS = {
    "scenario": "scenario.name", "peft": "peft.method", "strategy": "strategy.name", "algorithm": "algorithm.name",
    "task": "task.name", "privacy": "privacy.name", "compression": "compression.name",
}  # fmt: skip
#: The strategies that take the plain mean of the updates (what privacy protects).
MEAN_STRATEGIES = ("fedavg", "fedprox")
#: Prompt methods whose adapter is a single tensor: nothing to keep apart.
SINGLE_TENSOR_METHODS = ("prompt_tuning", "prefix_tuning")


@dataclass(frozen=True)
class Setting:
    """A condition on one config key: `key` (a group name or a dotted key), true for the
    values `test` accepts; `label` says which, for the README's table."""

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


def _unequal_ranks(ranks: list[int]) -> bool:
    return len(set(ranks)) > 1


FED_ONLY = not_in("scenario", "fed")
ZO = one_of("algorithm", "zo")
ZO_FULL = one_of("zo.params", "full")
PRIVATE = not_in("privacy", "none")

RULES: tuple[Conflict, ...] = (
    # --- scenarios: only `fed` aggregates across clients ----------------------------
    Conflict(not_in("strategy", "fedavg"), FED_ONLY,
             "the strategy combines the clients' replies, and this scenario averages nothing across clients"),
    Conflict(is_set("personalize.private"), FED_ONLY,
             "partial sharing keeps part of a federated adapter local; there is no federated adapter"),
    Conflict(is_set("personalize.ft_steps", "personalize.ft_steps>0"), FED_ONLY,
             "FedAvg + FT tunes the federated adapter per client; there is no federated adapter"),
    Conflict(PRIVATE, FED_ONLY, "privacy protects what is aggregated, and this scenario aggregates nothing"),
    Conflict(one_of("dataset.source", "sites"), one_of("scenario", "global"),
             "scenario=global needs one holder of all data, and each site holds only its own"),
    Conflict(not_in("strategy.availability", "always"), one_of("scenario", "global"),
             "availability simulates absent clients; scenario=global has a single holder"),
    # --- PEFT methods ------------------------------------------------------------------
    Conflict(one_of("peft", "adalora"), one_of("scenario", "fed"),
             "AdaLoRA's rank allocator zeroes different singular values on each client, so the mean of the "
             "clients' triplets is no model any client trained (use scenario=global or local, or peft=lora)"),
    Conflict(is_set("personalize.private"), one_of("peft", *SINGLE_TENSOR_METHODS),
             "the adapter is a single tensor: nothing would be shared"),
    Conflict(is_set("peft.client_ranks"), not_in("peft", *LORA_METHODS),
             "sites get LoRA ranks, and this method has no rank of LoRA's"),
    Conflict(is_set("peft.freeze_a"), not_in("peft", *LORA_METHODS),
             "FFA-LoRA freezes LoRA's A, which this method does not have"),
    # --- LoRA of unequal ranks -----------------------------------------------------------
    Conflict(one_of("strategy", *RANKED_STRATEGIES), not_in("peft", *LORA_METHODS),
             "the strategy combines LoRA's factors B and A, which this method does not have"),
    Conflict(Setting("peft.client_ranks", _unequal_ranks, "peft.client_ranks unequal"),
             not_in("strategy", *RANKED_STRATEGIES),
             f"the strategy averages tensors of one shape (use strategy={'|'.join(RANKED_STRATEGIES)})"),
    Conflict(is_set("peft.freeze_a"), one_of("strategy", *RANKED_STRATEGIES),
             "FFA-LoRA keeps every site's A at its seeded initialisation, which the strategy would replace "
             "(use strategy=fedavg)"),
    Conflict(is_set("personalize.private"), one_of("strategy", *RANKED_STRATEGIES),
             "partial sharing keeps tensors local, and the strategy reshapes every tensor it sends"),
    Conflict(one_of("strategy", "stacking"), one_of("peft", "dora"),
             "stacking merges the clients' B A under a fresh adapter, and DoRA normalises the merged weight "
             "itself, so a delta added outside it is not what the clients trained (use peft=lora)"),
    Conflict(one_of("strategy", "stacking"), is_set("personalize.ft_steps", "personalize.ft_steps>0"),
             "stacking's global model is a merged delta, not an adapter a client can tune on"),
    Conflict(one_of("strategy", "stacking"), not_in("task", "lm"),
             "stacking exports the merged delta as a LoRA adapter of a causal LM; this task trains more than B A"),
    Conflict(one_of("strategy", *RANKED_STRATEGIES), not_in("algorithm", "none"),
             "the strategy combines adapters trained on the full model (FedOT's emulator adapters and "
             "zeroth-order seed lists are not combined here)"),
    # --- FedOT ---------------------------------------------------------------------------
    Conflict(one_of("algorithm", "fedot"), not_in("model.quantization", "none"),
             "FedOT cuts its emulator from the full-precision base"),
    Conflict(one_of("algorithm", "fedot"), not_in("peft", *LAYERED_METHODS),
             "FedOT puts the adapter into the first and last decoder layers, and this method cannot be "
             "limited to some layers"),
    # --- zeroth-order: seed lists, not adapters --------------------------------------
    Conflict(ZO, not_in("scenario", "fed"), "zeroth-order federates seed lists in the fed scenario"),
    Conflict(ZO, not_in("strategy", "fedavg"), "the server averages seed lists; only fedavg does that"),
    Conflict(ZO, not_in("task", "lm"), "zeroth-order steps take the language-model loss"),
    Conflict(ZO, PRIVATE, "seed lists are released as they are: neither masked nor noised"),
    Conflict(ZO, not_in("compression.down", "fp16"), "no adapter travels, so there is nothing to compress"),
    Conflict(ZO, not_in("compression.up", "fp16"), "no adapter travels, so there is nothing to compress"),
    Conflict(ZO, is_set("personalize.ft_steps", "personalize.ft_steps>0"),
             "FedAvg + FT tunes an adapter a node is sent; seed-only messages send none"),
    Conflict(ZO, is_set("personalize.private"),
             "every node replays the same steps on the whole adapter; none of it can stay local"),
    Conflict(ZO_FULL, not_in("peft", "lora"),
             "the base weights are tuned under LoRA's zero initial delta; another method changes the model "
             "it starts from", only_if=ZO),
    Conflict(ZO_FULL, not_in("model.quantization", "none"),
             "the base weights themselves are tuned, so they must not be quantized", only_if=ZO),
    Conflict(ZO_FULL, one_of("train.precision", "bf16", "fp16"),
             "steps of ~1e-7 round away below fp32 (train.precision=auto means fp32 here)", only_if=ZO),
    # --- preference tasks ----------------------------------------------------------------
    Conflict(one_of("task", "reward"), not_in("peft", *TARGETED_METHODS),
             "a reward model scores a sequence through the last hidden state, and this method adds virtual "
             "tokens"),
    Conflict(one_of("task", "reward", "dpo"), not_in("algorithm", "none"),
             "the task trains on the full base model (DPO takes its reference from it with the adapter off)"),
    Conflict(one_of("task", "reward", "dpo"), is_set("personalize.ft_steps", "personalize.ft_steps>0"),
             "clients report preference accuracy on their held-out pairs; FedAvg + FT tunes a language model"),
    Conflict(one_of("task", "reward", "dpo"), is_set("eval.client_metric"),
             "clients always report preference accuracy on their held-out pairs"),
    # --- privacy -------------------------------------------------------------------------
    Conflict(PRIVATE, not_in("strategy", *MEAN_STRATEGIES),
             "privacy protects the plain mean of the updates; this strategy needs each client's update or "
             "steps past the mean (outside the noise's sensitivity bound)"),
    Conflict(one_of("privacy", "secagg"), not_in("compression.up", "fp16", "fp32"),
             "SecAgg+ sends masked integer vectors up, so a lossy uplink codec cannot apply (and top-k would "
             "show which coordinates a client changed)"),
    Conflict(one_of("privacy", "dp"), not_in("strategy.availability", "always", "uniform"),
             "the privacy budget is accounted for clients sampled uniformly"),
    # --- resuming ------------------------------------------------------------------------
    Conflict(is_set("resume"), PRIVATE, "the protocol's state lives on the clients; restart the run instead"),
    Conflict(is_set("resume"), is_set("personalize.private"),
             "the private tensors live on the clients only, and a restarted run cannot reach them"),
    Conflict(is_set("resume"), is_set("compression.error_feedback"),
             "the clients' error-feedback residuals live on the clients only (resume with "
             "compression.error_feedback=false, or restart the run)", only_if=one_of("compression.up", "int8", "topk")),
)  # fmt: skip


def conflicts(cfg: Any, rules: Iterable[Conflict] = RULES) -> list[Conflict]:
    """The rules `cfg` breaks, in declaration order."""
    return [rule for rule in rules if rule.applies(cfg)]


def check(cfg: Any) -> None:
    """ValueError with the first conflict's one-line message, if `cfg` has any."""
    broken = conflicts(cfg)
    if broken:
        raise ValueError(broken[0].message(cfg))


def markdown_table(rules: Iterable[Conflict] = RULES) -> str:
    """The README's table: one row per rule."""
    lines = ["| setting | does not combine with | why |", "|---|---|---|"]
    for rule in rules:
        first = f"`{rule.first.label}`" + (f" (with `{rule.only_if.label}`)" if rule.only_if else "")
        lines.append(f"| {first} | `{rule.second.label}` | {rule.reason} |")
    return "\n".join(lines) + "\n"
