"""Zeroth-order federation with seed-only messages (FedKSeed, Qin et al. 2024), server side.

No weights travel. Each node keeps its own copy of the global adapter, which starts
as the seeded initial one, the same everywhere. A training or evaluation message
carries the aggregated steps of the rounds the node has not applied yet (normally
one round's: a few dozen (seed index, coefficient) pairs); a node that missed rounds
gets all it missed, which the server keeps for the whole run. A reply is the node's
own (index, coefficient) pairs, validated (the run's pool, indices inside it, each
once, finite coefficients) and averaged with the usual weights, a node that did not
draw an index counting as 0 for it. The server applies the round's pairs, in index
order, to its copy of the adapter exactly as every node will (z drawn over the tensors
in the model's order, whatever order a record or checkpoint holds them in), so its
evaluation and `adapter/final` are of the adapter the nodes hold, bit for bit. With
zo.params=full the steps move `weights`, the server model's own base weights, in place,
and the adapter stays the initial one; a resumed run replays every kept round onto them.
Each message also carries the fingerprint of the global weights the server holds, and a
node that holds other weights after the same steps refuses it instead of drifting.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from fedllm_flwr.algorithms.zo.mezo import apply_steps, in_draw_order, pool_id, weights_fingerprint
from fedllm_flwr.keys import ARRAYS_KEY, ZO_POOL_KEY, ZO_REPLY_KEY, ZO_STEPS_KEY, ZO_WEIGHTS_KEY
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.aggregators import to_arrays
from fedllm_flwr.strategy.catch_up import CatchUp, with_count
from fedllm_flwr.strategy.replies import ValidReply


def steps_record(rounds: dict[int, tuple[np.ndarray, np.ndarray]], which: list[int]) -> ArrayRecord:
    """The steps of rounds `which`, in order, as the message record nodes read."""
    tags, indices, coefficients = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
    for t in which:
        tags.append(np.full(len(rounds[t][0]), t, np.int64))
        indices.append(rounds[t][0].astype(np.int64))
        coefficients.append(rounds[t][1].astype(np.float64))
    return ArrayRecord({
        "rounds": Array(np.concatenate(tags)), "indices": Array(np.concatenate(indices)),
        "coefficients": Array(np.concatenate(coefficients)),
    })  # fmt: skip


def check_steps(content: RecordDict, pool_size: int, pool: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, coefficients) of a node's reply; ValueError naming what is wrong."""
    config = content.config_records.get("zo")
    if config is None or config.get(ZO_POOL_KEY) != pool:
        claimed = None if config is None else config.get(ZO_POOL_KEY)
        raise ValueError(f"the reply's seed pool is {claimed!r}, not this run's {pool!r}")
    record = content.array_records.get(ZO_REPLY_KEY)
    if record is None or set(record) != {"indices", "coefficients"}:
        raise ValueError("the reply carries no (indices, coefficients) record")
    indices, coefficients = record["indices"].numpy(), record["coefficients"].numpy()
    if indices.ndim != 1 or indices.shape != coefficients.shape or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError("indices and coefficients must be equally long 1-D arrays, the indices integers")
    if len(indices) and (indices.min() < 0 or indices.max() >= pool_size):
        raise ValueError(f"a seed index is outside the pool of {pool_size} (got {indices.min()}..{indices.max()})")
    if len(np.unique(indices)) != len(indices):
        raise ValueError("a seed index appears twice (a reply sums each index's coefficients)")
    if not np.all(np.isfinite(coefficients)):
        raise ValueError("a coefficient is not finite")
    return indices.astype(np.int64), coefficients.astype(np.float64)


class SeedFederation(AdapterFedAvg):
    """FedAvg over (seed index, coefficient) lists; nodes keep the adapter."""

    def __init__(
        self, *, pool: np.ndarray, order: Sequence[str], weights: dict[str, torch.Tensor] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.pool, self.pool_id = pool, pool_id(pool)
        self.order = list(order)
        """The tuned tensors' names in the model's own order (`mezo.tuned_tensors`): z is
        drawn over them in this order, whatever order the arrays or a checkpoint give."""
        self.weights = weights
        """zo.params=full: the server model's base weights, which the steps move in place
        (in `order`); None: the steps move the adapter the arrays carry."""
        self.rounds: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        """Round -> its aggregated (indices, coefficients), every round of the run that
        moved the global model (one whose replies carried no step is not kept)."""
        self.catch_up = CatchUp()
        self.current: dict[str, np.ndarray] = {}
        self._weights_fingerprint = ""
        """zo.params=full: that of `weights` as they are now ("": not computed since they moved)."""

    def held(self) -> str:
        """The fingerprint of the global weights the server holds: each message carries it,
        and a node holding other weights after the same steps refuses the message."""
        if self.weights is None:
            return weights_fingerprint(in_draw_order(self.current, self.order))
        if not self._weights_fingerprint:  # 135M weights take a third of a second: once a round
            self._weights_fingerprint = weights_fingerprint(in_draw_order(self.weights, self.order))
        return self._weights_fingerprint

    def _wire(self, arrays: ArrayRecord, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        """Each message gets the steps its node lacks and the fingerprints of the pool and
        of the global weights, no adapter."""
        self.current = {k: v.numpy() for k, v in arrays.items()}
        held, out = self.held(), []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict({k: v for k, v in message.content.items() if k != ARRAYS_KEY})
            content[ZO_STEPS_KEY] = steps_record(self.rounds, self.catch_up.missing(node, self.rounds))
            with_count(content, len(self.rounds), **{ZO_POOL_KEY: self.pool_id, ZO_WEIGHTS_KEY: held})
            if remember:
                self.sent[node] = {}
            message.content = content
            out.append(message)
        return out

    def reconstruct(self, node: int, content: RecordDict) -> tuple[dict[str, np.ndarray], None]:
        indices, coefficients = check_steps(content, len(self.pool), self.pool_id)
        return {"indices": indices, "coefficients": coefficients}, None

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        weights = np.asarray([r.weight for r in valid], dtype=np.float64)
        total: dict[int, float] = defaultdict(float)
        for p, reply in zip(weights / weights.sum(), valid, strict=True):
            for index, coefficient in zip(reply.state["indices"], reply.state["coefficients"], strict=True):
                total[int(index)] += p * float(coefficient)
        indices = np.array(sorted(total), dtype=np.int64)
        coefficients = np.array([total[i] for i in indices], dtype=np.float64)
        for reply in valid:
            self.catch_up.confirm(reply.node_id)
        self.ledger.set(server_round, "zo-seeds", len(indices))
        if not len(indices):
            # Not a round of the global model: a node counts the rounds whose steps it applied,
            # and a round without steps leaves no trace in the lists it is sent.
            log(WARNING, "Round %s: the replies carried no steps, so the global model did not move (every "
                "client's steps skipped?)", server_round)  # fmt: skip
            return to_arrays(self.current)
        self.rounds[server_round] = (indices, coefficients)
        # The server's adapter (or model) takes the round's steps exactly as every node will.
        if self.weights is not None:
            apply_steps(in_draw_order(self.weights, self.order), self.pool, zip(indices, coefficients, strict=True))
            self._weights_fingerprint = ""
            return to_arrays(self.current)
        params = [torch.from_numpy(np.array(v, dtype=np.float32)) for v in in_draw_order(self.current, self.order)]
        apply_steps(params, self.pool, zip(indices, coefficients, strict=True))
        return to_arrays(dict(zip(self.order, (p.numpy() for p in params), strict=True)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.catch_up.confirm_answered(replies)
        return super().aggregate_evaluate(server_round, replies)

    def state(self) -> dict[str, np.ndarray]:
        out = {}
        for t, (indices, coefficients) in self.rounds.items():
            out[f"zo/{t}/indices"], out[f"zo/{t}/coefficients"] = indices, coefficients
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        parts: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
        for key, value in arrays.items():
            _, done, name = key.split("/")
            parts[int(done)][name] = value
        # A round without steps is none of the global model's (a checkpoint from before they were dropped has them).
        self.rounds = {t: (p["indices"], p["coefficients"]) for t, p in parts.items() if len(p["indices"])}
        self.catch_up.forget()
        if self.weights is not None:  # they are the base checkpoint's: replay every kept round onto them
            started, self._weights_fingerprint = time.perf_counter(), ""
            for t in sorted(self.rounds):
                apply_steps(in_draw_order(self.weights, self.order), self.pool, zip(*self.rounds[t], strict=True))
            steps = sum(len(indices) for indices, _ in self.rounds.values())
            log(INFO, "[fedllm-flwr] zo: replayed %s rounds (%s steps) onto the base weights in %.1f s",
                len(self.rounds), steps, time.perf_counter() - started)  # fmt: skip
