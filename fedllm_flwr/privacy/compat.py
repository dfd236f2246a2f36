"""What privacy (`privacy=dp|dp_sgd|secagg`) cannot serve, read by the config.

`dp` and `secagg` protect the aggregate, so they need one (the fed scenario, a plain
mean). `dp_sgd` privatizes each site's records before anything leaves it: whatever the
server then does is post-processing, so it serves every scenario, strategy and codec,
except where it adds SecAgg+ on top (`privacy.secagg`), which keeps the protocol's limits."""

from __future__ import annotations

from fedllm_flwr.compat import FED_ONLY, Conflict, is_set, not_in, one_of
from fedllm_flwr.strategy.compat import MEAN_STRATEGIES

#: The server privatizes or masks the aggregate.
SERVER_SIDE = one_of("privacy", "dp", "secagg")
#: SecAgg+ on top of per-record DP-SGD.
SECAGG_ON_TOP = one_of("privacy.secagg", True)
TARGET = is_set("privacy.target_epsilon", "privacy.target_epsilon>0")
CAP = is_set("privacy.max_epsilon", "privacy.max_epsilon>0")

CONFLICTS = (
    Conflict(SERVER_SIDE, FED_ONLY, "privacy protects what is aggregated, and this scenario aggregates nothing"),
    Conflict(SECAGG_ON_TOP, FED_ONLY, "SecAgg+ masks what is aggregated, and this scenario aggregates nothing"),
    Conflict(SERVER_SIDE, not_in("strategy", *MEAN_STRATEGIES),
             "privacy protects the plain mean of the updates; this strategy needs each client's update or "
             "steps past the mean (outside the noise's sensitivity bound)"),
    Conflict(SECAGG_ON_TOP, not_in("strategy", *MEAN_STRATEGIES),
             "SecAgg+ gives the server only the sum of the updates; this strategy needs each client's update"),
    Conflict(one_of("privacy", "secagg"), not_in("compression.up", "fp16", "fp32"),
             "SecAgg+ sends masked integer vectors up, so a lossy uplink codec cannot apply (and top-k would "
             "show which coordinates a client changed)"),
    Conflict(SECAGG_ON_TOP, not_in("compression.up", "fp16", "fp32"),
             "SecAgg+ sends masked integer vectors up, so a lossy uplink codec cannot apply"),
    Conflict(one_of("privacy", "dp"), not_in("strategy.availability", "always", "uniform"),
             "the privacy budget is accounted for clients sampled uniformly"),
    Conflict(SECAGG_ON_TOP, not_in("privacy", "dp_sgd"),
             "privacy.secagg adds SecAgg+ on top of per-record DP-SGD; privacy=secagg is the protocol alone"),
    Conflict(TARGET, not_in("privacy", "dp_sgd"), "only a DP-SGD site spends a budget of its own"),
    Conflict(CAP, not_in("privacy", "dp_sgd"), "only a DP-SGD site spends a budget of its own"),
    Conflict(TARGET, SECAGG_ON_TOP,
             "a site over its budget sits the round out, which SecAgg+ would meet as a dropout mid-protocol; "
             "set privacy.noise_multiplier instead"),
    Conflict(CAP, SECAGG_ON_TOP,
             "a site over its budget sits the round out, which SecAgg+ would meet as a dropout mid-protocol"),
    Conflict(one_of("privacy", "dp_sgd"), one_of("train.precision", "fp16"),
             "each record's gradient is clipped in fp32 before the noise, and fp16's loss scaler would drop "
             "steps after their noise was drawn (use bf16 or fp32)"),
)  # fmt: skip
