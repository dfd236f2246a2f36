"""Client availability for simulations: who can answer in a round.

Each client answers in round t with probability p_i: the same p for all
(`uniform`), one per partition (`per_client`), or one per data category
(`category`, MIFA's adversarial setting: whole kinds of data come and go
together). The draw is a pure function of (seed, round, partition), so a run
repeats exactly. Unavailable clients are not sampled that round.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Availability:
    mode: str = "always"
    """always, uniform, per_client or category."""
    p: float = 1.0
    """uniform: every client's probability; the fallback for the other modes."""
    per_client: list[float] = field(default_factory=list)
    """per_client: probability of partition i (missing entries use `p`)."""
    per_category: dict[str, float] = field(default_factory=dict)
    """category: probability of a client whose main data category is the key."""
    seed: int = 0

    def probability(self, partition: int, category: str = "") -> float:
        if self.mode == "always":
            return 1.0
        if self.mode == "per_client" and partition < len(self.per_client):
            return self.per_client[partition]
        if self.mode == "category":
            return self.per_category.get(category, self.p)
        return self.p

    def available(self, server_round: int, partition: int, category: str = "") -> bool:
        p = self.probability(partition, category)
        if p >= 1.0:
            return True
        draw = random.Random(f"{self.seed}/{server_round}/{partition}").random()
        return draw < p
