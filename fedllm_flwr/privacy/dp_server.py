"""Differential privacy around our strategy: Flower's client-side fixed clipping
wrapper, with the budget accounted each round (see `fedllm_flwr.privacy.dp`).

Clients clip their updates to `clipping_norm` (the wrapper puts it in the train
config; our ClientApp clips before encoding) and our strategy enforces the bound
on the decoded updates and sums them over a fixed n, the number of clients sent a
training message this round (DP-FedAvg's fixed denominator), whatever number of
replies arrived and passed validation. Flower's wrapper adds N(0, (z C / n)^2) to
that mean, with the same n, so the noise always matches the sensitivity C / n; it
skips the round if any sampled client failed outright.

Both n and the sampling rate q are read from each round's real sample, never
from the configured fraction: Flower's FedAvg samples max(int(N fraction_train),
min_train_nodes) of the N nodes connected when it samples, and N grows as late
sites join. q_t = that sample size / N (times `available_p` under
`availability=uniform`, whose draw is independent of Flower's). Each round that
released a noised mean steps the accountant at its own q_t; `epsilon`, `delta`,
`noise-std`, `dp-sample-rate` (q_t) and `dp-clients` (n) go into the round's
metrics row.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from fedllm_flwr.privacy.dp import PrivacyBudget
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg


class AccountedClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Client-side fixed clipping around an AdapterFedAvg, with an RDP budget.

    `available_p`: the chance a sampled client is available (strategy.availability=uniform;
    1 otherwise), which scales each round's sampling rate. `strategy` must enforce the same
    `clipping_norm` on the updates it decodes (built with it: `private_strategy`)."""

    def __init__(
        self, strategy: AdapterFedAvg, noise_multiplier: float, clipping_norm: float, delta: float,
        available_p: float = 1.0,
    ) -> None:  # fmt: skip
        # Flower's wrapper takes a fixed sample size; ours is each round's, set in configure_train.
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients=1)
        if strategy.clip_norm != clipping_norm:
            raise ValueError(
                f"privacy=dp: the strategy enforces clip_norm={strategy.clip_norm}, not the clipping norm "
                f"{clipping_norm} the noise is sized for (build it with clip_norm={clipping_norm})"
            )
        self.inner = strategy
        self.available_p = available_p
        self.budget = PrivacyBudget(noise_multiplier, delta)
        self.released_clients: list[int] = []
        """n of each release, in order (beside `budget.sample_rates`)."""
        self._rates: dict[int, float] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        round_ = server_round + self.inner.round_offset
        sampled, connected = self.inner.drawn
        # q_t: each of the `connected` nodes is in Flower's sample of `sampled` with chance
        # sampled / connected, then available with chance available_p (an independent draw).
        rate = sampled / connected * self.available_p if connected else 0.0
        # n_t: the clients actually sent a training message; the inner strategy's fixed
        # denominator (dp_denominator) counts the same messages.
        self.num_sampled_clients = len(messages)
        self._rates[round_] = rate
        ledger = self.inner.ledger
        ledger.set(round_, "dp-sample-rate", rate)
        ledger.set(round_, "dp-clients", len(messages))
        log(INFO, "[fedllm-flwr] round %s: privacy=dp, %s clients sent a training message, %s sampled of %s "
            "connected (q=%.4f)", round_, len(messages), sampled, connected, rate)  # fmt: skip
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        round_ = server_round + self.inner.round_offset
        rate = self._rates.pop(round_)
        if arrays is not None:  # a noised mean was released
            self.budget.step(rate)
            self.released_clients.append(self.num_sampled_clients)
        epsilon = self.budget.epsilon()
        ledger = self.inner.ledger
        ledger.set(round_, "epsilon", epsilon)
        ledger.set(round_, "delta", self.budget.delta)
        if self.num_sampled_clients:
            ledger.set(round_, "noise-std", self.noise_multiplier * self.clipping_norm / self.num_sampled_clients)
        log(INFO, "[fedllm-flwr] round %s: privacy spent epsilon=%.3f at delta=%g after %s releases",
            round_, epsilon, self.budget.delta, self.budget.rounds)  # fmt: skip
        return arrays, metrics
