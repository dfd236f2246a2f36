"""Unequal LoRA ranks, the server's side: learn every node's rank before round 1.

Each node reports its rank with the QUERY the server already sends (from its
`--node-config lora-rank`, or its entry of `peft.client_ranks`). The global
adapter takes the largest rank; `fedllm_flwr.strategy.ranked` sends each node
its own.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.config import Config
from fedllm_flwr.errors import UserError
from fedllm_flwr.server.nodes import discover_nodes

INFO = logging.INFO


def node_ranks(grid: Grid, cfg: Config) -> tuple[Config, dict[int, dict[str, Any]], dict[int, int]]:
    """(the run's config with the global adapter at the largest rank, every node's
    description, node id -> its rank). UserError, before anything trains, if a node
    cannot have its rank (too few `peft.client_ranks`, a bad `lora-rank`) or a rank
    is larger than the model's targeted layers allow."""
    from fedllm_flwr.model import model_rank_limit

    nodes = discover_nodes(grid, cfg)
    problems = sorted(f"node {n}: {i['rank-error']}" for n, i in nodes.items() if "rank-error" in i)
    if problems:
        raise UserError(problems[0] + (f" (and {len(problems) - 1} more nodes)" if len(problems) > 1 else ""))
    ranks = {n: int(i["lora-rank"]) for n, i in nodes.items() if "lora-rank" in i}
    if not ranks:
        raise UserError(f"strategy={cfg.strategy.name}: no node reported its LoRA rank")
    module, limit = model_rank_limit(cfg.model, list(cfg.peft.target_modules))
    for node, rank in sorted(ranks.items()):
        if rank > limit:
            source = nodes[node].get("rank-key", "peft.r")
            raise UserError(
                f"{source}: node {node} (partition {nodes[node].get('partition-id')}) has LoRA rank {rank}, "
                f"larger than {module} allows (min(in, out) = {limit})"
            )
    top = max(ranks.values())
    log(INFO, "[fedllm-flwr] LoRA ranks by partition: %s; the global adapter has rank %s",
        dict(sorted((int(nodes[n]["partition-id"]), r) for n, r in ranks.items())), top)  # fmt: skip
    return dataclasses.replace(cfg, peft=cfg.peft.at_rank(top)), nodes, ranks
