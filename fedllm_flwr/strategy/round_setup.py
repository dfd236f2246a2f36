"""What a strategy class tells the registry, and what it learns about a run before round 1.

`Registered`: the names a class serves, how it reads its own config keys, and what the
server must know about it before building it (`fedllm_flwr.strategy.registry.STRATEGY_CLASSES`).
`RoundSetup`: `server.run` builds one once the nodes are known (a ranked strategy's
ranks, the descriptions availability and a resumed local run need, the partition
sizes a simulation's server knows, a resumed run's rounds) and passes it to
`build_strategy`; the strategy copies what it needs in its constructor, so nothing is
set on it from outside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from fedllm_flwr.config import Config


@dataclass(frozen=True)
class RoundSetup:
    nodes: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    """Node id -> its description (partition-id, num-partitions, category, a LoRA
    rank), where the server asked (`fedllm_flwr.server.nodes.discover_nodes`)."""
    max_examples: Mapping[int, int] = field(default_factory=dict)
    """Node id -> the most `num-examples` it may claim (its partition's training
    size, where the server knows it: simulation). A larger claim is dropped."""
    round_offset: int = 0
    """Rounds done before this start (a resumed run): Flower counts from 1, so the
    strategy adds this to every round it is given."""
    ranks: Mapping[int, int] = field(default_factory=dict)
    """Unequal LoRA ranks: node id -> its rank, learned before round 1."""
    ask_ranks: Callable[[list[int]], dict[int, int | str]] | None = None
    """Unequal LoRA ranks: asks a node that connects later (`fedllm_flwr.server.ranks.RankQuery`)."""


class Registered:
    """What the registry and the server read from a strategy class, before any is built."""

    names: ClassVar[tuple[str, ...]] = ()
    """The `strategy.name`s this class serves."""
    scenario: ClassVar[str] = "fed"
    """The `scenario.name` this class runs; `fed` is every aggregation rule's own."""
    learns_ranks: ClassVar[bool] = False
    """Whether the server learns every node's LoRA rank before round 1 (unequal ranks)."""
    merges_stacks: ClassVar[bool] = False
    """Whether nodes merge the stacked delta under a fresh adapter (`NodeState.merge`)."""
    holds_all_data: ClassVar[bool] = False
    """Whether one node trains on every partition's data (the most examples it may claim)."""
    finds_nodes_by_partition: ClassVar[bool] = False
    """Whether a resumed run must have the nodes described to find each one's own state."""

    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        """This class's own constructor arguments, read from its config keys (none by default)."""
        return {}
