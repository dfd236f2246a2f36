"""What a site has spent of its privacy budget under `privacy=dp_sgd`, kept in Flower's
`context.state` beside the rest of its `NodeState`. Light at import (records only);
Opacus is imported when an epsilon is asked for.

Every DP-SGD step a site takes is one subsampled Gaussian release at its noise multiplier
z and its sampling rate q (its expected batch over its records), and both stay fixed for
the run, so the site's whole history is (z, q, steps): Opacus's `RDPAccountant` with that
history gives the epsilon of every step composed, exactly as if stepped one at a time
(tests/test_dp_sgd.py checks both against each other on a hand schedule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict

from fedllm_flwr.keys import DP_LEDGER_KEY


@dataclass
class DpLedger:
    """A site's DP-SGD history; `NodeState.dp`."""

    noise_multiplier: float = -1.0
    """z, fixed at the site's first round (-1: not yet set)."""
    sample_rate: float = 0.0
    """q: the chance each record is drawn for a step."""
    steps: int = 0
    """DP-SGD steps taken so far."""
    sat_out: int = 0
    """Rounds the site declined because they would take it past `privacy.target_epsilon`."""

    @property
    def started(self) -> bool:
        return self.noise_multiplier >= 0

    def epsilon(self, delta: float, steps: int | None = None) -> float:
        """Epsilon at `delta` after `steps` steps (default: those taken)."""
        steps = self.steps if steps is None else steps
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta))

    @classmethod
    def load(cls, state: RecordDict) -> DpLedger:
        kept = state.config_records.get(DP_LEDGER_KEY)
        if kept is None:
            return cls()
        return cls(float(kept["noise-multiplier"]), float(kept["sample-rate"]), int(kept["steps"]),
                   int(kept["sat-out"]))  # fmt: skip

    def save(self, state: RecordDict) -> None:
        if self.started:
            state[DP_LEDGER_KEY] = ConfigRecord({"noise-multiplier": self.noise_multiplier,
                                                 "sample-rate": self.sample_rate, "steps": self.steps,
                                                 "sat-out": self.sat_out})  # fmt: skip
