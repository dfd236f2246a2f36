"""Flower ClientApp: hands each message to the node (`fedllm_flwr.node.handle`)
and replies. Flower's mods (SecAgg+) run here; the node's work runs in a warm
site worker when one serves this SuperNode (`fedllm_flwr.site_worker`), else in
this process.

Light at import, as are `fedllm_flwr.node` and the site worker's proxy: Flower's
simulation imports this module in its own process before it starts any worker,
and a deployed SuperNode starts a fresh process for every message; importing the
ML stack (seconds of CPU) would hold back each of them by as much.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm_flwr import node
from fedllm_flwr.privacy.secagg_client import secure_aggregation_mod
from fedllm_flwr.site_worker import proxy

app = ClientApp(mods=[secure_aggregation_mod])


def _handle(kind: str, msg: Message, context: Context) -> Message:
    reply = proxy.forward(kind, msg, context)  # None: no site worker (off, or it gave up)
    if reply is None:
        reply = node.handle(kind, msg, context)
    return Message(content=reply, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _handle("query", msg, context)
