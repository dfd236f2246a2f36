"""Stacking (FLoRA, Wang et al. 2024): LoRA of unequal ranks aggregated exactly.

Each round the clients' B_k A_k are stacked along the rank axis, B_cat =
[B_1 ... B_K], A_cat = [A_1; ...; A_K], with each client's weight p_k kept beside
them, one fp32 weight per rank: B_cat diag(w) A_cat = sum_k p_k B_k A_k exactly,
whatever the ranks. Every node merges the stacks into its model as a frozen delta
(`fedllm_flwr.lora_merge`) and trains a fresh adapter on top: the global adapter
each node is sent is always the seeded initial one (B = 0) at its rank. The server
holds every part of the delta (`fedllm_flwr.lora_stacks.HeldStacks`), so its
evaluation and `adapter/final` (the merged delta as a peft LoRA adapter) are exact,
and a node that missed rounds is sent the parts it lacks.

A module's stacked rank stops at min(in, out): past it, the server re-factors the
module's parts by QR at rank min(in, out) (the same product), and sends that
compaction, which takes the place of the rounds it covers on every node.

What it costs: round t's stack has sum_k r_k ranks per module (clients x ranks), sent
to each node once besides its adapter. Once a module is compacted, each later round
re-factors it, and every node is sent its min(in, out) ranks again rather than the
round's sum_k r_k: the downlink grows with the rounds until the modules reach
min(in, out), then stays there. A node keeps at most min(in, out) ranks per module
in its state, and the exported adapter has at most that rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedllm_flwr.keys import MERGED_KEY
from fedllm_flwr.lora_stacks import HeldStacks, Parts, flat_of, module_of, parts_of, stack_part
from fedllm_flwr.strategy.aggregators import to_arrays
from fedllm_flwr.strategy.catch_up import CatchUp, with_count
from fedllm_flwr.strategy.lora_products import multiplying_pairs
from fedllm_flwr.strategy.ranked import RankedLoRA
from fedllm_flwr.strategy.replies import ValidReply, weighted_mean


class Stacking(RankedLoRA):
    """FLoRA's aggregation: stack the clients' factors; nodes merge and start afresh."""

    merges_stacks = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.held = HeldStacks()
        """Every part of the merged delta, exactly as the nodes decode and keep them."""
        self.catch_up = CatchUp()

    def merged_parts(self) -> Parts:
        return self.held.parts

    def _wire(self, arrays: ArrayRecord, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        out = super()._wire(arrays, messages, remember)
        for message in out:
            node = message.metadata.dst_node_id
            missing = self.catch_up.missing(node, self.held.parts)
            if missing:  # a node that missed rounds catches up: every part it lacks
                lacking = flat_of({t: self.held.parts[t] for t in missing})
                message.content[MERGED_KEY] = ArrayRecord({k: Array(v) for k, v in lacking.items()})
            with_count(message.content, self.held.rounds_held())
        return out

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        weights = np.asarray([r.weight for r in valid], dtype=np.float64)
        p = weights / weights.sum()
        pairs = multiplying_pairs(valid[0].state)
        wire = np.float32 if self.down.name == "fp32" else np.float16  # what the nodes will decode
        stack = {}
        for a_key, b_key in pairs:
            a_list, b_list = [r.state[a_key] for r in valid], [r.state[b_key] for r in valid]
            stack.update(stack_part(module_of(a_key), a_list, b_list, p, wire))
        self.held.receive({server_round: stack})
        self.held.compact(server_round, wire)
        for reply in valid:
            self.catch_up.confirm(reply.node_id)
        self.ledger.set(server_round, "lora-aggregation-error", 0.0)  # exact, up to the downlink's rounding
        self.ledger.set(server_round, "merged-rank", self.held.max_rank())
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
        return {f"stack/{k}": v for k, v in flat_of(self.held.parts).items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.held = HeldStacks(parts_of({k.removeprefix("stack/"): v for k, v in arrays.items()}))
        self.catch_up.forget()
