"""What privacy (`privacy=dp|secagg`) cannot serve, read by the config."""

from __future__ import annotations

from fedllm_flwr.compat import FED_ONLY, PRIVATE, Conflict, not_in, one_of
from fedllm_flwr.strategy.compat import MEAN_STRATEGIES

CONFLICTS = (
    Conflict(PRIVATE, FED_ONLY, "privacy protects what is aggregated, and this scenario aggregates nothing"),
    Conflict(PRIVATE, not_in("strategy", *MEAN_STRATEGIES),
             "privacy protects the plain mean of the updates; this strategy needs each client's update or "
             "steps past the mean (outside the noise's sensitivity bound)"),
    Conflict(one_of("privacy", "secagg"), not_in("compression.up", "fp16", "fp32"),
             "SecAgg+ sends masked integer vectors up, so a lossy uplink codec cannot apply (and top-k would "
             "show which coordinates a client changed)"),
    Conflict(one_of("privacy", "dp"), not_in("strategy.availability", "always", "uniform"),
             "the privacy budget is accounted for clients sampled uniformly"),
)  # fmt: skip
