"""Server-side aggregation: the only place where client replies are combined."""

from fedllm_flwr.config import Config
from fedllm_flwr.strategy.adapter_fedavg import (
    AdapterFedAvg,
    RoundLedger,
    aggregate_client_metrics,
    weighted_mean,
)

__all__ = ["AdapterFedAvg", "RoundLedger", "aggregate_client_metrics", "build_strategy", "weighted_mean"]


def build_strategy(cfg: Config) -> AdapterFedAvg:
    s = cfg.strategy
    return AdapterFedAvg(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes,
        min_available_nodes=s.min_available_nodes,
        train_metrics_aggr_fn=aggregate_client_metrics,
        evaluate_metrics_aggr_fn=aggregate_client_metrics,
    )
