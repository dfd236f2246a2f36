"""Stacking (FLoRA, Wang et al. 2024): LoRA of unequal ranks aggregated exactly.

Each round the clients' B_k A_k are stacked along the rank axis, B's columns
weighted: B_cat = [p_1 B_1 ... p_K B_K], A_cat = [A_1; ...; A_K], so
B_cat A_cat = sum_k p_k B_k A_k exactly, whatever the ranks. Every node merges
the stack into its model as a frozen delta (`fedllm_flwr.lora_merge`) and trains a
fresh adapter on top: the global adapter each node is sent is always the seeded
initial one (B = 0) at its rank. The server keeps every round's stack, so its
evaluation and `adapter/final` (the merged delta as a peft LoRA adapter of the
stacked rank) are exact, and a node that missed rounds is sent what it lacks.

What it costs: round t's stack has sum_k r_k ranks (clients x ranks), sent to
each node once besides its adapter, so the downlink grows with the number of
clients and their ranks; each node keeps all rounds' stacks, sum over rounds of
sum_k r_k ranks, in its state, and the exported adapter has that rank too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedllm_flwr.keys import MERGED_KEY
from fedllm_flwr.strategy.adapter_fedavg import weighted_mean
from fedllm_flwr.strategy.aggregators import to_arrays
from fedllm_flwr.strategy.catch_up import CatchUp, with_count
from fedllm_flwr.strategy.lora_products import multiplying_pairs
from fedllm_flwr.strategy.ranked import RankedLoRA
from fedllm_flwr.strategy.replies import ValidReply


class Stacking(RankedLoRA):
    """FLoRA's aggregation: stack the clients' factors; nodes merge and start afresh."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stacks: dict[int, dict[str, np.ndarray]] = {}
        """Round -> its stacked factors (adapter tensor names; weights folded into B),
        as the nodes decode them."""
        self.catch_up = CatchUp()

    def merged_parts(self) -> dict[int, dict[str, np.ndarray]]:
        return self.stacks

    def _wire(self, arrays: ArrayRecord, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        out = super()._wire(arrays, messages, remember)
        for message in out:
            node = message.metadata.dst_node_id
            missing = self.catch_up.missing(node, self.stacks)
            if missing:  # a node that missed rounds catches up: every stack it lacks
                message.content[MERGED_KEY] = ArrayRecord(
                    {f"{t}/{k}": Array(v) for t in missing for k, v in self.stacks[t].items()}
                )
            with_count(message.content, len(self.stacks))
        return out

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        weights = np.asarray([r.weight for r in valid], dtype=np.float64)
        p = weights / weights.sum()
        stack = {}
        pairs = multiplying_pairs(valid[0].state)
        wire = np.float32 if self.down.name == "fp32" else np.float16  # what the nodes will decode
        for a_key, b_key in pairs:
            stack[a_key] = np.concatenate([r.state[a_key] for r in valid], axis=0).astype(wire)
            stack[b_key] = np.concatenate([pk * r.state[b_key] for pk, r in zip(p, valid, strict=True)], axis=1)
            stack[b_key] = stack[b_key].astype(wire)
        self.stacks[server_round] = stack
        for reply in valid:
            self.catch_up.confirm(reply.node_id)
        self.ledger.set(server_round, "lora-aggregation-error", 0.0)  # exact, up to the downlink's rounding
        self.ledger.set(server_round, "merged-rank", sum(s[pairs[0][0]].shape[0] for s in self.stacks.values()))
        factored = {key for pair in pairs for key in pair}
        rest = [{k: v for k, v in r.state.items() if k not in factored} for r in valid]
        # The next round starts from the initial adapter again; other tensors average as in FedAvg.
        fresh = dict(self.current)
        if rest[0]:
            fresh.update(weighted_mean(rest, list(p)))
        return to_arrays(fresh)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.catch_up.confirm_answered(replies)
        return super().aggregate_evaluate(server_round, replies)

    def state(self) -> dict[str, np.ndarray]:
        return {f"stack/{t}/{k}": v for t, stack in self.stacks.items() for k, v in stack.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.stacks = {}
        for key, value in arrays.items():
            _, done, name = key.split("/", 2)
            self.stacks.setdefault(int(done), {})[name] = value
        self.catch_up.forget()
