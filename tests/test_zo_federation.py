"""The zeroth-order federation driven in-process: the server strategy wires each node's
message, the node functions (`fedllm_flwr.node`) answer as the ClientApp would, the
strategy aggregates. Flower's round loop without Flower, on tiny models."""

import numpy as np
import pytest
from test_zo import _zo_reply

from fedllm_flwr.zo import pool_id, seed_pool


@pytest.fixture(autouse=True)
def fresh_models():
    """Each test builds its own models (and `train.threads=1` holds for it alone)."""
    import torch

    from fedllm_flwr.model import clear_model_cache

    threads = torch.get_num_threads()
    clear_model_cache()
    yield
    clear_model_cache()
    torch.set_num_threads(threads)


def _zo_overrides(model_dir, *extra):
    # One thread: the tiny model's matrices are far too small to share out (and the test machine is shared).
    return [f"model.name={model_dir}", "algorithm=zo", "dataset.synthetic.train_per_task=20", "train.local_steps=1",
            "train.batch_size=2", "train.threads=1", "zo.num_seeds=16", *extra]  # fmt: skip


def _federate(strategy, arrays, nodes, rounds, run_config):
    """Rounds of the federation: each node (id -> NodeState) gets the message the strategy
    wires for it, the node function answers, the strategy aggregates. The last global arrays."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedllm_flwr import node
    from fedllm_flwr.keys import ARRAYS_KEY

    for server_round in rounds:
        sent = [
            Message(RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord({"server-round": server_round})}),
                    dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes
        ]  # fmt: skip
        replies = [
            Message(node.train(m.content, run_config, {"partition-id": p, "num-partitions": len(nodes)}, nodes[n]),
                    reply_to=m)
            for p, (n, m) in enumerate(zip(nodes, strategy._wire(arrays, sent, remember=True), strict=True))
        ]  # fmt: skip
        arrays, _ = strategy.aggregate_train(server_round - strategy.round_offset, replies)
    return arrays


def _initial(overrides):
    """(config, the seeded initial adapter as the server's first arrays)."""
    from flwr.app import Array, ArrayRecord

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model

    cfg = load_cfg(overrides)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    return cfg, ArrayRecord({k: Array(v.numpy()) for k, v in bundle.initial.items()})


def test_a_round_that_carried_no_steps_is_not_held_and_nodes_go_on(tiny_model_dir, task_identity, caplog):
    from fedllm_flwr import node
    from fedllm_flwr.strategy.zo import SeedFederation

    overrides = _zo_overrides(tiny_model_dir)
    cfg, initial = _initial(overrides)
    pool = seed_pool(cfg.seed, cfg.zo.num_seeds)
    strategy = SeedFederation(pool=pool)
    strategy._wire(initial, [])
    # Every step of every client was skipped: replies with no (index, coefficient) pair.
    arrays, _ = strategy.aggregate_train(1, [_zo_reply(1, [], [], pool_id(pool)), _zo_reply(2, [], [], pool_id(pool))])
    assert strategy.rounds == {} and strategy.ledger.pop(1)["zo-seeds"] == 0
    assert "Round 1: the replies carried no steps, so the global model did not move" in caplog.text
    assert all(np.array_equal(arrays[k].numpy(), initial[k].numpy()) for k in initial)
    # A node, which counts the rounds whose steps it applied, takes the next message.
    nodes = {1: node.NodeState()}
    _federate(strategy, arrays, nodes, [2], {"overrides": " ".join(overrides)})
    assert nodes[1].zo_count == 0 and strategy.ledger.pop(2)["clients-ok"] == 1
