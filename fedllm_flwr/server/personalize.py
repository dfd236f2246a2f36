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

from fedllm_flwr.compression import Manifest, codecs
from fedllm_flwr.config import Config
from fedllm_flwr.keys import ARRAYS_KEY, PERSONALIZE_KEY, RUN_NAME_KEY, SERVER_ROUND_KEY
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.server.evaluation import ServerEvaluator
from fedllm_flwr.strategy.lora_products import padded, rank_of
from fedllm_flwr.strategy.replies import check_metrics
from fedllm_flwr.transport import manifest_of, pack, state_to_arrays, unpack

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
    and after, written to personalization.jsonl. The personalized adapters are saved
    under adapter/personalized/client_<partition>/: here, from the replies, or, when
    `cfg.personalized_stays_on_nodes`, by each node in its own run folder, and only
    the scores travel. A reply is used only if its numbers are sound and its adapter
    (where one may travel) has the names and shapes its node was sent."""
    down = codecs(cfg.compression)[0]
    at_home = cfg.personalized_stays_on_nodes
    config = ConfigRecord({**dict(config.items()), SERVER_ROUND_KEY: cfg.num_rounds, PERSONALIZE_KEY: 1,
                           RUN_NAME_KEY: run_dir.path.name})  # fmt: skip
    messages, packed, expected = [], {}, {}
    for node in grid.get_node_ids():
        own = arrays_for(node, arrays) if arrays_for is not None else arrays
        if id(own) not in packed:
            packed[id(own)] = pack(own, down)
        expected[node] = manifest_of(own)
        content = RecordDict(dict(packed[id(own)].items()))
        content["config"] = config
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    log(INFO, "[fedllm-flwr] personalizing: %s clients tune %s steps each%s", len(messages), cfg.personalize.ft_steps,
        "; each keeps its adapter (only the scores travel)" if at_home else "")  # fmt: skip
    rows, states = [], {}
    top = rank_of({k: v.numpy() for k, v in arrays.items()})
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "[fedllm-flwr] node %s failed to personalize: %s", node, reply.error.reason)
            continue
        try:
            metrics, state = _checked(reply.content, expected.get(node), at_home)
        except ValueError as exc:
            log(WARNING, "[fedllm-flwr] node %s: personalization reply dropped: %s", node, exc)
            continue
        pid = int(metrics["partition-id"])
        if state is not None:
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
    return {"clients": len(rows), "adapters-kept-on-nodes": at_home, **means}


def _checked(content: RecordDict, expected: Manifest | None, at_home: bool) -> tuple[dict, dict | None]:
    """(metrics, personalized adapter or None) of a reply; ValueError naming what is wrong."""
    if len(content.metric_records) != 1:
        raise ValueError(f"the reply must carry one metric record, it has {len(content.metric_records)}")
    record = next(iter(content.metric_records.values()))
    check_metrics(record, "num-examples")
    if not isinstance(record.get("partition-id"), int):
        raise ValueError("the reply names no partition-id")
    carries = ARRAYS_KEY in content.array_records
    if at_home:
        if carries:  # never saved: it should not have left its node
            raise ValueError("it carries its personalized adapter, which must stay on the node")
        return dict(record.items()), None
    if expected is None:
        raise ValueError("this node was sent no adapter to personalize")
    return dict(record.items()), unpack(content, expected)
