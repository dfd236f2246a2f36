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


def _server(overrides):
    """(config, a fresh strategy, the seeded initial adapter as its first arrays), as the
    ServerApp builds them."""
    from flwr.app import Array, ArrayRecord

    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model
    from fedllm_flwr.strategy import build_strategy

    cfg = load_cfg(overrides)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in bundle.initial.items()})
    return cfg, build_strategy(cfg, model=bundle.model), initial


@pytest.fixture(scope="module")
def deep_model_dir(tmp_path_factory):
    """A 12-layer tiny model: 48 LoRA tensors, whose sorted names (layers.1, layers.10,
    layers.11, layers.2 ...) are not the model's order, as a real model's are not."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=12)


def test_a_resumed_run_holds_the_adapter_its_nodes_hold(deep_model_dir, task_identity):
    from fedllm_flwr import node
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.run_dir import RunDir
    from fedllm_flwr.server.resume import resume_run

    overrides = _zo_overrides(deep_model_dir, "num_rounds=2", "run.name=zo")
    run_config = {"overrides": " ".join(overrides)}
    cfg, uninterrupted, initial = _server(overrides)
    assert len(initial) == 48
    whole = _federate(uninterrupted, initial, {1: node.NodeState(), 2: node.NodeState()}, [1, 2], run_config)
    # Stopped after round 1: its checkpoint, then a new server process and restarted nodes go on.
    _, first, _ = _server(overrides)
    after_one = _federate(first, initial, {1: node.NodeState(), 2: node.NodeState()}, [1], run_config)
    run_dir = RunDir.create(cfg)
    run_dir.write_checkpoint(1, {k: v.numpy() for k, v in after_one.items()}, first.state())
    _, resumed, _ = _server(overrides)
    _, done, arrays = resume_run(load_cfg([*overrides, f"resume={run_dir.path}"]), resumed)
    resumed.round_offset = done  # as server/run.py does
    nodes = {1: node.NodeState(), 2: node.NodeState()}
    again = _federate(resumed, arrays, nodes, [2], run_config)
    differing = [k for k in whole if not np.array_equal(whole[k].numpy(), again[k].numpy())]
    assert not differing, f"{len(differing)} of {len(whole)} tensors differ, e.g. {differing[0]}"
    # ... and the nodes hold it too (they apply round 2's steps with their next message).
    _federate(resumed, again, nodes, [3], run_config)
    for state in nodes.values():
        assert all(np.array_equal(state.zo_adapter[k].numpy(), again[k].numpy()) for k in again)


def test_a_round_that_carried_no_steps_is_not_held_and_nodes_go_on(tiny_model_dir, task_identity, caplog):
    from fedllm_flwr import node

    overrides = _zo_overrides(tiny_model_dir)
    cfg, strategy, initial = _server(overrides)
    pool = seed_pool(cfg.seed, cfg.zo.num_seeds)
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


def _steps_message(history, rounds, server_round, pool):
    """A server's message carrying the steps of `rounds` (of `history`: round -> (indices, coefficients))."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedllm_flwr.keys import ZO_POOL_KEY, ZO_STEPS_KEY

    picked = [(t, i, c) for t in rounds for i, c in zip(*history[t], strict=True)]
    return RecordDict({
        "config": ConfigRecord({"server-round": server_round, ZO_POOL_KEY: pool, "rounds-held": server_round - 1}),
        ZO_STEPS_KEY: ArrayRecord({
            "rounds": Array(np.array([p[0] for p in picked], np.int64)),
            "indices": Array(np.array([p[1] for p in picked], np.int64)),
            "coefficients": Array(np.array([p[2] for p in picked], np.float64)),
        }),
    })  # fmt: skip


def test_full_weights_train_and_evaluate_the_model_they_caught_up_with_a_base_of_their_own(
    tiny_model_dir, task_identity, tmp_path
):
    from fedllm_flwr import node
    from fedllm_flwr.model import clear_model_cache

    history, pool = {1: ([3, 9], [1e-3, -1e-3]), 2: ([0], [2e-3])}, pool_id(seed_pool(0, 16))
    node_config = {"partition-id": 0, "num-partitions": 2}
    results = {}
    for share in ("true", "false"):  # false: this client's model is its own, not the process's shared one
        clear_model_cache()
        run_config = {"overrides": " ".join(_zo_overrides(tiny_model_dir, "zo.params=full", f"zo.store_dir={tmp_path}",
                                                          f"model.share_base={share}"))}  # fmt: skip
        trainer, scorer = node.NodeState(identity="run1-node1"), node.NodeState(identity="run1-node2")
        reply = node.train(_steps_message(history, [1], 2, pool), run_config, node_config, trainer)
        scored = node.evaluate(_steps_message(history, [1, 2], 3, pool), run_config, node_config, scorer)
        results[share] = (reply["zo-reply"]["coefficients"].numpy(), scored["metrics"]["eval-loss"])
    np.testing.assert_array_equal(results["false"][0], results["true"][0])  # trained the same model
    assert results["false"][1] == results["true"][1]  # and scored the same


def test_a_failed_message_leaves_no_weight_file_behind_and_its_retry_finds_the_weights(
    tiny_model_dir, task_identity, tmp_path, monkeypatch
):
    from flwr.app import RecordDict

    from fedllm_flwr import client, node

    store = tmp_path / "store"
    run_config = {"overrides": " ".join(_zo_overrides(tiny_model_dir, "zo.params=full", f"zo.store_dir={store}"))}
    history, pool = {1: ([3, 9], [1e-3, -1e-3]), 2: ([0], [2e-3])}, pool_id(seed_pool(0, 16))
    kept = RecordDict()  # Flower's context.state: saved only when a message went through

    def deliver(rounds, server_round):
        state = node.NodeState.load(kept, identity="run1-node1")  # as the ClientApp does, from Flower's ids
        node.train(_steps_message(history, rounds, server_round, pool), run_config,
                   {"partition-id": 0, "num-partitions": 2}, state)  # fmt: skip
        state.save(kept)

    def fail_after_catching_up(*args, **kwargs):
        raise RuntimeError("the node stopped")

    with monkeypatch.context() as patch:  # the first message fails after the weights were stored, three times
        patch.setattr(client, "zo_local_round", fail_after_catching_up)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                deliver([], 1)
    assert len(list(store.iterdir())) == 1
    deliver([], 1)
    deliver([1], 2)
    with monkeypatch.context() as patch:  # round 3's fails the same way: the saved state names round 1's weights
        patch.setattr(client, "zo_local_round", fail_after_catching_up)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                deliver([2], 3)
    assert len(list(store.iterdir())) == 2  # the weights the saved state names, and the newest
    deliver([2], 3)  # the retry finds the weights its saved state names
    assert len(list(store.iterdir())) == 2
