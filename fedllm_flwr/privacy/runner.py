"""What a run uses for `privacy=`: its strategy, what runs its rounds, and its summary."""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.common.logger import log

from fedllm_flwr.config import Config
from fedllm_flwr.privacy.dp_server import AccountedClientSideDP
from fedllm_flwr.privacy.secagg import secagg_strategy
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.registry import build_strategy
from fedllm_flwr.strategy.round_setup import RoundSetup


def private_strategy(
    cfg: Config, override: type[AdapterFedAvg] | None = None, setup: RoundSetup | None = None, **arguments: Any
) -> AdapterFedAvg:
    """The configured strategy; under SecAgg+ (privacy=secagg, or dp_sgd with privacy.secagg),
    with SecAgg+ training rounds, and under privacy=dp enforcing the clipping norm on every update it decodes.
    `override` and `arguments` go to `build_strategy` (an algorithm's own strategy);
    `setup`: what the server learned before round 1 (`build_strategy`)."""
    if cfg.privacy.masked:
        return secagg_strategy(cfg, setup)
    clip_norm = cfg.privacy.clipping_norm if cfg.privacy.name == "dp" else None
    return build_strategy(cfg, override, setup=setup, clip_norm=clip_norm, **arguments)


def private_runner(cfg: Config, strategy: AdapterFedAvg):
    """What runs the rounds: `strategy`, or under privacy=dp Flower's DP wrapper around it
    (its noise, denominator and sampling rate taken from each round's real sample)."""
    if cfg.privacy.name != "dp":
        return strategy
    p, s = cfg.privacy, cfg.strategy
    available_p = s.available_p if s.availability == "uniform" else 1.0
    log(INFO, "[fedllm-flwr] privacy=dp: clip %g, noise multiplier %g, delta %g; n and q from each round's sample "
        "(fraction_train %g, min_train_nodes %s, available_p %g)", p.clipping_norm, p.noise_multiplier, p.delta,
        s.fraction_train, s.min_train_nodes, available_p)  # fmt: skip
    return AccountedClientSideDP(strategy, p.noise_multiplier, p.clipping_norm, p.delta, available_p)


def privacy_summary(cfg: Config, runner, rows: list[dict] = ()) -> dict | None:  # noqa: ANN001 - a strategy or its DP wrapper
    """What summary.json reports about privacy: the mode, under dp the budget spent
    with the sampling rate q and the client count n of each release, and under dp_sgd
    each site's epsilon as it last reported it (from the round `rows`) and the rounds
    sites sat out."""
    if cfg.privacy.name == "none":
        return None
    out: dict[str, Any] = {"name": cfg.privacy.name, "masked": cfg.privacy.masked}
    if cfg.privacy.name == "dp":
        budget = runner.budget
        out.update({"epsilon": budget.epsilon(), "delta": budget.delta, "releases": budget.rounds,
                    "noise-multiplier": budget.noise_multiplier, "clipping-norm": cfg.privacy.clipping_norm,
                    "sample-rates": list(budget.sample_rates),
                    "sampled-clients": list(runner.released_clients)})  # fmt: skip
    if cfg.privacy.record_level:
        sites = {}
        for row in rows:
            sites.update({k.removesuffix("-dp-epsilon"): v for k, v in row.items() if k.endswith("-dp-epsilon")})
        out.update({"level": "record", "delta": cfg.privacy.delta, "clipping-norm": cfg.privacy.clipping_norm,
                    "target-epsilon": cfg.privacy.target_epsilon or None, "site-epsilon": dict(sorted(sites.items())),
                    "epsilon": max(sites.values(), default=0.0),
                    "noise-multiplier": max((r["dp-noise-multiplier"] for r in rows if "dp-noise-multiplier" in r),
                                            default=None),
                    "rounds-sat-out": sum(int(r.get("clients-sat-out", 0)) for r in rows)})  # fmt: skip
    return out
