"""A site worker's handler for tests (`site_worker_stub:handle`): Flower imports only.

It counts its messages in the node state (`state["stub"]["n"]`) and echoes the
message's "x" array with its pid. Kind "raise" fails with ValueError("boom"). Kind
"block" touches the message's `busy` file and sleeps a minute, once: the `marker`
file it leaves makes the next "block" (a retry on a fresh worker) answer at once.
"""

import os
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

#: What `forget_data` was called for, in this process (a worker served in a thread shares it).
FORGOTTEN: list[int] = []


def handle(kind, msg, context, started=None):  # noqa: ANN001 - a handler's signature
    config = msg.content.config_records.get("config", ConfigRecord())
    if kind == "raise":
        raise ValueError("boom")
    if kind == "block" and not Path(config["marker"]).exists():
        Path(config["marker"]).touch()
        Path(config["busy"]).touch()
        time.sleep(60)
    kept = context.state.config_records.get("stub")
    n = int(kept["n"]) + 1 if kept is not None else 1
    context.state["stub"] = ConfigRecord({"n": n})
    if "gone" in context.state:
        del context.state["gone"]
    echo = msg.content.array_records.get("x", ArrayRecord())
    info = ConfigRecord({"pid": os.getpid(), "n": n, "started": -1.0 if started is None else float(started)})
    return RecordDict({"echo": echo, "info": info})


def fingerprint(msg, context):  # noqa: ANN001
    """The run config's "model" and "data" stand for the model and data files."""
    return {"model": context.run_config.get("model"), "data": context.run_config.get("data")}


def forget_data():
    FORGOTTEN.append(os.getpid())
