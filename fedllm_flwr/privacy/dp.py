"""Differential privacy for adapter updates: clipping and the privacy budget.

No Flower here. A client's update (its trained adapter minus the one it was
sent, every shared tensor as one vector) is scaled to L2 norm at most C, so
one client changes the mean of n updates by at most C / n; the server then
adds N(0, (z C / n)^2) noise per coordinate (Flower's client-side fixed
clipping wrapper, `fedllm_flwr.privacy.dp_server`). That is the Gaussian
mechanism with noise multiplier z at the level of a client (DP-FedAvg,
McMahan et al. 2018): the guarantee covers everything a client holds. n is
the number of clients sent a training message that round, counted afresh
each round.

The budget is tracked with Opacus's RDP analysis: one subsampled Gaussian
step per round at that round's sampling rate q_t (the chance a client takes
part: Flower's sample size over the nodes connected that round, times
`available_p` under uniform availability), composed over the rounds and
converted to (epsilon, delta).

An approximation, stated: the accountant's analysis is for Poisson sampling
(each client in independently with probability q), while Flower samples a
fixed number of nodes without replacement. The two differ (analyses of
fixed-size sampling, e.g. Wang, Balle and Kasiviswanathan 2019, bound it for
replacing one client rather than adding or removing one, and their epsilon
can come out larger), so the reported epsilon is the Poisson figure at q_t,
the common practice, not a proven bound for Flower's sampling. At q_t = 1
(every node trains every round) nothing is sampled and nothing approximated.
"""

from __future__ import annotations

import math

import numpy as np


def clip_update(update: dict[str, np.ndarray], clipping_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled to L2 norm at most `clipping_norm` (all tensors as one
    vector), and the norm it had. Kept in float64 while scaling, so the clipped
    norm does not exceed the bound by rounding."""
    norm = update_norm(update)
    if norm <= clipping_norm:
        return update, norm
    factor = clipping_norm / norm * (1 - 1e-6)  # float32 storage must not round back above the bound
    return {k: (v.astype(np.float64) * factor).astype(np.float32) for k, v in update.items()}, norm


def update_norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))


class PrivacyBudget:
    """(epsilon, delta) spent so far by Gaussian releases at noise multiplier z,
    each at its own round's sampling rate q.

    Opacus's RDP analysis, as its RDPAccountant runs it: a release at rate q
    adds the subsampled Gaussian's RDP curve over the accountant's default
    orders, curves add up over releases (composition), and the sum converts to
    (epsilon, delta). Each distinct q's curve is computed once (about 0.7 s for
    q < 1 on 2 CPU cores) and the sum kept: RDPAccountant.get_epsilon would
    recompute its whole (z, q, steps) history every round, a cost that grows
    with every change of q."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.orders = list(RDPAccountant.DEFAULT_ALPHAS)
        self.sample_rates: list[float] = []
        """q of each release so far, in order."""
        self._rdp = np.zeros(len(self.orders))
        self._curves: dict[float, np.ndarray] = {}

    @property
    def rounds(self) -> int:
        """Releases accounted so far."""
        return len(self.sample_rates)

    def step(self, sample_rate: float) -> None:
        """Account one release at sampling rate `sample_rate`."""
        from opacus.accountants.analysis.rdp import compute_rdp

        if sample_rate not in self._curves:
            self._curves[sample_rate] = compute_rdp(
                q=sample_rate, noise_multiplier=self.noise_multiplier, steps=1, orders=self.orders
            )
        self._rdp = self._rdp + self._curves[sample_rate]
        self.sample_rates.append(sample_rate)

    def epsilon(self) -> float:
        """Epsilon at `delta` after the rounds so far (inf without noise, 0 before any)."""
        from opacus.accountants.analysis.rdp import get_privacy_spent

        if self.rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(get_privacy_spent(orders=self.orders, rdp=self._rdp, delta=self.delta)[0])
