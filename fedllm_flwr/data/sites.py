"""Which data a SuperNode holds: a partition of the run's dataset, or its own file.

Read from the node's config (`--node-config`, or the simulation's partition ids).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fedllm_flwr.config import Config


def site_config(cfg: Config, node_config: Mapping[str, Any]) -> Config:
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
