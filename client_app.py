"""Flower ClientApp: unpack the adapter, train or evaluate it locally, reply.

The ML stack is imported with the first message, not with this module: Flower's
simulation imports the module in its own process to check that it loads before
it starts any worker, and a heavy import here (~10 s on 2 CPU cores) would hold
back every worker's start by as much.
"""

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

PRIVATE_KEY = "private-adapter"  # this node's unshared adapter tensors (partial sharing)
CLIPPING_NORM_KEY = "clipping_norm"  # in the train config under privacy=dp (Flower's KEY_CLIPPING_NORM)
FEEDBACK_KEY = "error-feedback"  # what lossy uplink compression left out of this node's updates


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
    from fedllm_flwr.client import local_train, partition_of, personalize, split_private
    from fedllm_flwr.compression import codecs
    from fedllm_flwr.metrics import process_age_seconds
    from fedllm_flwr.strategy.scenarios import DATA_KEY, PERSONALIZE_KEY, STEPS_KEY
    from fedllm_flwr.transport import pack, pack_update, state_to_arrays, unpack_state

    started = process_age_seconds()
    cfg = _cfg(msg, context)
    partition_id, num_partitions = partition_of(context.node_config)
    config = msg.content["config"]
    down, up = codecs(cfg.compression)
    received = unpack_state(msg.content, codec=down)
    if config.get(PERSONALIZE_KEY):  # after the last round: FedAvg + FT
        state, metrics = personalize(cfg, received, partition_id, num_partitions, _private(context))
        reply = pack(state)
        reply["metrics"] = MetricRecord(metrics)
        return Message(content=reply, reply_to=msg)
    if config.get(DATA_KEY) == "all":  # scenario=global: this node holds everyone's data
        partition_id, num_partitions = 0, 1
    steps = int(config[STEPS_KEY]) if STEPS_KEY in config else None
    state, metrics = local_train(
        cfg, received, int(config["server-round"]), partition_id, num_partitions, steps,
        private=_private(context), started=started,
    )  # fmt: skip
    state, private = split_private(cfg, state)
    if private:
        context.state[PRIVATE_KEY] = state_to_arrays(private)
    if cfg.privacy.name == "secagg":  # the update, flat, for secaggplus_mod to mask
        from fedllm_flwr.transport import secagg_reply

        return Message(content=secagg_reply(state, received, metrics), reply_to=msg)
    feedback = _feedback(cfg, context)
    clip = config.get(CLIPPING_NORM_KEY)  # privacy=dp: Flower's DP wrapper sends the norm
    reply = pack_update(state, received, up, feedback, float(clip) if clip is not None else None)
    if feedback is not None:
        context.state[FEEDBACK_KEY] = ArrayRecord({"residual": Array(feedback.residual)})
    reply["metrics"] = MetricRecord(metrics)
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from fedllm_flwr.client import local_evaluate, partition_of
    from fedllm_flwr.compression import codecs
    from fedllm_flwr.transport import unpack_state

    cfg = _cfg(msg, context)
    partition_id, num_partitions = partition_of(context.node_config)
    received = unpack_state(msg.content, codec=codecs(cfg.compression)[0])
    metrics = local_evaluate(cfg, received, partition_id, num_partitions, _private(context))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The client's partition and main data category (for simulated availability),
    or a warm-up: load the model and this client's data ahead of training."""
    from fedllm_flwr.client import describe, partition_of, site_config, warm_up
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.warmup import WARM_UP_KEY

    _quiet()
    cfg = site_config(load_cfg(context.run_config), context.node_config)
    config = msg.content.config_records.get("config")
    if config is not None and config.get(WARM_UP_KEY):
        info = warm_up(cfg, context.node_config)
    else:
        info = describe(cfg, *partition_of(context.node_config))
    return Message(content=RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def _cfg(msg: Message, context: Context):
    """The run's config for this node: its own data file (dataset.source=sites)
    and, under FedOT, its emulator (installed from the message when it carries one)."""
    from fedllm_flwr.client import offsite_config, site_config
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.transport import EMULATOR_ID_KEY, emulator_files

    _quiet()
    cfg = site_config(load_cfg(context.run_config), context.node_config)
    if cfg.algorithm.name == "fedot":
        emulator_id = str(msg.content["config"].get(EMULATOR_ID_KEY, ""))
        cfg = offsite_config(cfg, emulator_id, emulator_files(msg.content))
    return cfg


def _quiet() -> None:
    from fedllm_flwr import quiet_third_party_output

    quiet_third_party_output()


def _feedback(cfg, context: Context):
    """This node's error feedback for a lossy uplink codec, with its residual so far."""
    from fedllm_flwr.compression import ErrorFeedback, codecs

    if not cfg.compression.lossy_feedback:
        return None
    kept = context.state.array_records.get(FEEDBACK_KEY)
    return ErrorFeedback(codecs(cfg.compression)[1], kept["residual"].numpy() if kept is not None else None)


def _private(context: Context) -> dict | None:
    """This node's own adapter tensors kept from its last round, if any."""
    from fedllm_flwr.transport import arrays_to_state

    kept = context.state.array_records.get(PRIVATE_KEY)
    return arrays_to_state(kept) if kept is not None else None
