"""What a node does with each message, and what it keeps between messages.

One function per message type (`train`, `evaluate`, `query`) takes the message's
content, the run's and the node's config and the node's `NodeState`, and returns
the reply's content, so a test drives a node with records and dicts, no Flower app
or simulation. `handle` wires a Flower message and its context to them: it is what
the ClientApp runs, in its own process or in a warm site worker
(`fedllm_flwr.site_worker`), which receives the message and context as protobufs.

Light at import: Flower imports the ClientApp before it starts any worker, and a
deployed SuperNode starts a fresh process for every message. The ML stack is
imported by the functions that need it; a plain `query` (a node describing its
data) never loads torch or the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedllm_flwr.algorithms.registry import algorithm_for
from fedllm_flwr.algorithms.zo.state import ZoState
from fedllm_flwr.keys import (
    CLIPPING_NORM_KEY,
    DATA_KEY,
    FEEDBACK_KEY,
    MERGED_KEY,
    PERSONALIZE_KEY,
    PRIVATE_KEY,
    ROUNDS_HELD_KEY,
    RUN_NAME_KEY,
    SAT_OUT_KEY,
    SERVER_ROUND_KEY,
    STEPS_KEY,
    WARM_UP_KEY,
)
from fedllm_flwr.privacy.ledger import DpLedger

if TYPE_CHECKING:
    from flwr.app import Context, Message

Config = Mapping[str, Any]  # Flower's run and node configs: flat str -> scalar maps


@dataclass
class NodeState:
    """What a node keeps between its messages, in Flower's `context.state`:
    its own adapter tensors under partial sharing, and the residual of its
    error feedback under a lossy uplink codec."""

    private: ArrayRecord | None = None
    residual: np.ndarray | None = None
    merged: ArrayRecord | None = None
    """strategy=stacking: the parts of the merged delta this node holds, the server's bits
    ("<round>/<module>/<field>", `fedllm_flwr.lora_stacks`)."""
    zo: ZoState = field(default_factory=ZoState)
    """algorithm=zo: this node's copy of the global model and how many rounds it has applied."""
    dp: DpLedger = field(default_factory=DpLedger)
    """privacy=dp_sgd: what this site has spent of its privacy budget."""
    identity: str = ""
    """Which node of which run this is ("run<Flower run id>-node<Flower node id>"), given
    by the ClientApp with each message (not kept): names what the node keeps outside the
    context, the same across retries of a message (zo.params=full's weight files)."""

    @classmethod
    def load(cls, state: RecordDict, identity: str = "") -> NodeState:
        feedback = state.array_records.get(FEEDBACK_KEY)
        residual = feedback["residual"].numpy() if feedback is not None else None
        merged = state.array_records.get(MERGED_KEY)
        return cls(private=state.array_records.get(PRIVATE_KEY), residual=residual, merged=merged,
                   zo=ZoState.load(state), dp=DpLedger.load(state), identity=identity)  # fmt: skip

    def save(self, state: RecordDict) -> None:
        if self.private is not None:
            state[PRIVATE_KEY] = self.private
        if self.residual is not None:
            state[FEEDBACK_KEY] = ArrayRecord({"residual": Array(self.residual)})
        if self.merged is not None:
            state[MERGED_KEY] = self.merged
        self.zo.save(state)
        self.dp.save(state)

    def merge(self, content: RecordDict):
        """Take the parts of the merged delta a message carries (strategy=stacking) into
        those kept before, as the server did (`HeldStacks.receive`: a compaction replaces
        the rounds it covers); the delta of all of them, per LoRA module, or None."""
        from fedllm_flwr.lora_merge import stacked
        from fedllm_flwr.lora_stacks import HeldStacks, flat_of, parts_of

        held = HeldStacks(parts_of({k: v.numpy() for k, v in self.merged.items()}) if self.merged else None)
        new = content.array_records.get(MERGED_KEY)
        if new is not None:  # a round sent twice (a reply lost) is the same round
            held.receive(parts_of({k: v.numpy() for k, v in new.items()}))
            self.merged = ArrayRecord({k: Array(v) for k, v in flat_of(held.parts).items()})
        expected = content["config"].get(ROUNDS_HELD_KEY) if "config" in content else None
        if expected is not None and held.rounds_held() != int(expected):
            raise ValueError(f"this node holds {held.rounds_held()} rounds' stacks and the global model {expected}")
        return stacked(held.parts) if held.parts else None

    def private_state(self):
        """The kept private tensors as a state dict (torch), or None."""
        from fedllm_flwr.transport import arrays_to_state

        return arrays_to_state(self.private) if self.private is not None else None


def handle(kind: str, msg: Message, context: Context, started: float | None = None) -> RecordDict:
    """The reply's content for a message of `kind` ("train", "evaluate" or "query"),
    with this node's `NodeState` loaded from and saved back into `context.state`
    (only once the message succeeded). `started`: seconds this message's process took
    to start up before the handler (`process-start-seconds`); by default this
    process's age, which a warm site worker replaces with its proxy's."""
    if kind == "query":
        return query(msg.content, context.run_config, context.node_config)
    state = NodeState.load(context.state, identity=f"run{context.run_id}-node{context.node_id}")
    if kind == "train":
        reply = train(msg.content, context.run_config, context.node_config, state, started)
    elif kind == "evaluate":
        reply = evaluate(msg.content, context.run_config, context.node_config, state)
    else:
        raise ValueError(f"no node function for message kind {kind!r}")
    state.save(context.state)  # what the message brought to keep (stacking's stacks, zeroth-order steps)
    return reply


def train(
    content: RecordDict, run_config: Config, node_config: Config, node: NodeState, started: float | None = None
) -> RecordDict:
    """Train the adapter the message carries on this node's data; reply with the
    update (or, after the last round, FedAvg + FT's personalized adapter).
    `started`: this message's process start-up in seconds (default: this process's age)."""
    from fedllm_flwr.client import local_train, personalize, save_personalized, split_private
    from fedllm_flwr.compression import codecs
    from fedllm_flwr.data.sites import partition_of
    from fedllm_flwr.metrics import process_age_seconds
    from fedllm_flwr.transport import pack, state_to_arrays, unpack_state, update_between

    if started is None:
        started = process_age_seconds()
    cfg = node_cfg(content, run_config, node_config)
    partition_id, num_partitions = partition_of(node_config)
    config = content["config"]
    from fedllm_flwr.privacy.dp_sgd import OverBudget

    try:
        own = algorithm_for(cfg).train(cfg, content, node, partition_id, num_partitions)
    except OverBudget as exc:
        return _sat_out(exc, partition_id, node)
    if own is not None:  # the algorithm's own messages (algorithm=zo: seed lists both ways, no adapter)
        return own
    down, up = codecs(cfg.compression)
    received = unpack_state(content, codec=down)
    if config.get(PERSONALIZE_KEY):  # after the last round: FedAvg + FT
        state, metrics = personalize(cfg, received, partition_id, num_partitions, node.private_state())
        if cfg.privacy.record_level:  # tuned without DP-SGD: the adapter stays here, and so does its loss
            metrics.pop("ft-loss", None)
        if cfg.personalized_stays_on_nodes:  # private tensors or a protected run: only the scores leave
            save_personalized(cfg, state, partition_id, num_partitions, str(config.get(RUN_NAME_KEY, "")))
            return RecordDict({"metrics": MetricRecord(metrics)})
        reply = pack(state)
        reply["metrics"] = MetricRecord(metrics)
        return reply
    if config.get(DATA_KEY) == "all":  # scenario=global: this node holds everyone's data
        partition_id, num_partitions = 0, 1
    steps = int(config[STEPS_KEY]) if STEPS_KEY in config else None
    try:
        state, metrics = local_train(
            cfg, received, int(config[SERVER_ROUND_KEY]), partition_id, num_partitions, steps,
            private=node.private_state(), started=started, merged=_merged(cfg, content, node),
            ledger=node.dp if cfg.privacy.record_level else None,
        )  # fmt: skip
    except OverBudget as exc:
        return _sat_out(exc, partition_id, node)
    state, private = split_private(cfg, state)
    if private:
        node.private = state_to_arrays(private)
    update = update_between(state, received)
    from fedllm_flwr.privacy.secagg_client import private_reply

    masked = private_reply(cfg, update, metrics)  # privacy=secagg: flat, for Flower's secaggplus_mod to mask
    if masked is not None:
        return masked
    clip = config.get(CLIPPING_NORM_KEY)  # privacy=dp: Flower's DP wrapper sends the norm
    if clip is not None:
        from fedllm_flwr.privacy.dp import clip_update

        update, _ = clip_update(update, float(clip))
    feedback = _feedback(cfg, node)
    reply = pack(update, up, relative=True, feedback=feedback)
    if feedback is not None:
        node.residual = feedback.residual
    reply["metrics"] = MetricRecord(metrics)
    return reply


def _sat_out(exc: Exception, partition_id: int, node: NodeState) -> RecordDict:
    """privacy=dp_sgd: the site keeps its budget (`OverBudget`): it sits the round out and
    says so, with what it has spent."""
    return RecordDict({"metrics": MetricRecord({SAT_OUT_KEY: 1, "partition-id": partition_id,
                                                "dp-epsilon": exc.spent, "dp-steps": node.dp.steps})})  # fmt: skip


def evaluate(content: RecordDict, run_config: Config, node_config: Config, node: NodeState) -> RecordDict:
    """Score the adapter the message carries on this node's held-out data."""
    from fedllm_flwr.client import local_evaluate
    from fedllm_flwr.compression import codecs
    from fedllm_flwr.data.sites import partition_of
    from fedllm_flwr.transport import unpack_state

    cfg = node_cfg(content, run_config, node_config)
    partition_id, num_partitions = partition_of(node_config)
    received = algorithm_for(cfg).evaluated_adapter(cfg, content, node, partition_id)
    if received is None:  # the message's adapter
        received = unpack_state(content, codec=codecs(cfg.compression)[0])
    merged = _merged(cfg, content, node)
    metrics = local_evaluate(cfg, received, partition_id, num_partitions, node.private_state(), merged)
    return RecordDict({"metrics": MetricRecord(metrics)})


def query(content: RecordDict, run_config: Config, node_config: Config) -> RecordDict:
    """The node's partition, main data category and LoRA rank (for the server's
    log, simulated availability and unequal ranks), or a warm-up: load the model
    and this node's data ahead of training (simulation)."""
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data.sites import partition_of, rank_key, site_config, site_data_config, site_rank

    _quiet()
    config = content.config_records.get("config")
    if config is not None and config.get(WARM_UP_KEY):
        from fedllm_flwr.client import warm_up

        cfg = site_config(load_cfg(run_config), node_config)
        info = warm_up(cfg, node_config, with_model=algorithm_for(cfg).model_before_first_round)
    else:
        from fedllm_flwr.data import main_category

        cfg = site_data_config(load_cfg(run_config), node_config)
        partition_id, num_partitions = partition_of(node_config)
        info = {
            "partition-id": partition_id,
            "num-partitions": num_partitions,
            "category": main_category(cfg, partition_id, num_partitions),
        }
        try:  # a rank it cannot have is the server's to report, with every node's
            info["lora-rank"] = site_rank(cfg, node_config)
            info["rank-key"] = rank_key(cfg, node_config)
        except ValueError as exc:
            info["rank-error"] = str(exc)
    return RecordDict({"info": ConfigRecord(info)})


def node_cfg(content: RecordDict, run_config: Config, node_config: Config):
    """The run's config for this node: its own data file (dataset.source=sites)
    and what its algorithm makes of the message (FedOT: the emulator to train on,
    installed from the message when it carries one)."""
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data.sites import site_config

    _quiet()
    cfg = site_config(load_cfg(run_config), node_config)
    return algorithm_for(cfg).node_config(cfg, content)


def _quiet() -> None:
    from fedllm_flwr import quiet_third_party_output

    quiet_third_party_output()


def _merged(cfg, content: RecordDict, node: NodeState):
    """strategy=stacking: the frozen delta under the adapter (`NodeState.merge`); else None."""
    return node.merge(content) if cfg.strategy.merges_stacks else None


def _feedback(cfg, node: NodeState):
    """This node's error feedback for a lossy uplink codec, with its residual so far."""
    from fedllm_flwr.compression import ErrorFeedback, codecs

    if not cfg.compression.lossy_feedback:
        return None
    return ErrorFeedback(codecs(cfg.compression)[1], node.residual)


# What a warm site worker (`fedllm_flwr.site_worker.server`) asks of the node's module
# around `handle`: a worker keeps this process's caches from one message to the next.


def fingerprint(msg: Message, context: Context) -> dict:
    """What this node's caches hold for a message, that can change on disk or between
    runs under the same code and environment: "model" (the base model's folder, the
    stat of its files, and what else keys the loaded base; an algorithm whose model is
    the whole model, zo.params=full, changes the base in place, so there it is the
    run's own) and "data" (the stat of the site's
    data file)."""
    import os
    from pathlib import Path

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data.sites import site_config
    from fedllm_flwr.model_files import resolve_model

    cfg = site_config(load_cfg(context.run_config), context.node_config)
    path = resolve_model(cfg.model)
    folder = Path(path)
    files = sorted([folder / "config.json", *folder.glob("*.safetensors")]) if folder.is_dir() else []
    model = [path, [[f.name, f.stat().st_mtime_ns, f.stat().st_size] for f in files if f.is_file()],
             cfg.model.quantization, cfg.train.precision, cfg.seed, cfg.task.name,
             context.run_id if algorithm_for(cfg).model_saver is not None else None]  # fmt: skip
    data_path = str(context.node_config.get("data-path", ""))
    data = None
    if data_path and os.path.exists(data_path):
        info = os.stat(data_path)
        data = [os.path.realpath(data_path), info.st_mtime_ns, info.st_size]
    return {"model": model, "data": data}


def forget_data() -> None:
    """Drop every cache of what was read from the site's data (its file changed)."""
    from fedllm_flwr import client, data

    client._DATA.clear()
    data._RECORDS.clear()
    data._TRAIN_SETS.clear()


_THREADS: list[int] = []


def reset_process() -> None:
    """Undo what an earlier message changed in this process: torch's thread count
    (`train.threads` is set, never restored) and the peak memory the kernel reports
    (`peak-memory-mb` is then this message's, on Linux)."""
    import torch

    if not _THREADS:
        _THREADS.append(torch.get_num_threads())  # before any message set it
    torch.set_num_threads(_THREADS[0])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size (Linux >= 4.0)
    except OSError:
        pass
