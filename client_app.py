"""Flower ClientApp: hands each message to the node's function for its type
(`fedllm_flwr.node`) with the node's state, and replies.

Light at import, as is `fedllm_flwr.node`: Flower's simulation imports this
module in its own process before it starts any worker, and the ML stack
(~10 s on 2 CPU cores) would hold back every worker's start by as much.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm_flwr import node
from fedllm_flwr.privacy.secagg_client import secure_aggregation_mod

app = ClientApp(mods=[secure_aggregation_mod])


def _node_state(context: Context) -> node.NodeState:
    """What this node kept from its earlier messages, and which node of which run it is."""
    return node.NodeState.load(context.state, identity=f"run{context.run_id}-node{context.node_id}")


@app.train()
def train(msg: Message, context: Context) -> Message:
    state = _node_state(context)
    reply = node.train(msg.content, context.run_config, context.node_config, state)
    state.save(context.state)
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    state = _node_state(context)
    reply = node.evaluate(msg.content, context.run_config, context.node_config, state)
    state.save(context.state)  # what the message brought to keep (stacking's stacks, zeroth-order steps)
    return Message(content=reply, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(content=node.query(msg.content, context.run_config, context.node_config), reply_to=msg)
