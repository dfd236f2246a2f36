"""AdapterFedAvg: Flower's FedAvg over PEFT adapter weights only.

The global adapter is a per-tensor fp32 ArrayRecord on the server. Messages
carry it encoded by the downlink codec (fp16 by default; see
`fedllm_flwr.transport`), and clients answer with their update encoded by the
uplink codec, which the server adds to what it sent them. Each training reply
is validated against the global adapter (names, shapes, codec, dtype, finite
values, every reply number finite and the weight a positive count no larger
than the node's partition where the server knows it) and dropped with a logged
reason if it fails (the metric checks and the reply type live in
`fedllm_flwr.strategy.replies`); the rest are averaged in fp32, weighted by
`num-examples` (`replies.weighted_mean`). `replies.RoundLedger` keeps the per-round
accounting (bytes both ways, clients ok/failed/dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedllm_flwr.compression import Codec
from fedllm_flwr.keys import ARRAYS_KEY, MANIFEST_KEY
from fedllm_flwr.strategy.availability import Availability
from fedllm_flwr.strategy.lora_products import aggregation_error
from fedllm_flwr.strategy.replies import (
    RoundLedger,
    ValidReply,
    aggregate_client_metrics,
    check_metrics,
    partition_of,
    sat_out,
    weighted_mean,
)
from fedllm_flwr.strategy.round_setup import Registered, RoundSetup
from fedllm_flwr.transport import is_relative, manifest_of, message_bytes, pack, unpack


class ListedNodes:
    """`grid`, remembering the node ids it listed last: FedAvg's `sample_nodes` waits
    until enough nodes are connected and draws its sample from the last list it read,
    so this is the population of the round's sample (late joiners included)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.nodes: list[int] = []

    def get_node_ids(self) -> list[int]:
        self.nodes = list(self._grid.get_node_ids())
        return self.nodes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class AdapterFedAvg(Registered, FedAvg):
    """FedAvg that exchanges only adapter weights and never averages in a bad reply.
    What it learns about the run before round 1 comes in `setup`, the config's common
    knobs as keywords (`build_strategy`)."""

    def __init__(
        self, *, down: Codec | None = None, up: Codec | None = None, setup: RoundSetup | None = None,
        evaluate_due: Callable[[int], bool] | None = None, availability: Availability | None = None,
        exact_products: bool = False, clip_norm: float | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        setup = setup or RoundSetup()
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_client_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_client_metrics)
        super().__init__(arrayrecord_key=ARRAYS_KEY, **kwargs)
        self.down = down or Codec("fp16")
        """How the server encodes the adapters it sends."""
        self.up = up or Codec("fp16")
        """How clients must encode their replies."""
        self.sent: dict[int, dict[str, np.ndarray]] = {}
        """What each node was sent to train on this round, as it decodes it (the
        base its relative reply is added to)."""
        self.sees_clients = True
        """Whether each reply is one client's adapter (not SecAgg+'s one sum), so the
        round can report `lora-aggregation-error`."""
        self.exact_products = exact_products
        """Whether the mean of the clients' B A is exactly B_avg A_avg (FFA-LoRA's
        shared frozen A): `lora-aggregation-error` is then 0 by construction."""
        self.clip_norm = clip_norm
        """privacy=dp: the L2 bound every client's update must keep; the server
        enforces it on the decoded update (codec rounding may add a hair) and
        refuses replies that are not updates."""
        self.dp_denominator: int | None = None
        """privacy=dp: the number of clients sent a training message this round (set
        by `configure_train`). The new adapter is the one sent plus the sum of the
        clipped updates over this count, not over the replies that arrived: one
        client moves it by at most clip_norm / n, the sensitivity the noise is sized
        for, however many replies were dropped."""
        self.drawn: tuple[int, int] = (0, 0)
        """Flower's sample in the latest `configure_train`: (nodes it sampled, nodes
        connected that it sampled them from), before availability; privacy=dp's
        sampling rate is their ratio."""
        self._norms: list[float] = []
        self._reclipped = 0
        self.ledger = RoundLedger()
        self._expected: list[tuple[str, tuple[int, ...]]] = []
        self._expected_by_node: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        """What each node's reply must match: the names and shapes it was sent
        (the global adapter's, unless `arrays_for` sends it another)."""
        self.availability = availability
        """Simulated availability; needs `nodes` (node id -> partition-id, category)."""
        self.nodes: dict[int, Mapping[str, Any]] = dict(setup.nodes)
        self.broadcast: RecordDict | None = None
        """Records each node receives once, with its first message (FedOT's emulator)."""
        self.broadcast_bytes = 0
        self.delivered: set[int] = set()
        """Nodes that answered a message carrying the broadcast."""
        self.sampled: dict[int, set[int]] = {}
        """Nodes sent a training message, by round (to tell who never answered)."""
        self.max_examples: dict[int, int] = dict(setup.max_examples)
        """Node id -> the most `num-examples` it may claim (`RoundSetup.max_examples`)."""
        self.round_offset = setup.round_offset
        """Rounds done before this `start` (a resumed run), added to every round Flower gives."""
        self.evaluate_due: Callable[[int], bool] = evaluate_due or (lambda server_round: True)
        """Whether clients evaluate after this round (`eval.every`'s rounds in a run)."""

    def state(self) -> dict[str, np.ndarray]:
        """What this strategy carries from round to round besides the global
        adapter (none for FedAvg), as flat arrays for a checkpoint."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore `state()` (resuming a run)."""

    def merged_parts(self) -> dict[int, dict[str, np.ndarray]]:
        """Round -> the parts of the LoRA delta merged under the global adapter
        (strategy=stacking, `fedllm_flwr.lora_stacks`; none for the others)."""
        return {}

    def set_broadcast(self, records: RecordDict) -> None:
        self.broadcast = records
        self.broadcast_bytes = message_bytes(records)

    def attach_broadcast(self, server_round: int, messages: Iterable[Message]) -> None:
        """Add the broadcast to messages for nodes that have not answered one yet;
        its bytes are counted apart from the per-round adapter bytes."""
        if self.broadcast is None:
            return
        for message in messages:
            if message.metadata.dst_node_id not in self.delivered:
                for key, record in self.broadcast.items():
                    message.content[key] = record
                self.ledger.add(server_round, "bytes-broadcast", self.broadcast_bytes)

    def arrays_for(self, node_id: int, global_arrays: ArrayRecord) -> ArrayRecord:
        """The adapter sent to `node_id`: the global one (the local scenario overrides)."""
        return global_arrays

    def select_train(self, server_round: int, messages: list[Message]) -> list[Message]:
        """Which sampled nodes train this round: the available ones (the global scenario keeps one)."""
        if self.availability is None or self.availability.mode == "always":
            return messages
        chosen = []
        for message in messages:
            info = self.nodes.get(message.metadata.dst_node_id, {})
            partition = int(info.get("partition-id", message.metadata.dst_node_id))
            if self.availability.available(server_round, partition, str(info.get("category", ""))):
                chosen.append(message)
        parts = sorted(int(self.nodes.get(m.metadata.dst_node_id, {}).get("partition-id", -1)) for m in chosen)
        self.ledger.set(server_round, "participants", ",".join(map(str, parts)))
        log(INFO, "Round %s: %s of %s sampled clients available", server_round, len(chosen), len(messages))
        return chosen

    def _wire(self, arrays: ArrayRecord, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        """Give each message its own content with its adapter encoded for the wire;
        `remember` what each node decodes from it (training messages)."""
        out, packed_by_id, decoded_by_id = [], {}, {}
        for message in messages:
            node = message.metadata.dst_node_id
            own = self.arrays_for(node, arrays)
            if id(own) not in packed_by_id:
                packed_by_id[id(own)] = pack(own, self.down)
                if remember:  # the exact values the node will decode, for its relative reply
                    decoded_by_id[id(own)] = unpack(packed_by_id[id(own)])
            packed = packed_by_id[id(own)]
            if remember:
                self.sent[node] = decoded_by_id[id(own)]
                self._expected_by_node[node] = manifest_of(own)
            content = RecordDict(dict(message.content.items()))
            content[ARRAYS_KEY] = packed[ARRAYS_KEY]
            content[MANIFEST_KEY] = packed[MANIFEST_KEY]
            message.content = content
            out.append(message)
        return out

    def reconstruct(self, node: int, content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """(adapter, update) of a reply, decoded once: the update added to what `node`
        was sent, or the adapter itself when the reply is not relative (its update
        then relative to what the node was sent, if anything). ValueError if invalid."""
        expected = self._expected_by_node.get(node, self._expected)
        values = unpack(content, expected, self.up if is_relative(content) else None)
        base = self.sent.get(node)
        if not is_relative(content):
            if self.clip_norm is not None:
                raise ValueError("privacy=dp needs a clipped update, and the reply is a whole adapter")
            return values, ({k: v - base[k] for k, v in values.items()} if base is not None else None)
        if base is None:
            raise ValueError("the reply is an update, but this node was sent no adapter to train this round")
        if self.clip_norm is not None:
            values = self.enforce_clip(values)
        return {k: base[k] + v for k, v in values.items()}, values

    def enforce_clip(self, update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The update within the DP clipping norm, its norm logged for the round."""
        from fedllm_flwr.privacy.dp import clip_update, update_norm

        clipped, norm = clip_update(update, self.clip_norm)
        if norm > self.clip_norm:
            self._reclipped += 1
            norm = update_norm(clipped)
        self._norms.append(norm)
        return clipped

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._expected = manifest_of(arrays)
        listed = ListedNodes(grid)
        offered = list(super().configure_train(server_round, arrays, config, listed))
        self.drawn = (len(offered), len(listed.nodes))
        sampled = self.select_train(server_round, offered)
        self.sent, self._expected_by_node = {}, {}
        messages = self._wire(arrays, sampled, remember=True)
        if self.clip_norm is not None:
            self.dp_denominator = len(messages)
        self.ledger.add(server_round, "bytes-down", sum(message_bytes(m) for m in messages))
        self.ledger.set(server_round, "clients-sampled", len(messages))
        self.sampled[server_round] = {m.metadata.dst_node_id for m in messages}
        self.attach_broadcast(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        started = time.perf_counter()
        valid = self.validated(server_round, replies)
        if not valid:
            return None, None
        metrics = self.train_metrics_aggr_fn([r.content for r in valid], self.weighted_by_key)
        for key, value in metrics.items():
            self.ledger.set(server_round, "train-seconds" if key == "seconds" else key, value)
        combined = self.combine(server_round, valid)
        # The server's own work on the round's replies: decoding, checking, combining.
        self.ledger.set(server_round, "aggregate-seconds", round(time.perf_counter() - started, 4))
        return combined, metrics

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        """The new global adapter: the fp32 mean weighted by num-examples (under
        privacy=dp, the sum of the updates over `dp_denominator`)."""
        if self.dp_denominator:
            return ArrayRecord({k: Array(v) for k, v in self.fixed_denominator_mean(valid).items()})
        states, weights = [r.state for r in valid], [r.weight for r in valid]
        if self.sees_clients:  # what averaging A and B apart lost against the clients' B A
            error = 0.0 if self.exact_products else aggregation_error(states, weights)
            if error is not None:
                self.ledger.set(server_round, "lora-aggregation-error", error)
        mean = weighted_mean(states, weights)
        return ArrayRecord({k: Array(v) for k, v in mean.items()})

    def fixed_denominator_mean(self, valid: list[ValidReply]) -> dict[str, np.ndarray]:
        """What every node was sent plus sum(update_i) / dp_denominator, in fp32 (DP-FedAvg)."""
        base = self.sent[valid[0].node_id]  # privacy=dp runs the fed scenario: one adapter sent to all
        out = {k: np.zeros_like(v, dtype=np.float32) for k, v in base.items()}
        for reply in valid:
            for key, value in reply.state.items():
                out[key] += (value - self.sent[reply.node_id][key]).astype(np.float32)
        return {k: (base[k] + v / np.float32(self.dp_denominator)).astype(np.float32) for k, v in out.items()}

    def validated(self, server_round: int, replies: Iterable[Message]) -> list[ValidReply]:
        """Replies that may be used, after logging and counting the others."""
        valid, failed, failed_nodes = [], 0, []
        self._norms, self._reclipped = [], 0
        replies = list(replies)
        sampled = self.sampled.pop(server_round, set())
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                # The SuperLink answers for a node that stopped sending heartbeats; such
                # a reply names the SuperLink, and the node is counted below as silent.
                if node in sampled or not sampled:
                    failed += 1
                    failed_nodes.append(node)
                log(WARNING, "Round %s: node %s failed: %s", server_round, node, msg.error.reason)
                continue
            self.ledger.add(server_round, "bytes-up", message_bytes(msg))
            if sat_out(msg.content):  # the node declined the round (its privacy budget): counted, not averaged
                self.ledger.add(server_round, "clients-sat-out", 1)
                log(INFO, "Round %s: node %s sat out (privacy=dp_sgd: this round would pass its epsilon budget)",
                    server_round, node)  # fmt: skip
                continue
            try:
                if len(msg.content.metric_records) != 1:
                    raise ValueError(
                        f"the reply must carry one metric record, it has {len(msg.content.metric_records)}"
                    )
                weight = check_metrics(next(iter(msg.content.metric_records.values())), self.weighted_by_key)
                limit = self.claim_limit(node)
                if limit is not None and weight > limit:
                    raise ValueError(f"it claims {weight:g} examples, but its partition has {limit}")
                state, update = self.reconstruct(node, msg.content)
            except ValueError as exc:
                failed += 1
                failed_nodes.append(node)
                self.ledger.add(server_round, "clients-dropped", 1)
                log(WARNING, "Round %s: reply from node %s dropped: %s", server_round, node, exc)
                continue
            valid.append(ValidReply(node, state, 1.0 if self.dp_denominator else float(weight), msg.content, update))
            self.delivered.add(node)
        # Replies arrive in any order; a fixed one makes the fp32 sums reproducible.
        valid.sort(key=lambda r: (partition_of(r.content), r.node_id))
        # A node that left mid-round (or answered after the round's timeout) sends nothing.
        silent = sorted(sampled - {m.metadata.src_node_id for m in replies})
        for node in silent:
            log(WARNING, "Round %s: node %s did not answer (it left, or the round timed out)", server_round, node)
        failed += len(silent)
        failed_nodes += silent
        if self._norms:  # privacy=dp: the update norms the mean was taken over
            self.ledger.set(server_round, "update-norm-max", max(self._norms))
            self.ledger.set(server_round, "updates-reclipped", self._reclipped)
        self.ledger.set(server_round, "clients-ok", len(valid))
        self.ledger.add(server_round, "clients-failed", failed)
        if failed_nodes:
            self.ledger.set(server_round, "failed-nodes", ",".join(str(n) for n in sorted(failed_nodes)))
        log(INFO, "Round %s: %s replies valid, %s failed or dropped", server_round, len(valid), failed)
        return valid

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluate_due(server_round):
            return []
        messages = self._wire(arrays, super().configure_evaluate(server_round, arrays, config, grid))
        self.ledger.add(server_round, "eval-bytes-down", sum(message_bytes(m) for m in messages))
        self.attach_broadcast(server_round, messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for message in replies:
            if message.has_error():
                log(WARNING, "Round %s: evaluation by node %s failed: %s", server_round, message.metadata.src_node_id,
                    message.error.reason)  # fmt: skip
        ok = [m for m in replies if not m.has_error()]
        self.delivered.update(m.metadata.src_node_id for m in ok)
        self.ledger.add(server_round, "eval-bytes-up", sum(message_bytes(m) for m in ok))
        ok = self.validated_evaluations(server_round, ok)
        # Not FedAvg's own: it requires every reply to carry the same keys, and a
        # client with nothing to evaluate reports no loss.
        metrics = self.evaluate_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key) if ok else None
        for message in ok:  # each client's own figures, for per-client comparisons
            values = next(iter(message.content.metric_records.values()), None)
            if values is not None and "partition-id" in values:
                pid = int(values["partition-id"])
                for key, value in values.items():
                    if key.startswith("eval-"):
                        self.ledger.set(server_round, f"client_{pid}-held-out-{key.removeprefix('eval-')}", value)
        if metrics is not None:
            for key, value in metrics.items():
                self.ledger.set(server_round, f"client-{key}", value)
        return metrics

    def claim_limit(self, node: int) -> int | None:
        """The most examples a reply from `node` may claim (None: unknown)."""
        return self.max_examples.get(node)

    def validated_evaluations(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Evaluation replies whose numbers are all sound; the others are logged and counted."""
        valid = []
        for msg in replies:
            try:
                if len(msg.content.metric_records) != 1:
                    raise ValueError("the reply must carry one metric record")
                check_metrics(next(iter(msg.content.metric_records.values())), self.weighted_by_key, True)
            except ValueError as exc:
                self.ledger.add(server_round, "eval-dropped", 1)
                log(WARNING, "Round %s: evaluation from node %s dropped: %s", server_round, msg.metadata.src_node_id,
                    exc)  # fmt: skip
                continue
            valid.append(msg)
        return valid
