"""Warm the nodes up while the server starts.

A simulation worker imports the ClientApp (torch, transformers, peft: seconds of CPU,
recorded in the docs' efficiency results) and loads the base model when its first message arrives, and the
first message leaves only once the server has imported the same stack, loaded
its own model and checked the data. Sent first, a warm-up QUERY lets the
nodes do their start-up at the same time as the server's.

In simulation it goes to a few nodes (there are no more workers than CPUs) and the
server waits for the replies before its first round: Flower's simulation may run two
messages for the same node at once, each on its own worker, and writes each one's
node context back when it ends, so a warm-up still running when a round starts could
overwrite what the round's messages keep in the node's state (SecAgg+'s protocol
state, error feedback, private adapter tensors) with its stale copy.

Deployed, it goes to every node and nobody waits for it: a SuperNode runs one message
at a time, in the order they came, so its warm-up ends before its first round's
message starts. The warm-up starts the node's site worker (`fedllm_flwr.site_worker`),
which keeps the stack, model and data for the messages after it; a node without one
answers at once, since its process ends with the message.

Light on purpose: the ServerApp calls this before importing the ML stack.
"""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedllm_flwr.keys import WARM_UP_KEY

#: In simulation, warm-ups go to at most this many nodes: there are no more
#: workers than CPUs, and every worker needs warming only once.
MAX_NODES = 8


def is_simulation(grid: Grid) -> bool:
    return type(grid).__name__ == "InMemoryGrid"


def send_warm_up(grid: Grid, wait: float = 3.0) -> list[str]:
    """Push a warm-up QUERY to the connected nodes (in simulation, the first few)
    without waiting for replies; returns their message ids."""
    deadline = time.monotonic() + wait
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:  # the simulation registers its nodes as the server starts
        time.sleep(0.05)
        nodes = list(grid.get_node_ids())
    nodes = sorted(nodes)[:MAX_NODES] if is_simulation(grid) else sorted(nodes)
    content = RecordDict({"config": ConfigRecord({WARM_UP_KEY: 1})})
    messages = [Message(content, dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
    return list(grid.push_messages(messages)) if messages else []


def is_warm_up(msg: Message) -> bool:
    """Whether `msg` is the warm-up QUERY `send_warm_up` sends."""
    config = msg.content.config_records.get("config")
    return msg.metadata.message_type == MessageType.QUERY and config is not None and bool(config.get(WARM_UP_KEY))


def await_warm_up(grid: Grid, message_ids: list[str], timeout: float, poll: float = 0.1) -> int:
    """In simulation, wait until every warm-up in `message_ids` was answered (or
    `timeout` seconds passed); returns how many were. Their replies are dropped.
    Deployed, returns 0 at once (see the module's docstring)."""
    if not is_simulation(grid):
        return 0
    pending, deadline = set(message_ids), time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        pending -= {reply.metadata.reply_to_message_id for reply in grid.pull_messages(pending)}
        if pending:
            time.sleep(poll)
    return len(message_ids) - len(pending)
