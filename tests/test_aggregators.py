"""Strategies beyond FedAvg: hand-computed updates, and each preset on the tiny model."""

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.strategy.aggregators import (
    Mifa,
    MifaMemory,
    RobustAggregate,
    ServerOptFedAvg,
    server_optimizer,
    to_arrays,
    to_state,
)
from fedllm_flwr.strategy.compat import STRATEGIES
from fedllm_flwr.strategy.registry import build_strategy
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.transport import pack


@pytest.fixture(autouse=True)
def _messages(task_identity):
    pass


def reply(node: int, st: dict[str, np.ndarray], n: int = 10, lr: float = 0.1, partition: int | None = None) -> Message:
    content = pack({k: torch.from_numpy(v) for k, v in st.items()})
    metrics = {"num-examples": n, "train-loss": 1.0, "lr": lr, "partition-id": node if partition is None else partition}
    content["metrics"] = MetricRecord(metrics)
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=sent)


def w(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float32)}


def prepared(strategy, current: dict[str, np.ndarray], num_clients: int = 0):
    """A strategy as it stands after configure_train sent `current`."""
    strategy._expected = [(k, tuple(v.shape)) for k, v in current.items()]
    strategy.current = {k: v.copy() for k, v in current.items()}
    if isinstance(strategy, Mifa):
        strategy.num_clients = num_clients
    return strategy


def test_median_and_trimmed_mean_by_hand():
    states = [w(1, 10), w(2, -5), w(100, 0), w(3, 1), w(4, 2)]

    def robust(kind, trim=0.2):
        strategy = prepared(RobustAggregate(kind=kind, trim=trim), w(0, 0))
        arrays, _ = strategy.aggregate_train(1, [reply(i, st, n=10 * (i + 1)) for i, st in enumerate(states)])
        return to_state(arrays)["w"]

    np.testing.assert_allclose(robust("median"), [3, 1])  # unweighted: the claimed sizes do not count
    # trim 0.2 of 5 drops one value at each end: column 0 keeps 2,3,4; column 1 keeps 0,1,2
    np.testing.assert_allclose(robust("trimmed_mean"), [3, 1])
    np.testing.assert_allclose(robust("trimmed_mean", 0.0), [22, 1.6], rtol=1e-6)


def test_server_optimizers_are_flowers_steps_by_hand():
    """Flower's FedAvgM, FedAdam (with its bias-corrected step) and FedYogi, on the mean update."""

    def steps(kind, **knobs):
        strategy = prepared(ServerOptFedAvg(optimizer=server_optimizer(kind, **knobs)), w(1.0))
        out = []
        for server_round, target in ((1, 1.5), (2, None)):
            target = target if target is not None else float(out[-1]) + 0.5
            arrays, _ = strategy.aggregate_train(server_round, [reply(1, w(target))])  # update +0.5
            out.append(to_state(arrays)["w"][0])
            prepared(strategy, to_state(arrays))
        return out

    np.testing.assert_allclose(steps("avgm", lr=1.0, beta1=0.9), [1.5, 1.5 + 0.95], rtol=1e-6)  # m = 0.9 m + d
    m1, v1 = 0.1 * 0.5, 0.01 * 0.25
    eta = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's FedAdam corrects the bias of round 1
    adam = steps("adam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_allclose(adam[0], 1.0 + eta * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-6)
    yogi = steps("yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    np.testing.assert_allclose(yogi[0], 1.0 + 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-6)  # v from 0 toward d^2


def test_server_optimizer_state_survives_a_checkpoint():
    for kind in ("avgm", "adam"):
        first = prepared(ServerOptFedAvg(optimizer=server_optimizer(kind, lr=0.1)), w(1.0, 2.0))
        first.aggregate_train(1, [reply(1, w(1.5, 2.5))])
        saved = first.state()
        assert saved and all(k.startswith(("m/", "v/")) for k in saved)
        second = prepared(ServerOptFedAvg(optimizer=server_optimizer(kind, lr=0.1)), w(1.5, 2.5))
        second.load_state(saved)
        prepared(first, w(1.5, 2.5))
        a, _ = first.aggregate_train(2, [reply(1, w(1.7, 2.2))])
        b, _ = second.aggregate_train(2, [reply(1, w(1.7, 2.2))])
        np.testing.assert_array_equal(to_state(a)["w"], to_state(b)["w"])


def test_mifa_update_with_one_stale_client_by_hand():
    """3 clients; round 1 all answer, round 2 client 2 does not: its old G stays in the mean."""
    mifa = prepared(Mifa(lr_for={1: 0.1, 2: 0.05}.get), w(0.0, 0.0), num_clients=3)
    replies = [reply(0, w(0.1, 0.0)), reply(1, w(0.2, 0.3)), reply(2, w(0.6, 0.0))]
    arrays, _ = mifa.aggregate_train(1, replies)
    g = {0: [1.0, 0.0], 1: [2.0, 3.0], 2: [6.0, 0.0]}  # (w_i - w_0) / 0.1
    w1 = 0.1 * np.mean(list(g.values()), axis=0)  # [0.3, 0.1]
    np.testing.assert_allclose(to_state(arrays)["w"], w1, rtol=1e-3)
    prepared(mifa, to_state(arrays), num_clients=3)
    replies = [
        reply(0, {"w": (w1 + [0.05, 0.05]).astype(np.float32)}, lr=0.05),
        reply(1, {"w": w1.astype(np.float32)}, lr=0.05),
    ]
    arrays, _ = mifa.aggregate_train(2, replies)
    g[0], g[1] = [1.0, 1.0], [0.0, 0.0]  # refreshed; g[2] is stale
    w2 = w1 + 0.05 * np.mean(list(g.values()), axis=0)  # [0.3 + 0.05 * 7/3, 0.1 + 0.05 / 3]
    np.testing.assert_allclose(to_state(arrays)["w"], w2, rtol=1e-3)
    assert mifa.ledger.pop(2)["mifa-clients-remembered"] == 3


def test_mifa_takes_the_rate_from_the_schedule_not_the_replies():
    """A reply with no `lr`, or a zero one, changes nothing: the server knows the schedule."""
    mifa = prepared(Mifa(lr_for=lambda r: 0.1), w(0.0), num_clients=2)
    no_lr = reply(0, w(0.1))
    no_lr.content["metrics"] = MetricRecord({"num-examples": 10, "partition-id": 0})
    arrays, _ = mifa.aggregate_train(1, [no_lr, reply(1, w(0.3), lr=0.0)])
    np.testing.assert_allclose(to_state(arrays)["w"], [0.1 * (1 + 3) / 2], rtol=1e-3)


def test_mifa_rate_follows_the_runs_schedule(tiny_cfg):
    from fedllm_flwr.strategy.aggregators import round_lr
    from fedllm_flwr.train import lr_at

    cfg = tiny_cfg("strategy=mifa", "num_rounds=3", "train.lr=0.05")
    strategy = build_strategy(cfg)
    steps = cfg.train.local_steps
    for rnd in (1, 2, 3):
        assert strategy.lr_for(rnd) == round_lr(cfg, rnd) == lr_at((rnd - 1) * steps, 3 * steps, cfg.train)
    assert round_lr(cfg, 3) < round_lr(cfg, 1)  # the cosine schedule decays across rounds


def test_mifa_counts_unseen_clients_as_zero_or_waits_for_all():
    memory = MifaMemory()
    memory.refresh(0, w(3.0))
    np.testing.assert_allclose(memory.mean_over(3)["w"], [1.0])  # two clients not seen yet
    memory.refresh(0, w(6.0))  # a refresh replaces, the sum stays exact
    np.testing.assert_allclose(memory.sum["w"], [6.0])
    waiting = prepared(Mifa(wait_for_all=True, lr_for=lambda r: 0.1), w(0.0), num_clients=3)
    assert waiting.aggregate_train(1, [reply(0, w(0.1)), reply(1, w(0.2))])[0] is None
    arrays, _ = waiting.aggregate_train(2, [reply(2, w(0.3))])
    np.testing.assert_allclose(to_state(arrays)["w"], [0.1 * (1 + 2 + 3) / 3], rtol=1e-3)


def test_mifa_state_survives_a_checkpoint_bit_for_bit():
    """A run resumed from MIFA's checkpoint moves the adapter exactly as the run that
    never stopped: the running sum (refreshed as sum + new - old, round after round) is
    the one the run had, not the remembered updates added up again."""
    rng = np.random.default_rng(0)

    def random_reply(node):
        return reply(node, {"w": rng.standard_normal(64).astype(np.float32)})

    first = prepared(Mifa(lr_for=lambda r: 0.1), w(*[0.0] * 64), num_clients=3)
    for server_round, nodes in enumerate([(0, 1, 2), (0, 2), (1,), (0, 1)], start=1):
        arrays, _ = first.aggregate_train(server_round, [random_reply(n) for n in nodes])
        prepared(first, to_state(arrays), num_clients=3)
    second = prepared(Mifa(lr_for=lambda r: 0.1), to_state(arrays), num_clients=0)
    second.load_state(first.state())
    replies = [random_reply(2)]
    a, _ = first.aggregate_train(5, replies)
    b, _ = second.aggregate_train(5, replies)
    np.testing.assert_array_equal(to_state(a)["w"], to_state(b)["w"])


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_preset_aggregates_two_replies(name, tiny_cfg):
    from fedllm_flwr.model import build_model, get_adapter_state

    cfg = tiny_cfg(f"strategy={name}")
    assert cfg.strategy.name == name
    strategy = build_strategy(cfg)
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = {k: v.numpy().astype(np.float32) for k, v in get_adapter_state(bundle.model).items()}
    strategy._expected = [(k, tuple(v.shape)) for k, v in start.items()]
    if hasattr(strategy, "current"):
        prepared(strategy, start, num_clients=2)
    a = {k: v + 0.01 for k, v in start.items()}
    b = {k: v - 0.01 for k, v in start.items()}
    arrays, _ = strategy.aggregate_train(1, [reply(1, a, n=30), reply(2, b, n=10)])
    out = to_state(arrays)
    assert all(np.isfinite(v).all() and v.shape == start[k].shape for k, v in out.items())
    if name == "svd":  # each module's B A: the best rank-r approximation of 0.75 B_a A_a + 0.25 B_b A_b
        from fedllm_flwr.strategy.lora_products import multiplying_pairs

        for a_key, b_key in multiplying_pairs(out):
            total = 0.75 * a[b_key] @ a[a_key] + 0.25 * b[b_key] @ b[a_key]
            u, s, vt = np.linalg.svd(total)
            r = out[a_key].shape[0]
            np.testing.assert_allclose(out[b_key] @ out[a_key], (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
        return
    if name == "stacking":  # the adapter restarts; the round's stack is exactly the weighted sum (fp16 wire)
        from fedllm_flwr.lora_merge import stacked
        from fedllm_flwr.lora_stacks import module_of
        from fedllm_flwr.strategy.lora_products import multiplying_pairs

        assert all(np.array_equal(out[k], start[k]) for k in out)
        merged = stacked(strategy.merged_parts())
        for a_key, b_key in multiplying_pairs(out):
            a_m, b_m = (x.double().numpy() for x in merged[module_of(a_key)])
            total = 0.75 * a[b_key] @ a[a_key] + 0.25 * b[b_key] @ b[a_key]
            np.testing.assert_allclose(b_m @ a_m, total, atol=2e-3)
        return
    if name == "zero_padding":  # equal ranks: HetLoRA's weights, per module ||B_k A_k||_F over their sum
        from fedllm_flwr.strategy.lora_products import multiplying_pairs

        for a_key, b_key in multiplying_pairs(out):
            norm_a, norm_b = (np.linalg.norm(s[b_key] @ s[a_key]) for s in (a, b))
            for k in (a_key, b_key):
                mean = (norm_a * a[k] + norm_b * b[k]) / (norm_a + norm_b)
                np.testing.assert_allclose(out[k], mean, atol=1e-3)  # fp16 on the wire
        return
    key = next(iter(out))
    shift = float(np.mean(out[key] - start[key]))
    # Weighted mean update: (30 * 0.01 - 10 * 0.01) / 40 = 0.005; unweighted: 0.
    m1, v1 = 0.1 * 0.005, 0.01 * 0.005**2  # Flower's FedAdam and FedYogi, first step (v starts at 0)
    yogi = 0.01 * m1 / (np.sqrt(v1) + 1e-3)
    adam = yogi * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # FedAdam's bias correction in round 1
    expected = {
        "fedavg": 0.005, "fedprox": 0.005, "fedavgm": 0.005,  # momentum starts at the first update
        "median": 0.0, "trimmed_mean": 0.0, "mifa": 0.0,  # unweighted over clients
        "fedadam": adam, "fedyogi": yogi,
    }  # fmt: skip
    assert shift == pytest.approx(expected[name], abs=1e-4), name


def test_fedprox_pulls_local_weights_toward_the_global_adapter(tiny_cfg):
    from fedllm_flwr.client import local_train
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state

    clear_model_cache()
    drift = {}
    for name, mu in (("fedavg", 0.0), ("fedprox", 50.0)):
        cfg = tiny_cfg(f"strategy={name}", f"strategy.proximal_mu={mu}", "train.local_steps=6", "train.lr=0.05")
        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
        start = get_adapter_state(bundle.model)
        state, metrics = local_train(cfg, start, 1, 0, 2)
        drift[name] = sum(float(((state[k] - start[k]) ** 2).sum()) for k in start)
        assert metrics["lr"] == pytest.approx(0.05)
    assert 0 < drift["fedprox"] < 0.5 * drift["fedavg"]


def test_strategies_other_than_fedavg_need_the_fed_scenario():
    with pytest.raises(UserError, match="strategy=mifa cannot be combined with scenario=local"):
        load_cfg(["strategy=mifa", "scenario=local"])


def test_round_trip_helpers_keep_fp32():
    arrays = to_arrays(w(1.5, 2.5))
    assert to_state(arrays)["w"].dtype == np.float32


def test_availability_draws_are_seeded_and_follow_the_probabilities():
    from fedllm_flwr.strategy.availability import Availability

    uniform = Availability("uniform", p=0.5, seed=3)
    draws = [uniform.available(r, c) for r in range(1, 201) for c in range(5)]
    assert draws == [Availability("uniform", p=0.5, seed=3).available(r, c) for r in range(1, 201) for c in range(5)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws != [Availability("uniform", p=0.5, seed=4).available(r, c) for r in range(1, 201) for c in range(5)]
    per_client = Availability("per_client", p=0.5, per_client=[1.0, 0.1])
    assert all(per_client.available(r, 0) for r in range(1, 100))
    assert sum(per_client.available(r, 1) for r in range(1, 1001)) < 200
    by_category = Availability("category", p=1.0, per_category={"add": 0.2})
    assert by_category.probability(0, "add") == 0.2 and by_category.probability(0, "reverse") == 1.0
    assert Availability().available(1, 7)  # always


def test_unavailable_clients_are_not_sampled_and_participants_are_logged(tiny_cfg):
    cfg = tiny_cfg("strategy=mifa", "strategy.availability=per_client", "strategy.available_per_client=[1.0,0.01]")
    nodes = {11: {"partition-id": 0, "category": "add"}, 12: {"partition-id": 1, "category": "reverse"}}
    strategy = build_strategy(cfg, setup=RoundSetup(nodes))
    sent = [Message(content=RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in (11, 12)]
    chosen = strategy.select_train(1, sent)
    assert [m.metadata.dst_node_id for m in chosen] == [11]
    assert strategy.ledger.pop(1)["participants"] == "0"


class TwoNodes:
    def get_node_ids(self):
        return [1, 2]


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "mifa"])
@pytest.mark.parametrize("downlink", ["int8", "fp16"])
def test_zero_client_updates_leave_the_adapter_where_it_is_under_a_lossy_downlink(name, downlink):
    """The pseudo-gradient is the mean of what the clients changed, not the distance
    between their decoded copy of the adapter and the server's fp32 one."""
    from flwr.app import ConfigRecord

    from fedllm_flwr.compression import Codec
    from fedllm_flwr.transport import unpack

    cfg = load_cfg([f"strategy={name}", f"compression={downlink}"] if downlink == "int8" else [f"strategy={name}"])
    strategy = build_strategy(cfg)
    rng = np.random.default_rng(0)
    start = {f"l{i}.lora_A.weight": (rng.standard_normal((8, 64)) * 0.02).astype(np.float32) for i in range(4)}
    arrays = to_arrays(start)
    for server_round in range(1, 21):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), TwoNodes()))
        replies = []
        for message in messages:
            sent = unpack(message.content)  # what the node decodes
            zero = {k: np.zeros_like(v) for k, v in sent.items()}
            content = pack(zero, Codec(cfg.compression.name if downlink == "int8" else "fp16"), relative=True)
            content["metrics"] = MetricRecord(
                {"num-examples": 10, "train-loss": 1.0, "lr": 1e-3, "partition-id": message.metadata.dst_node_id}
            )
            replies.append(Message(content, reply_to=message))
        arrays, _ = strategy.aggregate_train(server_round, replies)
    moved = max(float(np.abs(arrays[k].numpy() - v).max()) for k, v in start.items())
    assert moved == 0.0, moved
