"""The strategy registry: each `strategy.name` and `scenario.name` to its class, and the
strategy a config asks for, built with everything it needs.

Adding a strategy: its class (with its `settings`), its name in `compat.STRATEGIES`, a
YAML in conf/strategy/ and a row in tests/combinations.py (tests/test_strategy_registry.py
keeps them in step).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from fedllm_flwr.compression import codecs
from fedllm_flwr.config import Config
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.aggregators import Mifa, RobustAggregate, ServerOptFedAvg
from fedllm_flwr.strategy.availability import Availability
from fedllm_flwr.strategy.compat import SCENARIOS, STRATEGIES
from fedllm_flwr.strategy.ranked import SvdRedistribution, ZeroPadding
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.strategy.scenarios import GlobalFedAvg, LocalAdapters
from fedllm_flwr.strategy.stacking import Stacking

_CLASSES = {
    kind.__name__: kind
    for kind in (AdapterFedAvg, ServerOptFedAvg, RobustAggregate, Mifa, ZeroPadding, SvdRedistribution, Stacking,
                 GlobalFedAvg, LocalAdapters)
}  # fmt: skip
#: strategy.name -> the class that aggregates it, as `compat.STRATEGIES` names it.
STRATEGY_CLASSES: dict[str, type[AdapterFedAvg]] = {name: _CLASSES[kind] for name, kind in STRATEGIES.items()}
#: scenario.name -> its class; `fed` runs the strategy's own class.
SCENARIO_CLASSES: dict[str, type[AdapterFedAvg]] = {name: _CLASSES[kind] for name, kind in SCENARIOS.items()}


def strategy_class(cfg: Config) -> type[AdapterFedAvg]:
    """The class that runs `cfg`'s rounds: in the fed scenario the strategy's, else the
    scenario's (global and local run with strategy=fedavg only: `compat`)."""
    scenario = SCENARIO_CLASSES[cfg.scenario.name]
    return STRATEGY_CLASSES[cfg.strategy.name] if scenario is AdapterFedAvg else scenario


def build_strategy(
    cfg: Config,
    override: type[AdapterFedAvg] | None = None,
    *,
    setup: RoundSetup | None = None,
    clip_norm: float | None = None,
    **arguments: Any,
) -> AdapterFedAvg:
    """The strategy the config asks for (`strategy_class`, with its own `settings`), or the
    class `override` with its own `arguments` (`fedllm_flwr.privacy.secagg.secagg_strategy`,
    an algorithm's: `Algorithm.strategy`), with the config's sampling, codecs, evaluation
    rounds and availability.
    `setup`: what the server learned before round 1 (nodes, partition sizes, a resumed
    run's rounds, unequal LoRA ranks). `clip_norm`: privacy=dp's bound on every update."""
    if arguments and override is None:
        raise TypeError(f"build_strategy: {', '.join(arguments)} go to an `override` class only")
    s = cfg.strategy
    setup = setup or RoundSetup()
    kind = strategy_class(cfg)
    extra = kind.settings(cfg, setup)
    if override is not None:
        kind, extra = override, arguments
    # fedavg and fedprox aggregate alike; fedprox's term is in the clients' loss.
    down, up = codecs(cfg.compression)
    return kind(
        **extra,
        down=down,
        up=up,
        setup=setup,
        evaluate_due=partial(cfg.eval.due, last_round=cfg.rounds_to_run),
        # FFA-LoRA: A is the same frozen matrix everywhere, so the mean of B A is B_avg A.
        exact_products=cfg.peft.freeze_a,
        availability=Availability(
            s.availability, s.available_p, list(s.available_per_client), s.category_probabilities(), cfg.seed
        ),
        clip_norm=clip_norm,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes,
        min_available_nodes=s.min_available_nodes,
    )
