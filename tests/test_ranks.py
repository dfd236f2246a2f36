"""LoRA of unequal ranks per site (zero-padding, SVD) and FFA-LoRA: the factor
arithmetic by hand, the strategies over real messages, and the bad inputs."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.strategy.lora_products import at_rank, padded, product_factors, rank_of
from fedllm_flwr.strategy.ranked import SvdRedistribution, ZeroPadding
from fedllm_flwr.strategy.registry import build_strategy
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.transport import pack

A, B = "layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"


def lora(a, b, **rest):
    return {A: np.asarray(a, np.float32), B: np.asarray(b, np.float32), **{k: np.asarray(v) for k, v in rest.items()}}


def dense_truncation(products, weights, rank):
    """sum_k p_k P_k and its best rank-`rank` approximation, by a full dense SVD."""
    total = sum(p * m for p, m in zip(weights, products, strict=True))
    u, s, vt = np.linalg.svd(total)
    return total, (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_truncating_and_padding_keep_the_product_of_what_they_keep():
    rng = np.random.default_rng(0)
    state = lora(rng.normal(size=(4, 6)), rng.normal(size=(5, 4)), **{"layers.0.q_proj.lora_magnitude_vector": [1.0]})
    low = at_rank(state, 2)
    assert low[A].shape == (2, 6) and low[B].shape == (5, 2) and rank_of(low) == 2
    np.testing.assert_array_equal(low[A], state[A][:2])
    assert low["layers.0.q_proj.lora_magnitude_vector"] is state["layers.0.q_proj.lora_magnitude_vector"]
    back = padded(low, 4)
    assert back[A].shape == (4, 6) and not back[A][2:].any() and not back[B][:, 2:].any()
    np.testing.assert_allclose(back[B] @ back[A], low[B] @ low[A])


def test_product_factors_match_a_dense_svd_of_the_weighted_sum():
    rng = np.random.default_rng(1)
    ranks, weights = [2, 4, 8], np.array([0.5, 0.3, 0.2])
    a_list = [rng.normal(size=(r, 20)) for r in ranks]
    b_list = [rng.normal(size=(12, r)) for r in ranks]
    total, best = dense_truncation([b @ a for a, b in zip(a_list, b_list, strict=True)], weights, 6)
    b, a, norm, lost = product_factors(a_list, b_list, weights, 6)
    assert b.shape == (12, 6) and a.shape == (6, 20)
    np.testing.assert_allclose(b @ a, best, atol=1e-10)
    assert norm == pytest.approx(np.square(total).sum()) and lost == pytest.approx(np.square(total - best).sum())
    # The singular values are split evenly between the factors.
    np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1))
    # A rank above the sum's own (1 + 1 = 2 < 3): exact, and the unused direction is zero in both.
    b, a, _, lost = product_factors(a_list[:1], b_list[:1], np.array([1.0]), 3)
    np.testing.assert_allclose(b @ a, b_list[0] @ a_list[0], atol=1e-10)
    assert lost == pytest.approx(0.0, abs=1e-18) and not a[2].any() and not b[:, 2].any()


def _reply(node: int, state: dict[str, np.ndarray], n: int) -> Message:
    content = pack({k: torch.from_numpy(v) for k, v in state.items()})
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _send(strategy, global_state: dict[str, np.ndarray], nodes: list[int]) -> dict[int, dict[str, np.ndarray]]:
    """Configure a round by hand: what each node is sent (as it decodes it)."""
    arrays = ArrayRecord({k: Array(v) for k, v in global_state.items()})
    strategy.current = {k: v.copy() for k, v in global_state.items()}
    strategy._expected = [(k, v.shape) for k, v in global_state.items()]
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    strategy._wire(arrays, messages, remember=True)
    return strategy.sent


A1, B1 = "layers.1.q_proj.lora_A.weight", "layers.1.q_proj.lora_B.weight"


def test_zero_padding_is_hetloras_sparsity_weighted_mean_by_hand(task_identity):
    strategy = ZeroPadding(ranks={1: 1, 2: 2}, down=None, up=None)
    start = lora(np.arange(6).reshape(2, 3) / 10, np.zeros((2, 2)), **{A1: np.ones((2, 3)), B1: np.zeros((2, 2))})
    sent = _send(strategy, start, [1, 2])
    assert sent[1][A].shape == (1, 3) and sent[2][A].shape == (2, 3)
    one = lora([[1.0, 0, 0]], [[2.0], [0]], **{A1: [[1.0, 0, 0]], B1: [[0.0], [0]]})
    two = lora(
        [[0, 1.0, 0], [0, 0, 1.0]], [[0, 1.0], [1.0, 0]], **{A1: [[0, 1.0, 0], [0, 0, 1.0]], B1: np.zeros((2, 2))}
    )
    arrays, _ = strategy.aggregate_train(1, [_reply(1, one, 30), _reply(2, two, 10)])
    out = {k: v.numpy() for k, v in arrays.items()}
    # ||B_1 A_1||_F = 2 and ||B_2 A_2||_F = sqrt(2), whatever the example counts (30, 10):
    # weights 2 / (2 + sqrt 2) = 2 - sqrt 2 and sqrt 2 - 1; node 1 padded with zeros.
    w1, w2 = 2 - np.sqrt(2), np.sqrt(2) - 1
    np.testing.assert_allclose(out[A], [[w1, w2, 0], [0, 0, w2]], atol=1e-7)
    np.testing.assert_allclose(out[B], [[2 * w1, w2], [w2, 0]], atol=1e-7)
    # Per module: in layer 1 both products are zero, so the example weights 3/4 and 1/4 apply.
    np.testing.assert_allclose(out[A1], [[0.75, 0.25, 0], [0, 0, 0.25]], atol=1e-7)
    error = strategy.ledger.pop(1)["lora-aggregation-error"]
    meant = w1 * one[B] @ one[A] + w2 * two[B] @ two[A]
    assert error == pytest.approx(np.linalg.norm(meant - out[B] @ out[A]) / np.linalg.norm(meant), rel=1e-5)

    _send(strategy, out, [1, 2])
    arrays, _ = strategy.aggregate_train(2, [_reply(1, two, 30), _reply(2, two, 10)])  # node 1 sends rank 2
    assert strategy.ledger.pop(2)["clients-dropped"] == 1
    np.testing.assert_allclose(arrays[A].numpy(), two[A], atol=1e-3)  # only node 2's reply counted


def test_zero_padding_keeps_a_rank_slot_no_reply_holds(task_identity):
    # The rank-2 site fails this round: slot 1 would average zeros alone, A[1] = B[:, 1] = 0,
    # and its gradient would stay 0 in every later round. It keeps the global adapter's values.
    strategy = ZeroPadding(ranks={1: 1, 2: 2}, down=None, up=None)
    start = lora([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [[0.5, -0.5], [0.25, 0.75]])
    _send(strategy, start, [1, 2])
    one = lora([[1.0, 0, 0]], [[2.0], [1.0]])
    arrays, _ = strategy.aggregate_train(1, [_reply(1, one, 30)])
    out = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(out[A][0], one[A][0], atol=1e-3)  # fp16 on the wire
    np.testing.assert_array_equal(out[A][1], start[A][1])
    np.testing.assert_array_equal(out[B][:, 1], start[B][:, 1])


def test_svd_redistribution_is_the_truncated_sum_and_keeps_unused_directions_trainable(task_identity):
    strategy = SvdRedistribution(ranks={1: 1, 2: 1}, down=None, up=None)
    rng = np.random.default_rng(2)
    start = lora(rng.normal(size=(3, 5)), np.zeros((4, 3)))
    _send(strategy, start, [1, 2])
    one = lora(rng.normal(size=(1, 5)), rng.normal(size=(4, 1)))
    two = lora(rng.normal(size=(1, 5)), rng.normal(size=(4, 1)))
    arrays, _ = strategy.aggregate_train(1, [_reply(1, one, 10), _reply(2, two, 30)])
    out = {k: v.numpy() for k, v in arrays.items()}
    total, _ = dense_truncation([one[B] @ one[A], two[B] @ two[A]], [0.25, 0.75], 3)
    # Rank 1 + 1 fits in the global rank 3: exact, no aggregation error.
    np.testing.assert_allclose(out[B] @ out[A], total, atol=1e-3)  # fp16 on the wire
    assert strategy.ledger.pop(1)["lora-aggregation-error"] == pytest.approx(0.0, abs=1e-12)
    # The third direction is unused: its B column is zero, its A row the one the round started from.
    assert not out[B][:, 2].any()
    np.testing.assert_array_equal(out[A][2], start[A][2])

    # Three directions into rank 2: the figure is what the truncation dropped.
    strategy = SvdRedistribution(ranks={1: 2, 2: 1}, down=None, up=None)
    _send(strategy, at_rank(start, 2), [1, 2])
    wide = lora(rng.normal(size=(2, 5)), rng.normal(size=(4, 2)))
    strategy.aggregate_train(1, [_reply(1, wide, 10), _reply(2, one, 10)])
    total, best = dense_truncation([wide[B] @ wide[A], one[B] @ one[A]], [0.5, 0.5], 2)
    expected = np.linalg.norm(total - best) / np.linalg.norm(total)
    assert strategy.ledger.pop(1)["lora-aggregation-error"] == pytest.approx(expected, rel=1e-2)


def test_each_site_takes_its_rank_and_alpha_scales_with_it():
    from fedllm_flwr.data.sites import site_config, site_rank

    cfg = load_cfg(["strategy=svd", "peft.client_ranks=[2,4,16]"])
    node = {"partition-id": 2, "num-partitions": 3}
    site = site_config(cfg, node)
    assert (site.peft.r, site.peft.alpha) == (16, 32)  # alpha / r stays 16 / 8
    assert site_rank(cfg, {**node, "lora-rank": 4}) == 4  # a deployed node's own choice wins
    with pytest.raises(ValueError, match=r"peft.client_ranks has 3 ranks for 5 nodes: partition 3 has none"):
        site_rank(cfg, {"partition-id": 3, "num-partitions": 5})
    with pytest.raises(ValueError, match="lora-rank must be a positive integer"):
        site_rank(cfg, {**node, "lora-rank": 0})
    with pytest.raises(ValueError, match="strategy=fedavg averages tensors of one shape"):
        site_rank(load_cfg([]), {**node, "lora-rank": 4})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft.client_ranks=[2,4]"], "peft.client_ranks=[2,4] cannot be combined with strategy=fedavg"),
        (["strategy=svd", "peft=prompt_tuning"], "strategy=svd cannot be combined with peft=prompt_tuning"),
        (
            ["peft=adalora", "peft.freeze_a=true", "scenario=local"],
            "peft.freeze_a=true cannot be combined with peft=adalora",
        ),
        (
            ["peft=ffa_lora", "strategy=zero_padding"],
            "peft.freeze_a=true cannot be combined with strategy=zero_padding",
        ),
        (["peft=ia3", "peft.client_ranks=[2]"], "peft.client_ranks=[2] cannot be combined with peft=ia3"),
        (["peft.client_ranks=[0,2]", "strategy=svd"], "peft.client_ranks must all be >= 1"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError) as info:
        load_cfg(overrides)
    assert message in str(info.value)


def test_a_rank_the_model_cannot_hold_is_refused(tiny_cfg, tiny_model_dir):
    from fedllm_flwr.model import build_model, model_rank_limit

    cfg = tiny_cfg()
    # The tiny Llama's v_proj maps 32 features to 2 key-value heads x 8 = 16.
    assert model_rank_limit(cfg.model, ["q_proj", "v_proj"]) == ("v_proj", 16)
    with pytest.raises(UserError, match=r"peft.r=17 is larger than LoRA allows on v_proj \(min\(in, out\) = 16\)"):
        build_model(cfg.model, cfg.peft.at_rank(17))


def test_ffa_lora_trains_and_sends_only_b_and_its_average_is_exact(tiny_cfg):
    from fedllm_flwr.client import local_train
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state

    clear_model_cache()
    cfg = tiny_cfg("peft=ffa_lora", "train.lr=0.05")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    state = get_adapter_state(bundle.model)
    assert state and all(".lora_B." in k for k in state)
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if ".lora_A." in n}
    plain = build_model(cfg.model, load_cfg([f"model.name={cfg.model.name}"]).peft, cfg.train.precision, cfg.seed)
    # The frozen A is LoRA's own seeded initialisation: the same on every node of the run.
    for name, value in frozen.items():
        torch.testing.assert_close(value, dict(plain.model.named_parameters())[name])
    trained, _ = local_train(cfg, state, 1, 0, 2)
    assert set(trained) == set(state) and any(not torch.equal(trained[k], state[k]) for k in state)
    for name, param in bundle.model.named_parameters():
        if name in frozen:
            torch.testing.assert_close(param, frozen[name])
    strategy = build_strategy(cfg)
    assert strategy.exact_products and not build_strategy(tiny_cfg()).exact_products


class NodesGrid:
    """A grid whose nodes answer QUERY messages with `fedllm_flwr.node.query`; an
    `unreachable` node answers with an error."""

    def __init__(self, run_config: dict, node_configs: dict[int, dict], unreachable: set[int] = frozenset()):
        self.run_config, self.node_configs, self.unreachable = run_config, node_configs, unreachable

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error

        from fedllm_flwr import node

        return [
            Message(Error(code=0, reason="the node is gone"), reply_to=m)
            if m.metadata.dst_node_id in self.unreachable
            else Message(node.query(m.content, self.run_config, self.node_configs[m.metadata.dst_node_id]), reply_to=m)
            for m in messages
        ]


def test_the_server_learns_each_nodes_rank_and_refuses_what_cannot_run(tiny_model_dir, task_identity):
    from fedllm_flwr.server.ranks import node_ranks

    def setup(overrides: str, nodes: dict[int, dict]):
        run_config = {"overrides": f"model.name={tiny_model_dir} strategy=zero_padding {overrides}"}
        return node_ranks(NodesGrid(run_config, nodes), load_cfg(run_config))

    part = {i: {"partition-id": i - 1, "num-partitions": 3} for i in (1, 2, 3)}
    cfg, nodes, ranks = setup("peft.client_ranks=[2,4,16]", part)
    assert ranks == {1: 2, 2: 4, 3: 16} and (cfg.peft.r, cfg.peft.alpha) == (16, 32)
    assert nodes[3]["rank-key"] == "peft.client_ranks"
    # Deployment: each SuperNode's own --node-config, whatever the run's list says.
    _, _, ranks = setup("", {7: {"partition-id": 0, "num-partitions": 2, "lora-rank": 3}, 8: part[2]})
    assert ranks == {7: 3, 8: 8}
    with pytest.raises(UserError, match=r"node 3: peft.client_ranks has 2 ranks for 3 nodes: partition 2 has none"):
        setup("peft.client_ranks=[2,4]", part)
    with pytest.raises(UserError, match=r"--node-config lora-rank: node 2 \(partition 1\) has LoRA rank 40, larger "):
        setup("", {1: part[1], 2: {**part[2], "lora-rank": 40}})


def test_a_truncation_is_never_served_for_a_newer_adapter_at_a_freed_ones_address():
    # CPython gives a freed object's address to the next object of its size: a cache
    # keyed by id() then serves the freed adapter's truncation for the new one.
    strategy = ZeroPadding(ranks={1: 1}, down=None, up=None)

    def values(seed: int) -> dict[str, Array]:
        return {A: Array(np.full((2, 3), seed, np.float32)), B: Array(np.full((4, 2), seed, np.float32))}

    record = ArrayRecord(values(0))
    strategy.arrays_for(1, record)
    for seed in range(1, 50):
        address, arrays = id(record), values(seed)  # built first: the record is the next allocation
        del record  # the only reference: freed here
        record = ArrayRecord(arrays)
        sent = strategy.arrays_for(1, record)
        if id(record) == address:
            break
    assert id(record) == address, "no address was reused: the test could not reproduce the case"
    np.testing.assert_array_equal(sent[A].numpy(), np.full((1, 3), seed, np.float32))
    np.testing.assert_array_equal(sent[B].numpy(), np.full((4, 1), seed, np.float32))


def test_a_node_that_connects_after_discovery_is_asked_its_rank_first(tiny_model_dir, task_identity, caplog):
    from flwr.app import ConfigRecord

    from fedllm_flwr.server.ranks import RankQuery, node_ranks

    run_config = {"overrides": f"model.name={tiny_model_dir} strategy=zero_padding peft.client_ranks=[2,4,8,16]"}
    part = {i: {"partition-id": i - 1, "num-partitions": 4} for i in (1, 2, 3, 4)}
    grid = NodesGrid(run_config, {1: part[1], 4: part[4]}, unreachable={6})
    cfg, _, ranks = node_ranks(grid, load_cfg(run_config))
    strategy = build_strategy(cfg, setup=RoundSetup(ranks=ranks, ask_ranks=RankQuery(grid, cfg)))
    assert ranks == {1: 2, 4: 16}
    # Three nodes connect after discovery: one of rank 4, one whose rank the global
    # adapter (16) cannot serve, one that cannot be asked.
    grid.node_configs.update({2: part[2], 5: {**part[3], "lora-rank": 40}, 6: part[3]})
    rng = np.random.default_rng(4)
    start = lora(rng.normal(size=(16, 6)), rng.normal(size=(5, 16)))
    messages = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 4]
    assert strategy.ranks[2] == 4 and strategy.sent[2][A].shape == (4, 6) and strategy.sent[2][B].shape == (5, 4)
    assert (
        "node 5 left out of this round: --node-config lora-rank: its LoRA rank 40 is larger than the global "
        "adapter's (16)" in caplog.text
    )
    assert "node 6 left out of this round: it could not be asked for its LoRA rank: the node is gone" in caplog.text
