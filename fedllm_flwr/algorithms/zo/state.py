"""What a node keeps between zeroth-order messages (`algorithm=zo`), in Flower's
`context.state` beside the rest of `NodeState`: its copy of the global adapter, or
(zo.params=full) the fingerprint naming its copy of the global weights on disk, and
how many rounds' steps that copy has applied. Light at import (records only)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedllm_flwr.keys import ZO_ROUND_KEY, ZO_STATE_KEY


@dataclass
class ZoState:
    """A node's zeroth-order state; `NodeState.zo`."""

    adapter: ArrayRecord | None = None
    """zo.params=adapter: this node's copy of the global adapter, after round `round`."""
    round: int = 0
    """The last round whose steps the copy has applied."""
    count: int = 0
    """How many rounds' steps the copy has applied."""
    seconds: float = 0.0
    """How long this message's catch-up took (not kept)."""
    weights: str = ""
    """zo.params=full: the fingerprint of the history of this node's global weights,
    which names their file in its `full_weights.WeightStore` (on disk, not in the context)."""

    @classmethod
    def load(cls, state: RecordDict) -> ZoState:
        kept = state.config_records.get(ZO_ROUND_KEY) or {}
        return cls(
            adapter=state.array_records.get(ZO_STATE_KEY), round=int(kept.get("round", 0)),
            count=int(kept.get("count", 0)), weights=str(kept.get("weights", "")),
        )  # fmt: skip

    def save(self, state: RecordDict) -> None:
        if self.adapter is not None:
            state[ZO_STATE_KEY] = self.adapter
        if self.adapter is not None or self.weights:
            state[ZO_ROUND_KEY] = ConfigRecord({"round": self.round, "count": self.count, "weights": self.weights})
