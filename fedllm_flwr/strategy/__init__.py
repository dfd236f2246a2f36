"""Server-side aggregation: the only place where client replies are combined."""

from fedllm_flwr.config import Config
from fedllm_flwr.strategy.adapter_fedavg import (
    AdapterFedAvg,
    RoundLedger,
    ValidReply,
    aggregate_client_metrics,
    weighted_mean,
)
from fedllm_flwr.strategy.scenarios import DATA_KEY, STEPS_KEY, GlobalFedAvg, LocalAdapters

__all__ = [
    "DATA_KEY",
    "STEPS_KEY",
    "AdapterFedAvg",
    "GlobalFedAvg",
    "LocalAdapters",
    "RoundLedger",
    "ValidReply",
    "aggregate_client_metrics",
    "build_strategy",
    "weighted_mean",
]


def build_strategy(cfg: Config) -> AdapterFedAvg:
    s = cfg.strategy
    kinds = {"fed": AdapterFedAvg, "global": GlobalFedAvg, "local": LocalAdapters}
    extra = {"local_steps": cfg.train.local_steps} if cfg.scenario.name == "global" else {}
    return kinds[cfg.scenario.name](
        **extra,
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes,
        min_available_nodes=s.min_available_nodes,
    )
