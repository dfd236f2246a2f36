"""What a SuperNode holds and uses: a partition of the run's dataset or its own
file, its LoRA rank, and its reward functions (task=grpo).

Read from the node's config (`--node-config`, or the simulation's partition ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedllm_flwr.config import Config
from fedllm_flwr.strategy.compat import RANKED_STRATEGIES
from fedllm_flwr.tasks.grpo.rewards import site_reward_specs

#: A SuperNode's `--node-config` key for its own LoRA rank.
RANK_KEY = "lora-rank"


def site_config(cfg: Config, node_config: Mapping[str, Any]) -> Config:
    """The run's config as this SuperNode uses it: its own LoRA rank
    (`site_rank`), its own data (`site_data_config`), its own reward functions and
    its own privacy budget (`site_budget`)."""
    rank = site_rank(cfg, node_config)
    if rank != cfg.peft.r:
        cfg = dataclasses.replace(cfg, peft=cfg.peft.at_rank(rank))
    return site_budget(site_rewards(site_data_config(cfg, node_config), node_config), node_config)


def site_budget(cfg: Config, node_config: Mapping[str, Any]) -> Config:
    """The config with this SuperNode's own privacy budget (`--node-config dp-max-epsilon`)
    as `privacy.max_epsilon`, under privacy=dp_sgd."""
    if "dp-max-epsilon" not in node_config or not cfg.privacy.record_level:
        return cfg
    if cfg.privacy.masked:
        raise ValueError(
            "--node-config dp-max-epsilon cannot be combined with privacy.secagg=true: a site over its "
            "budget sits the round out, which SecAgg+ would meet as a dropout mid-protocol"
        )
    cap = float(node_config["dp-max-epsilon"])
    if not cap > 0:
        raise ValueError(f"--node-config dp-max-epsilon={node_config['dp-max-epsilon']}: give an epsilon > 0")
    return dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, max_epsilon=cap))


def site_rewards(cfg: Config, node_config: Mapping[str, Any]) -> Config:
    """The config with this SuperNode's reward functions as `grpo.rewards`: its
    `--node-config grpo-rewards` (comma-separated), else its entry of
    `grpo.client_rewards`; a site's own list is unweighted (every weight 1)."""
    if "grpo-rewards" not in node_config and not cfg.grpo.client_rewards:
        return cfg
    partition_id = partition_of(node_config)[0] if "grpo-rewards" not in node_config else 0
    specs, _ = site_reward_specs(cfg.grpo.rewards, cfg.grpo.client_rewards, dict(node_config), partition_id)
    if specs == list(cfg.grpo.rewards):
        return cfg
    return dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, rewards=specs, reward_weights=[]))


def site_data_config(cfg: Config, node_config: Mapping[str, Any]) -> Config:
    """With dataset.source=sites, the config that reads this SuperNode's own file
    (`--node-config data-path=...`); otherwise `cfg` unchanged."""
    if cfg.dataset.source != "sites":
        return cfg
    path = str(node_config.get("data-path", ""))
    if not path:
        raise ValueError(
            f"dataset.source=sites: this SuperNode's --node-config sets no data-path (it has {dict(node_config)}); "
            "start it with --node-config 'data-path=\"/path/to/site.jsonl\"'"
        )
    return dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=path))


def partition_of(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition-id, num-partitions) from a SuperNode's node config; a site
    with its own `data-path` and no partition uses all of its file (0 of 1)."""
    if "data-path" in node_config and "partition-id" not in node_config:
        return 0, 1
    try:
        return int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"the SuperNode's --node-config must set integer partition-id and num-partitions, got {dict(node_config)}"
        ) from None


def site_rank(cfg: Config, node_config: Mapping[str, Any]) -> int:
    """This SuperNode's LoRA rank: its `--node-config lora-rank`, else its entry
    of `peft.client_ranks` (by partition id), else `peft.r`."""
    if RANK_KEY in node_config:
        value = node_config[RANK_KEY]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--node-config {RANK_KEY} must be a positive integer, got {value!r}")
        rank = int(value)
    elif cfg.peft.client_ranks:
        partition_id, num_partitions = partition_of(node_config)
        if partition_id >= len(cfg.peft.client_ranks):
            raise ValueError(
                f"peft.client_ranks has {len(cfg.peft.client_ranks)} ranks for {num_partitions} nodes: "
                f"partition {partition_id} has none (give one rank per node)"
            )
        rank = int(cfg.peft.client_ranks[partition_id])
    else:
        return cfg.peft.r
    if rank != cfg.peft.r and not cfg.strategy.ranked:
        raise ValueError(
            f"this node's LoRA rank is {rank} and the run's peft.r={cfg.peft.r}; strategy={cfg.strategy.name} "
            f"averages tensors of one shape (use strategy={' or '.join(RANKED_STRATEGIES)})"
        )
    return rank


def rank_key(cfg: Config, node_config: Mapping[str, Any]) -> str:
    """The key this SuperNode's LoRA rank comes from (for error messages)."""
    if RANK_KEY in node_config:
        return f"--node-config {RANK_KEY}"
    return "peft.client_ranks" if cfg.peft.client_ranks else "peft.r"
