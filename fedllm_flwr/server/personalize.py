"""FedAvg + FT after the last round, the server's side: send the final adapter to
every node, collect and save the personalized adapters and their before/after scores."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.compression import codecs
from fedllm_flwr.config import Config
from fedllm_flwr.keys import PERSONALIZE_KEY, SERVER_ROUND_KEY
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.server.evaluation import ServerEvaluator
from fedllm_flwr.strategy.lora_products import padded, rank_of
from fedllm_flwr.transport import pack, state_to_arrays, unpack

INFO, WARNING = logging.INFO, logging.WARNING


def personalize_clients(
    grid: Grid,
    cfg: Config,
    arrays: ArrayRecord,
    run_dir: RunDir,
    evaluator: ServerEvaluator,
    config: ConfigRecord,
    arrays_for: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
) -> dict:
    """FedAvg + FT: every node tunes the final adapter (as `arrays_for` shapes it
    for that node: its own rank) on its own data and reports held-out scores before
    and after; the personalized adapters are saved under
    adapter/personalized/client_<partition>/ and the rows in personalization.jsonl."""
    down = codecs(cfg.compression)[0]
    config = ConfigRecord({**dict(config.items()), SERVER_ROUND_KEY: cfg.num_rounds, PERSONALIZE_KEY: 1})
    messages, packed = [], {}
    for node in grid.get_node_ids():
        own = arrays_for(node, arrays) if arrays_for is not None else arrays
        if id(own) not in packed:
            packed[id(own)] = pack(own, down)
        content = RecordDict(dict(packed[id(own)].items()))
        content["config"] = config
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    log(INFO, "[fedllm-flwr] personalizing: %s clients tune %s steps each", len(messages), cfg.personalize.ft_steps)
    rows, states = [], {}
    top = rank_of({k: v.numpy() for k, v in arrays.items()})
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            log(
                WARNING,
                "[fedllm-flwr] node %s failed to personalize: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        metrics = dict(next(iter(reply.content.metric_records.values())).items())
        pid = int(metrics["partition-id"])
        # The whole personalized adapter: the shared tensors and, under partial
        # sharing, the node's private ones (saved here, at the end of the run).
        try:
            state = unpack(reply.content)
        except ValueError as exc:
            log(WARNING, "[fedllm-flwr] node %s: personalized adapter dropped: %s", reply.metadata.src_node_id, exc)
            continue
        if rank_of(state) < top:  # a site of a smaller rank: zero-padded, the same B A, saved at the global rank
            state = padded(state, top)
        states[f"client_{pid}"] = state_to_arrays({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        rows.append({"partition-id": pid, **{k: v for k, v in metrics.items() if k != "partition-id"}})
    rows.sort(key=lambda r: r["partition-id"])
    if states:
        evaluator.save("personalized", states)
    with open(run_dir.path / "personalization.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    means = (
        {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith(("before-", "after-"))}
        if rows
        else {}
    )
    for row in rows:
        log(INFO, "[fedllm-flwr] client %s: %s", row["partition-id"],
            "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("before-", "after-"))))  # fmt: skip
    return {"clients": len(rows), **means}
