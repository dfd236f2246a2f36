"""What a client's reply may carry, and how the replies' metrics combine.

`check_metrics` is the gate every training and evaluation reply passes before its
numbers count: finite values and a whole, positive weight. A training reply that
passes becomes a `ValidReply`; `aggregate_client_metrics` merges the metrics of
the replies kept (weighted means of losses, sums of counts, maxima of time and
memory); `weighted_mean` averages their adapters and `RoundLedger` keeps each round's
accounting.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict

from fedllm_flwr.keys import SAT_OUT_KEY


def check_metrics(metrics: MetricRecord | None, weighted_by_key: str, allow_zero_weight: bool = False) -> float:
    """The reply's weight, after checking every number it carries: each must be
    finite, the weight a non-negative count (positive unless `allow_zero_weight`).
    ValueError, naming the key, otherwise: the reply is dropped, never averaged in."""
    if metrics is None:
        raise ValueError("the reply carries no metrics")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(float(v)) for v in values):
            raise ValueError(f"metric {key!r} is not finite ({value!r})")
    weight = metrics.get(weighted_by_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise ValueError(f"metric {weighted_by_key!r} must be a number, got {weight!r}")
    if weight < 0 or (weight == 0 and not allow_zero_weight) or float(weight) != int(weight):
        raise ValueError(f"metric {weighted_by_key!r} must be a positive whole count, got {weight!r}")
    return float(weight)


@dataclass
class ValidReply:
    """A training reply that passed validation, unpacked."""

    node_id: int
    state: dict[str, np.ndarray]
    """The adapter the reply stands for: what the node was sent (as it decoded it) plus its update."""
    weight: float
    content: RecordDict
    update: dict[str, np.ndarray] | None = None
    """What the node changed: its decoded update, or None for a whole-adapter reply
    from a node this round sent nothing to train."""


def sat_out(content: RecordDict) -> bool:
    """Whether a training reply says its node declined the round (`SAT_OUT_KEY`)."""
    metrics = next(iter(content.metric_records.values()), None) if len(content.metric_records) == 1 else None
    return metrics is not None and metrics.get(SAT_OUT_KEY) == 1 and not content.array_records


def partition_of(content: RecordDict) -> int:
    metrics = next(iter(content.metric_records.values()), None)
    value = metrics.get("partition-id") if metrics is not None else None
    return int(value) if isinstance(value, (int, float)) else -1


SUMMED = ("num-examples", "tokens", "examples-seen", "skipped-steps", "grpo-answers", "grpo-dropped-answers")
MAXED = ("seconds", "peak-memory-mb", "model-layers", "model-parameters", "model-load-seconds",
         "process-start-seconds", "catch-up-seconds", "dp-epsilon", "dp-steps", "dp-noise-multiplier",
         "dp-sample-rate")  # fmt: skip
#: Figures a round's row also keeps per client, as `client_<partition>-<key>` (each site's own budget).
PER_CLIENT = ("dp-epsilon",)
IDENTIFIERS = ("partition-id",)


def aggregate_client_metrics(records: list, weighted_by_key: str) -> MetricRecord:
    """Weighted mean of losses, sums of counts, maxima of time and memory.

    Keys come from every row, and each is weighted over the rows that carry it:
    a figure only some clients report is their weighted mean, not diluted by
    the others' weights."""
    rows = [next(iter(r.metric_records.values())) for r in records]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    out = MetricRecord()
    for key in keys:
        if key in IDENTIFIERS:
            continue
        having = [row for row in rows if key in row]
        if key in PER_CLIENT:
            for row in having:
                out[f"client_{int(row.get('partition-id', -1))}-{key}"] = float(row[key])
        values = [float(row[key]) for row in having]
        if key.startswith("eval-") and len(values) > 1:  # spread across clients
            out[f"{key}-std"] = float(np.std(values))
        if key in SUMMED:
            out[key] = sum(values)
        elif key in MAXED:
            out[key] = max(values)
        else:
            weights = [float(row[weighted_by_key]) for row in having]
            if sum(weights) > 0:
                out[key] = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
    return out


class RoundLedger:
    """Per-round counters and values, merged into the round's metrics row."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = defaultdict(dict)

    def add(self, server_round: int, key: str, value: float) -> None:
        self.rounds[server_round][key] = self.rounds[server_round].get(key, 0) + value

    def set(self, server_round: int, key: str, value: Any) -> None:
        self.rounds[server_round][key] = value

    def pop(self, server_round: int) -> dict[str, Any]:
        return self.rounds.pop(server_round, {})


def weighted_mean(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """Sum of w_i / sum(w) * state_i, key by key, in fp32."""
    total = float(sum(weights))
    out = {k: np.zeros_like(v, dtype=np.float32) for k, v in states[0].items()}
    for state, weight in zip(states, weights, strict=True):
        for key, value in state.items():
            out[key] += value.astype(np.float32) * np.float32(weight / total)
    return out
