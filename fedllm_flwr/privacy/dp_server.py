"""Differential privacy around our strategy: Flower's client-side fixed clipping
wrapper, with the budget accounted each round (see `fedllm_flwr.privacy.dp`).

Clients clip their updates to `clipping_norm` (the wrapper puts it in the train
config; our ClientApp clips before encoding) and our strategy enforces the bound
on the decoded updates and sums them over a fixed n, the number of clients
expected per round (DP-FedAvg's fixed denominator), whatever number of replies
arrived and passed validation. Flower's wrapper adds N(0, (z C / n)^2) to that
mean, so the noise always matches the sensitivity C / n; it skips the round if
any sampled client failed outright. Each round that
released a noised mean steps the accountant; `epsilon` and `delta` go into the
round's metrics row.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from fedllm_flwr.privacy.dp import PrivacyBudget
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg


class AccountedClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping around an AdapterFedAvg, with an RDP budget."""

    def __init__(
        self, strategy: AdapterFedAvg, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int,
        sample_rate: float, delta: float,
    ) -> None:  # fmt: skip
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        strategy.clip_norm, strategy.dp_denominator = clipping_norm, num_sampled_clients
        self.inner = strategy
        self.budget = PrivacyBudget(noise_multiplier, sample_rate, delta)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        round_ = server_round + self.inner.round_offset
        if arrays is not None:  # a noised mean was released
            self.budget.step()
        epsilon = self.budget.epsilon()
        ledger = self.inner.ledger
        ledger.set(round_, "epsilon", epsilon)
        ledger.set(round_, "delta", self.budget.delta)
        ledger.set(round_, "noise-std", self.noise_multiplier * self.clipping_norm / self.num_sampled_clients)
        log(INFO, "[fedllm-flwr] round %s: privacy spent epsilon=%.3f at delta=%g after %s releases",
            round_, epsilon, self.budget.delta, self.budget.rounds)  # fmt: skip
        return arrays, metrics
