"""What the strategies and scenarios are called, and what each cannot serve.

Read by the config (`strategy.name` and `scenario.name`'s values, which strategies take
unequal ranks) and by the other plug-ins' declarations; `registry` maps each name to its
class. Imports nothing of ours but other declarations.
"""

from __future__ import annotations

from fedllm_flwr.compat import FED_ONLY, FT_STEPS, PRIVATE_TENSORS, Conflict, Setting, is_set, not_in, one_of
from fedllm_flwr.peft_methods.compat import NOT_LORA

#: strategy.name -> the name of the class that aggregates it (`registry.STRATEGY_CLASSES`).
STRATEGIES = {
    "fedavg": "AdapterFedAvg", "fedprox": "AdapterFedAvg",  # fedprox's proximal term is in the clients' loss
    "fedavgm": "ServerOptFedAvg", "fedadam": "ServerOptFedAvg", "fedyogi": "ServerOptFedAvg",
    "mifa": "Mifa", "median": "RobustAggregate", "trimmed_mean": "RobustAggregate",
    "zero_padding": "ZeroPadding", "svd": "SvdRedistribution", "stacking": "Stacking",
}  # fmt: skip
#: scenario.name -> its class; `fed` runs the strategy's own class.
SCENARIOS = {"fed": "AdapterFedAvg", "global": "GlobalFedAvg", "local": "LocalAdapters"}
#: The strategies that combine LoRA adapters of unequal ranks (`peft.client_ranks`).
RANKED_STRATEGIES = ("zero_padding", "svd", "stacking")
#: The strategies that take the plain mean of the updates (what privacy protects).
MEAN_STRATEGIES = ("fedavg", "fedprox")

RANKED = one_of("strategy", *RANKED_STRATEGIES)
NOT_RANKED = not_in("strategy", *RANKED_STRATEGIES)
STACKING = one_of("strategy", "stacking")
GLOBAL = one_of("scenario", "global")


def _unequal(ranks: list[int]) -> bool:
    return len(set(ranks)) > 1


CONFLICTS = (
    # --- scenarios: only `fed` aggregates across clients ----------------------------
    Conflict(not_in("strategy", "fedavg"), FED_ONLY,
             "the strategy combines the clients' replies, and this scenario averages nothing across clients"),
    Conflict(one_of("dataset.source", "sites"), GLOBAL,
             "scenario=global needs one holder of all data, and each site holds only its own"),
    Conflict(not_in("strategy.availability", "always"), GLOBAL,
             "availability simulates absent clients; scenario=global has a single holder"),
    # --- LoRA of unequal ranks -----------------------------------------------------------
    Conflict(RANKED, NOT_LORA, "the strategy combines LoRA's factors B and A, which this method does not have"),
    Conflict(Setting("peft.client_ranks", _unequal, "peft.client_ranks unequal"), NOT_RANKED,
             f"the strategy averages tensors of one shape (use strategy={'|'.join(RANKED_STRATEGIES)})"),
    Conflict(is_set("peft.freeze_a"), RANKED,
             "FFA-LoRA keeps every site's A at its seeded initialisation, which the strategy would replace "
             "(use strategy=fedavg)"),
    Conflict(PRIVATE_TENSORS, RANKED,
             "partial sharing keeps tensors local, and the strategy reshapes every tensor it sends"),
    Conflict(STACKING, one_of("peft", "dora"),
             "stacking merges the clients' B A under a fresh adapter, and DoRA normalises the merged weight "
             "itself, so a delta added outside it is not what the clients trained (use peft=lora)"),
    Conflict(STACKING, FT_STEPS, "stacking's global model is a merged delta, not an adapter a client can tune on"),
    Conflict(STACKING, not_in("task", "lm"),
             "stacking exports the merged delta as a LoRA adapter of a causal LM; this task trains more than B A"),
    Conflict(RANKED, not_in("algorithm", "none"),
             "the strategy combines adapters trained on the full model (FedOT's emulator adapters and "
             "zeroth-order seed lists are not combined here)"),
)  # fmt: skip
