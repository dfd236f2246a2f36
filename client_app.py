"""Flower ClientApp: hands each message to the node's function for its type
(`fedllm_flwr.node`) with the node's state, and replies.

Light at import, as is `fedllm_flwr.node`: Flower's simulation imports this
module in its own process before it starts any worker, and the ML stack
(~10 s on 2 CPU cores) would hold back every worker's start by as much.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm_flwr import node


def secure_aggregation_mod(msg: Message, context: Context, call_next) -> Message:
    """privacy=secagg: Flower's SecAgg+ client mod, for the protocol's messages only."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    from flwr.client.mod import secaggplus_mod

    return secaggplus_mod(msg, context, call_next)


app = ClientApp(mods=[secure_aggregation_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    state = node.NodeState.load(context.state)
    reply = node.train(msg.content, context.run_config, context.node_config, state)
    state.save(context.state)
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    state = node.NodeState.load(context.state)
    return Message(content=node.evaluate(msg.content, context.run_config, context.node_config, state), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(content=node.query(msg.content, context.run_config, context.node_config), reply_to=msg)
