"""Who is connected, and what each node holds (its partition and main data category)."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.config import Config

INFO, WARNING = logging.INFO, logging.WARNING


def connected_nodes(grid: Grid, cfg: Config) -> list[int]:
    """The connected nodes, once `strategy.min_available_nodes` are (or the round timeout passed)."""
    deadline = time.monotonic() + cfg.strategy.round_timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.strategy.min_available_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def discover_nodes(grid: Grid, cfg: Config) -> dict[int, dict[str, Any]]:
    """Ask every connected node for its partition and main data category (a QUERY
    message each), once `strategy.min_available_nodes` are connected."""
    nodes = connected_nodes(grid, cfg)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    info = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            log(WARNING, "[fedllm-flwr] node %s did not describe itself: %s", reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip
            continue
        info[reply.metadata.src_node_id] = dict(reply.content["info"].items())
    log(INFO, "[fedllm-flwr] nodes: %s", {n: (i["partition-id"], i["category"]) for n, i in sorted(info.items())})
    return info


def example_limits(cfg: Config, nodes: Mapping[int, Mapping[str, Any]], holds_all_data: bool) -> dict[int, int]:
    """Node id -> the most training examples it holds, from the server's own copy
    of the data (simulation; a deployed site's data is its own, see the docs' deployment page).
    `holds_all_data` (scenario=global): the one training node holds every record."""
    from fedllm_flwr.data import train_set, train_size

    if holds_all_data:
        return {node: len(train_set(cfg)) for node in nodes}
    return {node: train_size(cfg, int(i["partition-id"]), int(i["num-partitions"])) for node, i in nodes.items()}
