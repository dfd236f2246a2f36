"""The zeroth-order federation driven in-process: the server strategy wires each node's
message, the node functions (`fedllm_flwr.node`) answer as the ClientApp would, the
strategy aggregates. Flower's round loop without Flower, on tiny models."""

import numpy as np
import pytest
from test_zo import _zo_reply

from fedllm_flwr.algorithms.zo.mezo import pool_id, seed_pool


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


def _server(overrides, done=0):
    """(config, a fresh strategy, the seeded initial adapter as its first arrays), as the
    ServerApp builds them; `done`: the rounds a resumed run did before this start."""
    from flwr.app import Array, ArrayRecord

    from fedllm_flwr.algorithms.registry import algorithm_for
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model
    from fedllm_flwr.strategy.registry import build_strategy
    from fedllm_flwr.strategy.round_setup import RoundSetup

    cfg = load_cfg(overrides)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in bundle.initial.items()})
    strategy = build_strategy(cfg, setup=RoundSetup(round_offset=done), **algorithm_for(cfg).strategy(bundle.model))
    return cfg, strategy, initial


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
    _, done, arrays, state = resume_run(load_cfg([*overrides, f"resume={run_dir.path}"]))
    _, resumed, _ = _server(overrides, done)  # as server/run.py does: built knowing the rounds done
    resumed.load_state(state)
    nodes = {1: node.NodeState(), 2: node.NodeState()}
    again = _federate(resumed, arrays, nodes, [2], run_config)
    differing = [k for k in whole if not np.array_equal(whole[k].numpy(), again[k].numpy())]
    assert not differing, f"{len(differing)} of {len(whole)} tensors differ, e.g. {differing[0]}"
    # ... and the nodes hold it too (they apply round 2's steps with their next message).
    _federate(resumed, again, nodes, [3], run_config)
    for state in nodes.values():
        assert all(np.array_equal(state.zo.adapter[k].numpy(), again[k].numpy()) for k in again)


def test_a_node_builds_the_seed_pool_once_per_message(tiny_model_dir, task_identity, monkeypatch):
    """The catch-up and the local round draw from one pool, which the zo plug-in builds
    once and holds (`Zo.pool`), not once per function that needs it."""
    from fedllm_flwr import node
    from fedllm_flwr.algorithms.zo import mezo

    overrides = _zo_overrides(tiny_model_dir)
    _, strategy, initial = _server(overrides)
    built, real = [], mezo.seed_pool
    monkeypatch.setattr(mezo, "seed_pool", lambda *args: built.append(args) or real(*args))
    _federate(strategy, initial, {1: node.NodeState()}, [1, 2], {"overrides": " ".join(overrides)})
    assert len(built) == 2  # two train messages


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
    assert nodes[1].zo.count == 0 and strategy.ledger.pop(2)["clients-ok"] == 1
    # A checkpoint that holds such a round (written before they were dropped) resumes without it.
    strategy.load_state({"zo/1/indices": np.zeros(0, np.int64), "zo/1/coefficients": np.zeros(0)})
    assert strategy.rounds == {}


def _held_after(cfg, rounds):
    """The fingerprint of the global weights after `rounds` of HISTORY: its steps applied
    in the model's order to the seeded initial adapter or, zo.params=full, to the base
    checkpoint's weights."""
    from fedllm_flwr.algorithms.zo.full_weights import pristine
    from fedllm_flwr.algorithms.zo.mezo import apply_steps, tuned_tensors, weights_fingerprint
    from fedllm_flwr.model import build_model

    if cfg.zo.params == "full":
        weights = {k: v.clone() for k, v in pristine(cfg.model.name).items()}
    else:
        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
        weights = {k: bundle.initial[k].clone() for k in tuned_tensors(bundle.model, "adapter")}
    for t in rounds:
        apply_steps(list(weights.values()), seed_pool(cfg.seed, cfg.zo.num_seeds), zip(*HISTORY[t], strict=True))
    return weights_fingerprint(weights.values())


HISTORY = {1: ([3, 9], [1e-3, -1e-3]), 2: ([0], [2e-3])}
"""Two rounds' aggregated steps, (indices, coefficients), for nodes sent them by hand."""


def _steps_message(cfg, rounds, server_round):
    """The server's message for `server_round`, carrying the steps of `rounds` of HISTORY."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from fedllm_flwr.keys import ZO_POOL_KEY, ZO_STEPS_KEY, ZO_WEIGHTS_KEY

    picked = [(t, i, c) for t in rounds for i, c in zip(*HISTORY[t], strict=True)]
    return RecordDict({
        "config": ConfigRecord({
            "server-round": server_round, "rounds-held": server_round - 1,
            ZO_POOL_KEY: pool_id(seed_pool(cfg.seed, cfg.zo.num_seeds)),
            ZO_WEIGHTS_KEY: _held_after(cfg, range(1, server_round)),
        }),
        ZO_STEPS_KEY: ArrayRecord({
            "rounds": Array(np.array([p[0] for p in picked], np.int64)),
            "indices": Array(np.array([p[1] for p in picked], np.int64)),
            "coefficients": Array(np.array([p[2] for p in picked], np.float64)),
        }),
    })  # fmt: skip


@pytest.mark.parametrize("params", ["adapter", "full"])
def test_a_node_that_missed_a_round_catches_up_to_the_same_bits(tiny_model_dir, task_identity, tmp_path, params):
    from flwr.app import RecordDict

    from fedllm_flwr import node
    from fedllm_flwr.algorithms.zo.full_weights import WeightStore, pristine
    from fedllm_flwr.algorithms.zo.mezo import apply_steps
    from fedllm_flwr.config import load_cfg

    overrides = _zo_overrides(tiny_model_dir, "train.local_steps=2", f"zo.params={params}", f"zo.store_dir={tmp_path}")
    cfg, run_config = load_cfg(overrides), {"overrides": " ".join(overrides)}
    node_config = {"partition-id": 0, "num-partitions": 2}
    steady, late = node.NodeState(identity="run1-node1"), node.NodeState(identity="run1-node2")
    node.train(_steps_message(cfg, [], 1), run_config, node_config, steady)
    node.train(_steps_message(cfg, [1], 2), run_config, node_config, steady)
    reply = node.train(_steps_message(cfg, [2], 3), run_config, node_config, steady)
    node.train(_steps_message(cfg, [1, 2], 3), run_config, node_config, late)  # it missed rounds 1 and 2
    kept = RecordDict()  # what the node keeps between messages (Flower's context.state)
    steady.save(kept)
    steady = node.NodeState.load(kept, identity=steady.identity)
    assert steady.zo.round == late.zo.round == 2 and steady.zo.count == late.zo.count == 2
    if params == "adapter":
        held = [{k: v.numpy() for k, v in n.zo.adapter.items()} for n in (steady, late)]
        assert steady.zo.weights == ""
    else:  # each node's global weights are in its own file, tagged with the same history
        assert steady.zo.weights == late.zo.weights
        held = [{k: v.numpy() for k, v in WeightStore(tmp_path, n.identity).load(n.zo.weights).items()}
                for n in (steady, late)]  # fmt: skip
        # The steady node keeps the weights before round 2's too, for a retry of its last message.
        assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["node1", "node1", "node2"]
        # ... and they are the base checkpoint's weights moved by the two rounds' steps, as the server moves its own.
        expected = {k: v.clone() for k, v in pristine(str(tiny_model_dir)).items()}
        for t in (1, 2):
            apply_steps(list(expected.values()), seed_pool(0, 16), zip(*HISTORY[t], strict=True))
        assert expected.keys() == held[0].keys()
        assert all(np.array_equal(v.numpy(), held[0][k]) for k, v in expected.items())
        assert any(not np.array_equal(v.numpy(), held[0][k]) for k, v in pristine(str(tiny_model_dir)).items())
    for key, value in held[0].items():
        assert np.array_equal(value, held[1][key]), key
    indices = reply["zo-reply"]["indices"].numpy()
    assert (
        1 <= len(indices) <= 2 and indices.max() < 16 and np.isfinite(reply["zo-reply"]["coefficients"].numpy()).all()
    )
    with pytest.raises(ValueError, match="this node has applied 1 rounds' steps and the global model 2"):
        node.train(_steps_message(cfg, [2], 3), run_config, node_config, node.NodeState())  # round 1 is missing
    # An evaluation message brings the same catch-up; the node scores the global model on its held-out split.
    fresh = node.NodeState(identity="run1-node3")
    scored = node.evaluate(_steps_message(cfg, [1, 2], 3), run_config, node_config, fresh)["metrics"]
    assert np.isfinite(scored["eval-loss"]) and scored["num-examples"] > 0 and fresh.zo.count == 2


def test_full_weights_train_and_evaluate_the_model_they_caught_up_with_a_base_of_their_own(
    tiny_model_dir, task_identity, tmp_path
):
    from fedllm_flwr import node
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import clear_model_cache

    node_config = {"partition-id": 0, "num-partitions": 2}
    results = {}
    for share in ("true", "false"):  # false: this client's model is its own, not the process's shared one
        clear_model_cache()
        overrides = _zo_overrides(tiny_model_dir, "zo.params=full", f"zo.store_dir={tmp_path}",
                                  f"model.share_base={share}")  # fmt: skip
        cfg, run_config = load_cfg(overrides), {"overrides": " ".join(overrides)}
        trainer, scorer = node.NodeState(identity="run1-node1"), node.NodeState(identity="run1-node2")
        reply = node.train(_steps_message(cfg, [1], 2), run_config, node_config, trainer)
        scored = node.evaluate(_steps_message(cfg, [1, 2], 3), run_config, node_config, scorer)
        results[share] = (reply["zo-reply"]["coefficients"].numpy(), scored["metrics"]["eval-loss"])
    np.testing.assert_array_equal(results["false"][0], results["true"][0])  # trained the same model
    assert results["false"][1] == results["true"][1]  # and scored the same


def test_a_failed_message_leaves_no_weight_file_behind_and_its_retry_finds_the_weights(
    tiny_model_dir, task_identity, tmp_path, monkeypatch
):
    from flwr.app import RecordDict

    from fedllm_flwr import node
    from fedllm_flwr.algorithms.zo import node as zo_node
    from fedllm_flwr.config import load_cfg

    store = tmp_path / "store"
    overrides = _zo_overrides(tiny_model_dir, "zo.params=full", f"zo.store_dir={store}")
    cfg, run_config = load_cfg(overrides), {"overrides": " ".join(overrides)}
    kept = RecordDict()  # Flower's context.state: saved only when a message went through

    def deliver(rounds, server_round):
        state = node.NodeState.load(kept, identity="run1-node1")  # as the ClientApp does, from Flower's ids
        node.train(_steps_message(cfg, rounds, server_round), run_config, {"partition-id": 0, "num-partitions": 2},
                   state)  # fmt: skip
        state.save(kept)

    def fail_after_catching_up(*args, **kwargs):
        raise RuntimeError("the node stopped")

    with monkeypatch.context() as patch:  # the first message fails after the weights were stored, three times
        patch.setattr(zo_node, "local_round", fail_after_catching_up)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                deliver([], 1)
    assert len(list(store.iterdir())) == 1
    deliver([], 1)
    deliver([1], 2)
    with monkeypatch.context() as patch:  # round 3's fails the same way: the saved state names round 1's weights
        patch.setattr(zo_node, "local_round", fail_after_catching_up)
        for _ in range(3):
            with pytest.raises(RuntimeError):
                deliver([2], 3)
    assert len(list(store.iterdir())) == 2  # the weights the saved state names, and the newest
    deliver([2], 3)  # the retry finds the weights its saved state names
    assert len(list(store.iterdir())) == 2


@pytest.mark.parametrize("params", ["adapter", "full"])
def test_a_node_whose_copy_differs_from_the_servers_refuses_the_message(tiny_model_dir, task_identity, tmp_path,
                                                                        params):  # fmt: skip
    from flwr.app import Array
    from safetensors.torch import load_file, save_file

    from fedllm_flwr import node
    from fedllm_flwr.algorithms.zo.full_weights import WeightStore

    # The node's model is its own: in one process it would otherwise be the server's.
    overrides = _zo_overrides(tiny_model_dir, f"zo.params={params}", f"zo.store_dir={tmp_path}",
                              "model.share_base=false")  # fmt: skip
    run_config = {"overrides": " ".join(overrides)}
    _, strategy, initial = _server(overrides)
    nodes = {1: node.NodeState(identity="run1-node1")}
    # Rounds 1 and 2: the node's weights agreed with the server's (it stored those after round 1).
    arrays = _federate(strategy, initial, nodes, [1, 2], run_config)
    # One weight of the node's copy one unit in the last place off: what a z drawn otherwise would leave.
    if params == "adapter":
        name = next(iter(nodes[1].zo.adapter))
        held = nodes[1].zo.adapter[name].numpy().copy()
        held.flat[0] = np.nextafter(held.flat[0], np.float32(np.inf))
        nodes[1].zo.adapter[name] = Array(held)
    else:
        path = WeightStore(tmp_path, nodes[1].identity).path(nodes[1].zo.weights)
        weights = load_file(path)
        first = weights[next(iter(weights))].view(-1)
        first[0] = float(np.nextafter(np.float32(first[0]), np.float32(np.inf)))
        save_file(weights, str(path), metadata={"fingerprint": nodes[1].zo.weights})
    what = "adapter" if params == "adapter" else "base weights"
    with pytest.raises(ValueError, match=rf"this node's copy of the global {what} differs from the server's"):
        _federate(strategy, arrays, nodes, [3], run_config)
