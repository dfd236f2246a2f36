"""Secure aggregation (privacy=secagg): every training round runs Flower's SecAgg+ protocol.

The server's side: `SecAggFedAvg` and `SecAggGrid` (the client's side is in
`fedllm_flwr.privacy.secagg_client`).

The server learns the weighted mean of the clients' adapter updates and never
one of them. Each round, instead of one train message and reply per client,
`SecAggGrid` runs the four stages of Flower's `SecAggPlusWorkflow` on the real
grid: setup and key exchange; our usual train message (the global adapter,
encoded as always) with the key shares each client needs, answered by a
masked, quantized update (the ClientApp's `secaggplus_mod` masks what our
train handler returns); and unmasking, which recovers the masks of a client
that dropped out after the key exchange from its neighbours' shares, as long
as `privacy.reconstruction_threshold` of them remain. The unmasked mean comes
back to `SecAggFedAvg` as one reply, an update relative to the global adapter,
and is applied like any other.

What SecAgg+ changes: updates are quantized to `privacy.quantization_range`
levels over +-`privacy.clipping_range` after being scaled by weight /
`privacy.max_weight` (a step of 3.8e-6 at the defaults), and clients' training
metrics (loss, example counts) still reach the server in the clear.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from types import SimpleNamespace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from fedllm_flwr.compression import Codec
from fedllm_flwr.config import PrivacyConfig
from fedllm_flwr.errors import UserError
from fedllm_flwr.keys import SERVER_ROUND_KEY, SUM_KEY
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.registry import build_strategy
from fedllm_flwr.strategy.replies import aggregate_client_metrics
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.transport import message_bytes, pack


class SecAggFedAvg(AdapterFedAvg):
    """AdapterFedAvg whose training rounds go through SecAgg+ (see the module docstring)."""

    def __init__(self, *, secagg: PrivacyConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.secagg = secagg
        self.up = Codec("fp32")  # the protocol's mean reaches the strategy unrounded
        self.sees_clients = False  # the one reply is the protocol's sum: no client's B A to compare

    def start(self, grid, *args, **kwargs):  # noqa: ANN001 - Flower's signature
        return super().start(SecAggGrid(grid, self), *args, **kwargs)

    def check_weight(self, weight: float) -> None:
        """SecAgg+ caps every client's weight at `privacy.max_weight` (the client only
        warns), which would silently skew the mean: a larger weight stops the run."""
        if weight > self.secagg.max_weight:
            raise UserError(
                f"privacy.max_weight={self.secagg.max_weight:g} is below a client's {weight:g} training examples: "
                f"SecAgg+ would cap its weight and skew the mean; set privacy.max_weight={weight:g} or more"
            )

    def claim_limit(self, node: int) -> int | None:
        """None: the one reply is the protocol's sum over clients, whose weights
        `SecAggGrid` checked one by one."""
        return None

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001 - Flower's signature
        if self.max_examples:  # simulation: every partition's size is known before round 1
            self.check_weight(max(self.max_examples.values()))
        return super().configure_train(server_round, arrays, config, grid)

    def validated(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        valid = super().validated(server_round, replies)
        # The one reply is the protocol's sum: count the clients in it, and the bytes
        # the protocol moved (SecAggGrid), not this reply's.
        ledger = self.ledger.rounds[server_round]
        ledger["bytes-up"] = ledger.pop("secagg-bytes-up", 0)
        if valid:
            metrics = next(iter(valid[0].content.metric_records.values()))
            ledger["clients-ok"] = int(metrics[SUM_KEY])
        return valid


class SecAggGrid:
    """A Grid whose training round trips run SecAgg+; everything else passes through."""

    def __init__(self, grid, strategy: SecAggFedAvg) -> None:  # noqa: ANN001
        self.grid, self.strategy = grid, strategy

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return list(self.grid.send_and_receive(messages, timeout=timeout))
        return self.secure_round(messages)

    def secure_round(self, messages: list[Message]) -> list[Message]:
        from flwr.common import FitIns, Parameters, parameters_to_ndarrays
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
        from flwr.server.workflow.constant import Key as WorkflowKey
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        p, strategy = self.strategy.secagg, self.strategy
        round_ = int(messages[0].content["config"][SERVER_ROUND_KEY])  # already counts a resumed run's rounds
        counting = _CountingGrid(self.grid)
        captured: dict[str, Any] = {}

        def configure_fit(current_round, parameters, client_manager):  # noqa: ANN001
            empty = FitIns(Parameters(tensors=[], tensor_type=""), {})  # replaced by our own messages below
            return [(SimpleNamespace(node_id=m.metadata.dst_node_id), empty) for m in messages]

        def aggregate_fit(current_round, results, failures):  # noqa: ANN001
            captured["results"], captured["failures"] = results, failures
            return (results[0][1].parameters if results else None), {}

        context = SimpleNamespace(
            state=RecordDict({
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_}),
                MAIN_PARAMS_RECORD: ArrayRecord(),
            }),
            strategy=SimpleNamespace(configure_fit=configure_fit, aggregate_fit=aggregate_fit),
            client_manager=SimpleNamespace(num_available=lambda: len(messages)),
            history=SimpleNamespace(add_metrics_distributed_fit=lambda **_: None),
        )  # fmt: skip
        workflow = SecAggPlusWorkflow(
            _count(p.num_shares), _count(p.reconstruction_threshold), max_weight=p.max_weight,
            clipping_range=p.clipping_range, quantization_range=p.quantization_range, timeout=p.timeout,
        )  # fmt: skip
        state = WorkflowState()
        done = workflow.setup_stage(counting, context, state) and workflow.share_keys_stage(counting, context, state)
        if done:
            # Our own train messages carry the round to every client still in the protocol.
            own = {m.metadata.dst_node_id: m.content for m in messages}
            state.nid_to_fitins = {nid: own[nid] for nid in state.nid_to_fitins}
            done = workflow.collect_masked_vectors_stage(counting, context, state)
            done = done and workflow.unmask_stage(counting, context, state)
        strategy.ledger.add(round_, "secagg-bytes-up", counting.bytes_up)
        strategy.ledger.add(round_, "secagg-bytes-down", counting.bytes_down)
        sampled = {m.metadata.dst_node_id for m in messages}
        dropped = sorted(sampled - state.active_node_ids) if done else sorted(sampled)
        strategy.ledger.add(round_, "clients-failed", len(dropped))
        if dropped:
            strategy.ledger.set(round_, "failed-nodes", ",".join(map(str, dropped)))
        if not done or not captured.get("results"):
            log(WARNING, "Round %s: secure aggregation halted (too few clients stayed); no update", round_)
            strategy.sampled.pop(round_, None)
            return []
        results = captured["results"]
        for proxy, fit in results:  # the weights reach the server in the clear (see the module docstring)
            strategy.check_weight(fit.num_examples)
            limit = strategy.max_examples.get(getattr(proxy, "node_id", None))
            if limit is not None and fit.num_examples > limit:
                log(WARNING, "Round %s: node %s claims %s examples, but its partition has %s; no update", round_,
                    proxy.node_id, fit.num_examples, limit)  # fmt: skip
                strategy.sampled.pop(round_, None)
                return []
        mean = [np.asarray(a, dtype=np.float32) for a in parameters_to_ndarrays(results[0][1].parameters)]
        log(INFO, "Round %s: SecAgg+ summed the updates of %s clients (%s dropped out)", round_, len(results),
            len(dropped))  # fmt: skip
        strategy.sampled[round_] = set()  # who answered is the protocol's business, counted above
        return [self.aggregate_reply(messages[0], mean[0], results)]

    def aggregate_reply(self, first: Message, flat: np.ndarray, results: list) -> Message:
        """The protocol's mean update as one relative reply, with the clients' metrics combined."""
        manifest = self.strategy._expected
        sizes = [int(np.prod(shape)) for _, shape in manifest]
        parts, offset = {}, 0
        for (name, shape), size in zip(manifest, sizes, strict=True):
            parts[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        content = pack(parts, Codec("fp32"), relative=True)
        records = [RecordDict({"metrics": MetricRecord({**fit.metrics, "num-examples": fit.num_examples})})
                   for _, fit in results]  # fmt: skip
        metrics = aggregate_client_metrics(records, "num-examples")
        metrics[SUM_KEY] = len(results)
        metrics["partition-id"] = -1
        content["metrics"] = metrics
        return Message(content, reply_to=first)


def _count(value: float) -> int | float:
    """Flower reads an int as a count and a float as a share of the sampled clients."""
    return int(value) if value > 1 else float(value)


class _CountingGrid:
    """The real grid, counting the bytes of every protocol message both ways."""

    def __init__(self, grid) -> None:  # noqa: ANN001
        self.grid, self.bytes_up, self.bytes_down = grid, 0, 0

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001
        messages = list(messages)
        self.bytes_down += sum(message_bytes(m) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(message_bytes(m) for m in replies if not m.has_error())
        return replies


def secagg_strategy(cfg, setup: RoundSetup | None = None) -> SecAggFedAvg:  # noqa: ANN001 - a Config
    """The run's strategy with its training rounds under SecAgg+ (fedavg or fedprox in the
    fed scenario: the config refuses the rest); `setup` as `build_strategy` takes it."""
    return build_strategy(cfg, SecAggFedAvg, setup=setup, secagg=cfg.privacy)
