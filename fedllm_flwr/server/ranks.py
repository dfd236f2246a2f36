"""Unequal LoRA ranks, the server's side: learn every node's rank before round 1,
and ask a node that connects later before it is sent anything.

Each node reports its rank with the QUERY the server already sends (from its
`--node-config lora-rank`, or its entry of `peft.client_ranks`). The global
adapter takes the largest rank; `fedllm_flwr.strategy.ranked` sends each node
its own. A node that connects after that (a SuperNode started late, or
restarted under a new node id) is asked the same way by `RankQuery` before its
first message; it can train at any rank up to the global one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from flwr.app import Message, MessageType, RecordDict
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


class RankQuery:
    """Asks nodes the strategy has no rank for (they connected after `node_ranks`)
    for theirs, with the discovery QUERY: node id -> its rank, or why it cannot
    train in this run. A rank above the global adapter's cannot be served (its
    rank was fixed before round 1, and every rank the model allows was checked
    then); a node that does not answer is asked again before its next message."""

    def __init__(self, grid: Grid, cfg: Config) -> None:
        self.grid = grid
        self.global_rank = cfg.peft.r
        """The global adapter's rank: `cfg` is the one `node_ranks` returned."""
        self.timeout = cfg.strategy.round_timeout

    def __call__(self, node_ids: list[int]) -> dict[int, int | str]:
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
        answers: dict[int, int | str] = {n: "it did not answer the server's QUERY for its LoRA rank" for n in node_ids}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if node not in answers:
                continue
            if reply.has_error():
                answers[node] = f"it could not be asked for its LoRA rank: {reply.error.reason}"
                continue
            info = dict(reply.content["info"].items())
            if "rank-error" in info:
                answers[node] = str(info["rank-error"])
            elif "lora-rank" not in info:
                answers[node] = "it reported no LoRA rank"
            elif int(info["lora-rank"]) > self.global_rank:
                answers[node] = (
                    f"{info.get('rank-key', 'peft.r')}: its LoRA rank {info['lora-rank']} is larger than the global "
                    f"adapter's ({self.global_rank}), fixed before round 1"
                )
            else:
                answers[node] = int(info["lora-rank"])
        return answers
