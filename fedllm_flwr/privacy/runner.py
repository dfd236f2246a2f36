"""What a run uses for `privacy=`: its strategy, what runs its rounds, and its summary."""

from __future__ import annotations

from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.common.logger import log

from fedllm_flwr.config import Config
from fedllm_flwr.privacy.dp_server import AccountedClientSideDP
from fedllm_flwr.privacy.secagg import secagg_strategy
from fedllm_flwr.strategy import AdapterFedAvg, build_strategy

if TYPE_CHECKING:
    import torch


def private_strategy(cfg: Config, model: torch.nn.Module | None = None) -> AdapterFedAvg:
    """The configured strategy; under privacy=secagg, with SecAgg+ training rounds.
    `model`: the server's PEFT model (algorithm=zo tunes its tensors)."""
    return secagg_strategy(cfg) if cfg.privacy.name == "secagg" else build_strategy(cfg, model=model)


def private_runner(cfg: Config, strategy: AdapterFedAvg, population: int):
    """What runs the rounds: `strategy`, or under privacy=dp Flower's DP wrapper around it
    (noise for the expected number of sampled clients, n = q N, of `population` nodes)."""
    if cfg.privacy.name != "dp":
        return strategy
    p, s = cfg.privacy, cfg.strategy
    rate = s.fraction_train * (s.available_p if s.availability == "uniform" else 1.0)
    sampled = max(1, round(rate * population))
    log(INFO, "[fedllm-flwr] privacy=dp: clip %g, noise multiplier %g, %s of %s clients a round (q=%.3f), delta %g",
        p.clipping_norm, p.noise_multiplier, sampled, population, rate, p.delta)  # fmt: skip
    return AccountedClientSideDP(strategy, p.noise_multiplier, p.clipping_norm, sampled, rate, p.delta)


def privacy_summary(cfg: Config, runner) -> dict | None:  # noqa: ANN001 - a strategy or its DP wrapper
    """What summary.json reports about privacy: the mode, and under dp the budget spent."""
    if cfg.privacy.name == "none":
        return None
    out: dict[str, Any] = {"name": cfg.privacy.name}
    if cfg.privacy.name == "dp":
        budget = runner.budget
        out.update({"epsilon": budget.epsilon(), "delta": budget.delta, "releases": budget.rounds,
                    "noise-multiplier": budget.noise_multiplier, "clipping-norm": cfg.privacy.clipping_norm,
                    "sample-rate": budget.sample_rate, "sampled-clients": runner.num_sampled_clients})  # fmt: skip
    return out
