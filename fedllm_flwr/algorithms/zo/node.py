"""Zeroth-order federation on a node (`algorithm=zo`): catch up with the global model
from the aggregated steps a message carries, take `train.local_steps` MeZO steps, and
reply with (seed index, coefficient) pairs, never weights.

The node keeps its copy of the global adapter in its `ZoState` (zo.params=adapter),
or its copy of the global weights in a file of its `WeightStore` (zo.params=full).
Every function takes the run's `SeedPool`, built once by the plug-in.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm_flwr.algorithms.zo.full_weights import WeightStore, chain, reset_to, reset_to_base, store_folder
from fedllm_flwr.algorithms.zo.mezo import SeedPool, apply_steps, check_weights, in_draw_order, tuned_tensors, zo_train
from fedllm_flwr.algorithms.zo.state import ZoState
from fedllm_flwr.client import _setup, client_bundle
from fedllm_flwr.config import Config
from fedllm_flwr.data.prompts import collate_examples, iter_batches
from fedllm_flwr.keys import (
    ROUNDS_HELD_KEY,
    SERVER_ROUND_KEY,
    ZO_POOL_KEY,
    ZO_REPLY_KEY,
    ZO_STEPS_KEY,
    ZO_WEIGHTS_KEY,
)
from fedllm_flwr.lm_loss import lm_loss, record_losses
from fedllm_flwr.lora_merge import set_merged
from fedllm_flwr.metrics import peak_memory_mb
from fedllm_flwr.model import set_adapter_state
from fedllm_flwr.privacy.ledger import DpLedger
from fedllm_flwr.transport import arrays_to_state, state_to_arrays


@dataclasses.dataclass
class ZoMessage:
    """What a zeroth-order message brings a node to catch up with."""

    steps: dict[str, np.ndarray]
    """The aggregated steps of the rounds the node may lack: int64 `rounds` and
    `indices` (into the seed pool) and float64 `coefficients`, in order."""
    pool: str
    """The server's seed pool's fingerprint."""
    weights: str
    """The fingerprint of the global weights the server holds, those steps applied."""


def train_reply(
    cfg: Config, pool: SeedPool, content: RecordDict, zo: ZoState, identity: str, partition_id: int,
    num_partitions: int, ledger: DpLedger | None = None,
) -> RecordDict:  # fmt: skip
    """A train message: catch up, take this round's steps, reply with their pairs.
    `ledger` (privacy=dp_sgd): this site's DP budget, for `local_round`."""
    state = catch_up(cfg, pool, content, zo, identity, partition_id)
    server_round = int(content["config"][SERVER_ROUND_KEY])
    coefficients, metrics = local_round(cfg, pool, state, server_round, partition_id, num_partitions, ledger)
    metrics["catch-up-seconds"] = zo.seconds  # applying the rounds the message carried (and, full: load, save)
    indices = np.array(sorted(coefficients), dtype=np.int64)
    values = np.array([coefficients[i] for i in indices], dtype=np.float64)
    return RecordDict(
        {
            ZO_REPLY_KEY: ArrayRecord({"indices": Array(indices), "coefficients": Array(values)}),
            "zo": ConfigRecord({ZO_POOL_KEY: str(content["config"][ZO_POOL_KEY])}),
            "metrics": MetricRecord(metrics),
        }
    )


def catch_up(cfg: Config, pool: SeedPool, content: RecordDict, zo: ZoState, identity: str, partition_id: int):
    """This node's adapter after the steps the message carries (kept in `zo`);
    zo.params=full: None, the weights are in the model client `partition_id` trains
    and evaluates, and in the node's store (its files named by `identity`). ValueError,
    nothing kept, when this node would then hold another number of rounds or other
    weights than the server."""
    started = time.perf_counter()
    config = content["config"]
    message = ZoMessage(
        steps={k: v.numpy() for k, v in content[ZO_STEPS_KEY].items()},
        pool=str(config[ZO_POOL_KEY]),
        weights=str(config[ZO_WEIGHTS_KEY]),
    )
    tags = message.steps["rounds"]
    count = zo.count + len(np.unique(tags[tags > zo.round]))
    if count != int(config[ROUNDS_HELD_KEY]):  # checked before anything is applied or stored
        raise ValueError(f"this node has applied {count} rounds' steps and the global model {config[ROUNDS_HELD_KEY]}")
    state = None
    if cfg.zo.params == "full":
        store = WeightStore(store_folder(cfg.zo.store_dir, cfg.model), identity)
        zo.weights, applied = full_catch_up(cfg, pool, partition_id, store, zo.weights, zo.round, message)
    else:
        kept = arrays_to_state(zo.adapter) if zo.adapter is not None else None
        state, applied = adapter_catch_up(cfg, pool, partition_id, kept, zo.round, message)
        zo.adapter = state_to_arrays(state)
    zo.count, zo.round = count, max(applied, default=zo.round)
    zo.seconds = time.perf_counter() - started
    return state


def _new_steps(pool: SeedPool, kept_round: int, message: ZoMessage):
    """[(round, indices, coefficients)] past `kept_round`, in order."""
    if message.pool != pool.id:
        raise ValueError(f"the server's seed pool {message.pool!r} is not this node's {pool.id!r} (seed, zo.num_seeds)")
    steps = message.steps
    tags = steps["rounds"]
    if np.any(np.diff(tags) < 0):
        raise ValueError("the message's steps are not in round order")
    rounds = [(int(t), steps["indices"][tags == t], steps["coefficients"][tags == t]) for t in np.unique(tags)]
    return [r for r in rounds if r[0] > kept_round]


def adapter_catch_up(
    cfg: Config, pool: SeedPool, partition_id: int, kept: dict[str, torch.Tensor] | None, kept_round: int,
    message: ZoMessage,
) -> tuple[dict[str, torch.Tensor], list[int]]:  # fmt: skip
    """zo.params=adapter: this node's adapter (`kept`, after round `kept_round`; None:
    the seeded initial one) after the aggregated steps of the rounds past `kept_round`,
    in order, and those rounds. ValueError if the adapter is not then the server's."""
    rounds = _new_steps(pool, kept_round, message)
    bundle = client_bundle(cfg, partition_id)
    order = list(tuned_tensors(bundle.model, "adapter"))
    state = {k: v.clone() for k, v in (bundle.initial if kept is None else kept).items()}
    for _, indices, coefficients in rounds:
        apply_steps(in_draw_order(state, order), pool.seeds, zip(indices, coefficients, strict=True))
    check_weights(in_draw_order(state, order), message.weights, "adapter")
    return state, [t for t, _, _ in rounds]


def full_catch_up(
    cfg: Config, pool: SeedPool, partition_id: int, store: WeightStore, fingerprint: str, kept_round: int,
    message: ZoMessage,
) -> tuple[str, list[int]]:  # fmt: skip
    """zo.params=full: put this node's global weights into the model it trains and
    evaluates (`client_bundle`; from `store`, those of history `fingerprint`; before any
    round, the base checkpoint's), apply the aggregated steps of the rounds past
    `kept_round`, check them against the server's, and keep them in `store` beside the
    weights of `fingerprint`, which a retry of this message starts from again.
    (The new history fingerprint, the rounds applied.)"""
    rounds = _new_steps(pool, kept_round, message)
    bundle = client_bundle(cfg, partition_id)
    weights = tuned_tensors(bundle.model, "full")
    kept = fingerprint if kept_round else ""
    if kept:
        reset_to(weights, store.load(kept))
    else:
        reset_to_base(weights, bundle.base_path)
        fingerprint = pool.id
    for t, indices, coefficients in rounds:
        apply_steps(list(weights.values()), pool.seeds, zip(indices, coefficients, strict=True))
        fingerprint = chain(fingerprint, t, indices, coefficients)
    check_weights(weights.values(), message.weights, "base weights")  # before they are kept
    if fingerprint != kept:
        store.save(weights, fingerprint, keep=kept)
    return fingerprint, [t for t, _, _ in rounds]


def local_round(
    cfg: Config, pool: SeedPool, state: dict[str, torch.Tensor] | None, server_round: int, partition_id: int,
    num_partitions: int, ledger: DpLedger | None = None,
) -> tuple[dict[int, float], dict[str, float]]:  # fmt: skip
    """`train.local_steps` MeZO steps from the global adapter `state` (zo.params=full:
    None, the global weights are in the model, `full_catch_up`); (pool index -> summed
    coefficient, the reply metrics). With `ledger` (privacy=dp_sgd), DP-ZO steps on
    Poisson-drawn records (`fedllm_flwr.privacy.dp_sgd`), their cost added to the ledger,
    and only the metrics a private round may release; OverBudget before any step when the
    round would pass `privacy.target_epsilon`."""
    bundle, data = _setup(cfg, partition_id, num_partitions)
    if len(data.train) == 0:
        raise ValueError(f"client {partition_id} has no training examples")
    full = state is None  # the adapter keeps its initial, zero delta; the base weights move
    set_adapter_state(bundle.model, bundle.initial if full else bundle.complete(state))
    set_merged(bundle.model, None)
    steps = cfg.train.local_steps
    private, loss = None, lm_loss
    if ledger is not None:
        from fedllm_flwr.privacy.dp_sgd import plan_round, poisson_steps

        private = plan_round(ledger, cfg.privacy, len(data.train), cfg.train.batch_size, steps, cfg.num_rounds)
        batches = poisson_steps(data.train, ledger.sample_rate, collate_examples, bundle.tokenizer.pad_token_id,
                                together=True)  # fmt: skip
        loss = record_losses
    else:
        batches = iter_batches(data.train, cfg.train.batch_size, bundle.tokenizer.pad_token_id,
                               seed=cfg.seed * 1000 + partition_id, start=(server_round - 1) * steps)  # fmt: skip
    params = list(tuned_tensors(bundle.model, cfg.zo.params).values())
    draw = np.random.default_rng([cfg.seed, server_round, partition_id])
    result = zo_train(
        bundle.model, params, batches, pool.seeds, draw, steps, lambda k: cfg.zo.lr,
        cfg.zo.eps, lambda model, batch: loss(model, batch, cfg.train.response_logits), exact=not full,
        private=private,
    )  # fmt: skip
    metrics = {
        "train-loss": result.loss,
        "num-examples": len(data.train),
        "examples-seen": (steps - result.skipped) * cfg.train.batch_size,
        "skipped-steps": result.skipped,
        "seconds": result.seconds,
        "peak-memory-mb": peak_memory_mb(bundle.device),
        "partition-id": partition_id,
        "lr": cfg.zo.lr,
    }
    if ledger is not None:
        from fedllm_flwr.privacy.dp_sgd import released

        ledger.steps += steps
        metrics = released(metrics, ledger, cfg.privacy.delta)
    return result.coefficients, metrics
