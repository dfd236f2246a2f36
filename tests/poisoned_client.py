"""A ClientApp that misbehaves on purpose, for the end-to-end robustness test.

It serves the shipped app's handlers, and a mod spoils the training reply of
partition 1 in a different way each round. Copied next to the shipped apps into
a test-only app folder; never part of the shipped app.
"""

import math

import numpy as np
from flwr.app import Array, ConfigRecord, Message, MessageType, MetricRecord
from flwr.clientapp import ClientApp

import client_app as shipped
from fedllm_flwr.keys import ARRAYS_KEY, MANIFEST_KEY, PACKED_KEY
from fedllm_flwr.privacy.secagg_client import secure_aggregation_mod

POISONED_PARTITION = 1


def spoil(reply: Message, server_round: int) -> None:
    """Round 1: NaN in a tensor; 2: NaN weight; 3: Inf weight; 4: wrong shape; 5: wrong codec."""
    content = reply.content
    kind = (server_round - 1) % 5
    if kind in (0, 3):
        values = content[ARRAYS_KEY][PACKED_KEY].numpy().copy()
        values = values[:-1] if kind == 3 else values
        if kind == 0:
            values[0] = np.nan
        content[ARRAYS_KEY][PACKED_KEY] = Array(values)
    elif kind in (1, 2):
        metrics = dict(content["metrics"].items())
        metrics["num-examples"] = math.nan if kind == 1 else math.inf
        content["metrics"] = MetricRecord(metrics)
    else:
        manifest = dict(content[MANIFEST_KEY].items())
        manifest["codec"] = "int8" if manifest.get("codec") != "int8" else "fp16"
        content[MANIFEST_KEY] = ConfigRecord(manifest)


def poison_mod(msg: Message, context, call_next) -> Message:
    reply = call_next(msg, context)
    partition = int(context.node_config.get("partition-id", -1))
    if msg.metadata.message_type == MessageType.TRAIN and partition == POISONED_PARTITION and not reply.has_error():
        spoil(reply, int(msg.content["config"]["server-round"]))
    return reply


app = ClientApp(mods=[secure_aggregation_mod, poison_mod])
app.train()(shipped.train)
app.evaluate()(shipped.evaluate)
app.query()(shipped.query)
