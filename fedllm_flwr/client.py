"""What a client does with a round: train or evaluate the adapter it was sent.

No Flower here: the ClientApp unpacks the message, calls these functions with
plain tensors, and packs the reply. The model and the client's data are cached
per process, so a worker serving many rounds loads them once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedllm_flwr.config import Config
from fedllm_flwr.data import ClientData, client_data
from fedllm_flwr.data.prompts import iter_batches
from fedllm_flwr.data.sites import partition_of
from fedllm_flwr.lora_merge import Factors, set_merged
from fedllm_flwr.model import ModelBundle, build_model, get_adapter_state, set_adapter_state
from fedllm_flwr.tasks.lm import holdout_scores
from fedllm_flwr.tasks.registry import task_of
from fedllm_flwr.train import lr_at, train_steps

if TYPE_CHECKING:
    from fedllm_flwr.privacy.ledger import DpLedger

log = logging.getLogger(__name__)
_DATA: dict[tuple, ClientData] = {}


_LOAD_SECONDS: list[float] = []


@contextlib.contextmanager
def training_threads(cfg: Config) -> Iterator[int]:
    """torch threads while this client trains, restored after. `train.threads` when set
    (`_setup` applies it to every phase), else torch's default (in a simulation, Ray's
    OMP_NUM_THREADS: one per CPU the actor holds), except under scenario=global: one
    node trains while the others wait, so it takes every core this process may use."""
    before = torch.get_num_threads()
    if cfg.scenario.one_holder and not cfg.train.threads:
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def client_bundle(cfg: Config, partition_id: int) -> ModelBundle:
    """The model this client trains and evaluates: the process's shared one, or under
    `model.share_base=false` one of its own."""
    owner = None if cfg.model.share_base else partition_id
    return build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, owner, task_of(cfg).peft_task_type)


def _setup(cfg: Config, partition_id: int, num_partitions: int) -> tuple[ModelBundle, ClientData]:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    bundle = client_bundle(cfg, partition_id)
    _LOAD_SECONDS.append(time.perf_counter() - t0)  # ~0 once this process has the model
    key = (repr(cfg.dataset), cfg.seed, partition_id, num_partitions, cfg.task.name, bundle.base_path)
    if key not in _DATA:
        _DATA[key] = client_data(cfg, bundle.tokenizer, partition_id, num_partitions)
    return bundle, _DATA[key]


def local_train(
    cfg: Config,
    state: dict[str, torch.Tensor],
    server_round: int,
    partition_id: int,
    num_partitions: int,
    local_steps: int | None = None,
    private: dict[str, torch.Tensor] | None = None,
    started: float | None = None,
    merged: Factors | None = None,
    ledger: DpLedger | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train the received adapter for `local_steps` (default `train.local_steps`) steps.

    `state` may be part of the adapter (partial sharing): the client's own
    `private` tensors, else the initial ones, fill in the rest. The full trained
    adapter is returned; `split_private` separates what is sent back.

    Round r continues the client's batch stream where round r-1 stopped, and
    the learning-rate schedule spans all rounds. `merged`: strategy=stacking's
    frozen delta under the adapter. Returns the new adapter state and the reply
    metrics (`num-examples` is the client's training-set size, FedAvg's weight).

    `ledger` (privacy=dp_sgd): this site's DP-SGD history; the round runs DP-SGD on
    Poisson-drawn records (`fedllm_flwr.privacy.dp_sgd`), its steps are added to the
    ledger, and the metrics are only those a private round may release. Raises
    `OverBudget` before training when the round would pass `privacy.target_epsilon`.
    """
    if local_steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, local_steps=local_steps))
    bundle, data = _setup(cfg, partition_id, num_partitions)
    if len(data.train) == 0:
        raise ValueError(f"client {partition_id} has no training examples")
    set_adapter_state(bundle.model, bundle.complete(private or {}, state))
    set_merged(bundle.model, merged)
    # Dropout draws depend on (seed, round, client) only, not on what this process
    # ran before: a resumed run repeats an uninterrupted one.
    torch.manual_seed(cfg.seed * 1_000_003 + server_round * 1_009 + partition_id)
    per_round = cfg.train.local_steps * cfg.train.grad_accum
    task = task_of(cfg)
    private = None
    if ledger is not None:
        from fedllm_flwr.privacy.dp_sgd import plan_round, poisson_steps

        batch = cfg.train.batch_size * cfg.train.grad_accum
        private = plan_round(ledger, cfg.privacy, len(data.train), batch, cfg.train.local_steps, cfg.num_rounds)
        batches = poisson_steps(data.train, ledger.sample_rate, task.collate, bundle.tokenizer.pad_token_id)
    else:
        batches = iter_batches(
            data.train,
            cfg.train.batch_size,
            bundle.tokenizer.pad_token_id,
            seed=cfg.seed * 1000 + partition_id,
            start=(server_round - 1) * per_round,
            collate_fn=task.collate,
        )
    start_step, total_steps = (server_round - 1) * cfg.train.local_steps, cfg.num_rounds * cfg.train.local_steps
    loss_fn = task.loss_fn(cfg, bundle)
    with training_threads(cfg) as threads, task.training(bundle.model):
        result = train_steps(
            bundle.model,
            batches,
            cfg.train,
            start_step=start_step,
            total_steps=total_steps,
            prox_mu=cfg.strategy.client_proximal_mu,
            compute_dtype=bundle.dtype,
            loss_fn=loss_fn,
            items_fn=task.items,
            private=private,
        )
    metrics = {
        "train-loss": result.loss,
        "num-examples": len(data.train),
        "examples-seen": result.examples,
        "skipped-steps": result.skipped_steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "peak-memory-mb": result.peak_memory_mb,
        "dropped-samples": data.train.dropped,
        "torch-threads": threads,
        "partition-id": partition_id,
        "lr": lr_at(start_step, total_steps, cfg.train),
        "model-load-seconds": _LOAD_SECONDS[-1],
        "process-start-seconds": started if started is not None else -1.0,
        "model-layers": bundle.model.get_base_model().config.num_hidden_layers,
        "model-parameters": sum(p.numel() for p in bundle.model.parameters()),
        **task.train_metrics(cfg, loss_fn),
    }
    if ledger is not None:
        from fedllm_flwr.privacy.dp_sgd import released

        ledger.steps += cfg.train.local_steps
        log.info("client %s round %s: DP-SGD train-loss %.4f, %s records drawn, %s clipped; "
            "epsilon %.3f at delta %g after %s steps", partition_id, server_round, result.loss, result.examples,
            private.clipped, ledger.epsilon(cfg.privacy.delta), cfg.privacy.delta, ledger.steps)  # fmt: skip
        metrics = released(metrics, ledger, cfg.privacy.delta)
    return get_adapter_state(bundle.model), metrics


def local_evaluate(
    cfg: Config,
    state: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    private: dict[str, torch.Tensor] | None = None,
    merged: Factors | None = None,
) -> dict[str, float]:
    """Loss and perplexity of the received adapter (completed with this client's
    `private` tensors, over stacking's `merged` delta) on this client's held-out split; with `eval.client_metric`,
    the dataset's generation metric too. A client with an empty held-out split
    reports `num-examples` 0 and no figures."""
    bundle, data = _setup(cfg, partition_id, num_partitions)
    if len(data.holdout) == 0:  # nothing held out: no figures (weight 0), never a NaN loss
        return {"num-examples": 0, "partition-id": partition_id}
    set_adapter_state(bundle.model, bundle.complete(private or {}, state))
    set_merged(bundle.model, merged)
    return {**task_of(cfg).local_evaluate(cfg, bundle, data), "partition-id": partition_id}


def split_private(cfg: Config, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(shared, private) parts of an adapter state under `personalize.private`."""
    shared = {k: v for k, v in state.items() if not cfg.personalize.is_private(k)}
    return shared, {k: v for k, v in state.items() if cfg.personalize.is_private(k)}


def personalize(
    cfg: Config,
    state: dict[str, torch.Tensor],
    partition_id: int,
    num_partitions: int,
    private: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """FedAvg + FT: score the global adapter (completed with this client's
    `private` tensors) on this client's held-out split, tune it
    `personalize.ft_steps` steps on the client's data at constant `train.lr`, and
    score it again. Returns the whole personalized adapter and before/after metrics.
    Dropout and the batch order depend on (seed, client) only."""
    steps = cfg.personalize.ft_steps
    ft_cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, local_steps=steps, lr_schedule="constant", warmup_steps=0)
    )
    bundle, data = _setup(ft_cfg, partition_id, num_partitions)
    set_adapter_state(bundle.model, bundle.complete(private or {}, state))
    set_merged(bundle.model, None)
    before = holdout_scores(cfg, bundle, data)
    seed = cfg.seed * 1_000_003 + 500_009 + partition_id  # apart from every round's (see local_train)
    torch.manual_seed(seed)
    batches = iter_batches(data.train, cfg.train.batch_size, bundle.tokenizer.pad_token_id, seed=seed)
    result = train_steps(bundle.model, batches, ft_cfg.train, compute_dtype=bundle.dtype)
    after = holdout_scores(cfg, bundle, data)
    metrics = {f"before-{k}": v for k, v in before.items()} | {f"after-{k}": v for k, v in after.items()}
    metrics.update({"num-examples": len(data.train), "partition-id": partition_id, "ft-loss": result.loss})
    return get_adapter_state(bundle.model), metrics


def save_personalized(
    cfg: Config, state: dict[str, torch.Tensor], partition_id: int, num_partitions: int, run_name: str
) -> Path:
    """Keep a personalized adapter on this node (`Config.personalized_stays_on_nodes`), in
    peft's format: `adapter/personalized/client_<partition>/` of the run folder named
    `run_name` under this node's own `$FEDLLM_FLWR_HOME` and `run.output_dir` (in a
    simulation, the server's run folder). Written whole or not at all."""
    from fedllm_flwr.files import publish, temp_folder
    from fedllm_flwr.run_dir import resolve_run_path

    if not run_name:
        raise ValueError("the personalization message names no run folder to keep the adapter in")
    bundle, _ = _setup(cfg, partition_id, num_partitions)
    run = resolve_run_path(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=run_name)))
    target = run / "adapter" / "personalized" / f"client_{partition_id}"
    set_adapter_state(bundle.model, state)
    with temp_folder(target.parent, target.name) as tmp:
        bundle.model.save_pretrained(tmp)
        publish(tmp, target, replace=True)
    return target


def warm_up(cfg: Config, node_config: dict, with_model: bool = True) -> dict[str, int | str]:
    """Load what this process will need to train (the model, the client's data)
    before the first round asks for it; without the model when the first round brings
    it (`with_model=False`, the algorithm's `model_before_first_round`). Best effort: a
    problem is reported in the reply, and the server's own checks name it to the user."""
    try:
        partition_id, num_partitions = partition_of(node_config)
        if not with_model:
            from fedllm_flwr.data import train_set

            train_set(cfg)
        else:
            _setup(cfg, partition_id, num_partitions)
    except Exception as exc:  # noqa: BLE001 - nothing here may fail the run
        return {"warm": 0, "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"warm": 1}
