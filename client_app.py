"""Flower ClientApp: unpack the adapter, train or evaluate it locally, reply."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm_flwr import quiet_third_party_output
from fedllm_flwr.client import local_evaluate, local_train, partition_of
from fedllm_flwr.config import load_cfg
from fedllm_flwr.transport import pack, unpack_state

quiet_third_party_output()
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = load_cfg(context.run_config)
    partition_id, num_partitions = partition_of(context.node_config)
    server_round = int(msg.content["config"]["server-round"])
    state, metrics = local_train(cfg, unpack_state(msg.content), server_round, partition_id, num_partitions)
    reply = pack(state)
    reply["metrics"] = MetricRecord(metrics)
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = load_cfg(context.run_config)
    partition_id, num_partitions = partition_of(context.node_config)
    metrics = local_evaluate(cfg, unpack_state(msg.content), partition_id, num_partitions)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
