"""Server-side aggregation: the only place where client replies are combined."""

from __future__ import annotations

from functools import partial
from typing import Any

from fedllm_flwr.compression import codecs
from fedllm_flwr.config import RANKED_STRATEGIES, Config
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg, RoundLedger, weighted_mean
from fedllm_flwr.strategy.aggregators import Mifa, RobustAggregate, ServerOptFedAvg, server_optimizer
from fedllm_flwr.strategy.availability import Availability
from fedllm_flwr.strategy.ranked import AskRanks, RankedLoRA, SvdRedistribution, ZeroPadding
from fedllm_flwr.strategy.replies import ValidReply, aggregate_client_metrics
from fedllm_flwr.strategy.scenarios import GlobalFedAvg, LocalAdapters
from fedllm_flwr.strategy.stacking import Stacking

__all__ = [
    "AdapterFedAvg",
    "GlobalFedAvg",
    "LocalAdapters",
    "Mifa",
    "RankedLoRA",
    "RobustAggregate",
    "ServerOptFedAvg",
    "Stacking",
    "SvdRedistribution",
    "ZeroPadding",
    "RoundLedger",
    "ValidReply",
    "aggregate_client_metrics",
    "build_strategy",
    "weighted_mean",
]


def round_lr(cfg: Config, server_round: int) -> float:
    """The learning rate every client starts round `server_round` with."""
    from fedllm_flwr.train import lr_at

    steps = cfg.train.local_steps
    return lr_at((server_round - 1) * steps, cfg.num_rounds * steps, cfg.train)


def build_strategy(
    cfg: Config,
    override: type[AdapterFedAvg] | None = None,
    *,
    ranks: dict[int, int] | None = None,
    ask_ranks: AskRanks | None = None,
    **arguments: Any,
) -> AdapterFedAvg:
    """The strategy the config asks for, or the class `override` with its own `arguments`
    (`fedllm_flwr.privacy.secagg.secagg_strategy`, an algorithm's: `Algorithm.strategy`),
    with the config's sampling and codecs.
    The strategies for unequal LoRA ranks take every node's rank learned before round 1
    and what asks a node that connects later (`fedllm_flwr.server.ranks`)."""
    s = cfg.strategy
    kinds: dict[str, Any] = {"fed": AdapterFedAvg, "global": GlobalFedAvg, "local": LocalAdapters}
    kind = kinds[cfg.scenario.name]
    extra: dict[str, Any] = {"local_steps": cfg.train.local_steps} if cfg.scenario.name == "global" else {}
    if s.name in ("fedavgm", "fedadam", "fedyogi"):
        kind = ServerOptFedAvg
        opt = s.name.removeprefix("fed")
        extra["optimizer"] = server_optimizer(opt, s.server_lr, s.server_momentum, s.beta2, s.tau)
    elif s.name in ("median", "trimmed_mean"):
        kind, extra = RobustAggregate, {"kind": s.name, "trim": s.trim}
    elif s.name in RANKED_STRATEGIES:
        kind = {"zero_padding": ZeroPadding, "svd": SvdRedistribution, "stacking": Stacking}[s.name]
        extra = {"ranks": ranks, "ask_ranks": ask_ranks}
    elif s.name == "mifa":
        kind, extra = Mifa, {"wait_for_all": s.mifa_wait_for_all, "lr_for": partial(round_lr, cfg)}
    if override is not None:
        kind, extra = override, arguments
    # fedavg and fedprox aggregate alike; fedprox's term is in the clients' loss.
    down, up = codecs(cfg.compression)
    strategy = kind(
        **extra,
        down=down,
        up=up,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes,
        min_available_nodes=s.min_available_nodes,
    )
    strategy.evaluate_due = partial(cfg.eval.due, last_round=cfg.rounds_to_run)
    # FFA-LoRA: A is the same frozen matrix everywhere, so the mean of B A is B_avg A.
    strategy.exact_products = cfg.peft.freeze_a
    strategy.availability = Availability(
        s.availability, s.available_p, list(s.available_per_client), s.category_probabilities(), cfg.seed
    )
    return strategy
