"""What averaging LoRA's A and B apart loses, measured against the clients' own products."""

import math

import numpy as np
import pytest
import torch

from fedllm_flwr.strategy.lora_products import aggregation_error, lora_pairs


def module(a, b, name="layers.0.q_proj"):
    return {
        f"{name}.lora_A.weight": np.array(a, dtype=np.float32),
        f"{name}.lora_B.weight": np.array(b, dtype=np.float32),
    }


def test_the_error_of_averaging_factors_by_hand():
    # Two rank-1 clients whose products are the two halves of the identity:
    # sum p_k B_k A_k = I / 2, while B_avg A_avg = ones / 4.
    one = module([[1, 0]], [[1], [0]])
    two = module([[0, 1]], [[0], [1]])
    assert aggregation_error([one, two], [1, 1]) == pytest.approx(math.sqrt(0.25 / 0.5))
    # Weights matter: with all the weight on one client, nothing is lost.
    assert aggregation_error([one, two], [1, 0]) == pytest.approx(0.0)


def test_a_shared_a_makes_the_average_exact_and_no_lora_means_no_figure():
    a = [[0.3, -0.2, 0.5]]
    states = [module(a, [[1.0], [2.0]]), module(a, [[-3.0], [0.5]])]
    assert aggregation_error(states, [30, 10]) == pytest.approx(0.0, abs=1e-12)
    assert aggregation_error([{"prompt_encoder.weight": np.ones(3)}], [1]) is None
    assert aggregation_error([module([[1, 0]], [[1, 2]])], [1]) is None  # factors that do not multiply
    assert lora_pairs(["m.lora_A.weight", "m.lora_B.weight", "m.lora_magnitude_vector.weight"]) == [
        ("m.lora_A.weight", "m.lora_B.weight")
    ]


def test_fedavg_logs_the_error_each_round_and_secagg_does_not(task_identity):
    from flwr.app import Message, MessageType, MetricRecord, RecordDict

    from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
    from fedllm_flwr.transport import pack

    def reply(node, state):
        content = pack({k: torch.from_numpy(v) for k, v in state.items()})
        content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 1.0})
        return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))

    one, two = module([[1, 0]], [[1], [0]]), module([[0, 1]], [[0], [1]])
    strategy = AdapterFedAvg()
    strategy._expected = [(k, v.shape) for k, v in one.items()]
    strategy.aggregate_train(1, [reply(1, one), reply(2, two)])
    assert strategy.ledger.pop(1)["lora-aggregation-error"] == pytest.approx(math.sqrt(0.5))
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.privacy.runner import private_strategy

    assert private_strategy(load_cfg(["privacy=secagg"])).sees_clients is False
    strategy.sees_clients = False  # SecAgg+: the server holds one sum, no client's product
    strategy.aggregate_train(2, [reply(1, one), reply(2, two)])
    assert "lora-aggregation-error" not in strategy.ledger.pop(2)


def test_the_factored_gap_equals_the_dense_one_for_factors_of_unequal_ranks():
    rng = np.random.default_rng(3)
    out_features, in_features, ranks, p = 7, 11, [1, 3, 2], np.array([0.5, 0.2, 0.3])
    a = [rng.normal(size=(r, in_features)) for r in ranks]
    b = [rng.normal(size=(out_features, r)) for r in ranks]
    meant = sum(pk * bk @ ak for pk, ak, bk in zip(p, a, b, strict=True))
    # The whole metric, clients of unequal ranks: the mean of the factors zero-padded to rank 3.
    states = [module(ak, bk) for ak, bk in zip(a, b, strict=True)]
    a_avg = sum(pk * np.pad(ak, ((0, 3 - ak.shape[0]), (0, 0))) for pk, ak in zip(p, a, strict=True))
    b_avg = sum(pk * np.pad(bk, ((0, 0), (0, 3 - bk.shape[1]))) for pk, bk in zip(p, b, strict=True))
    dense = np.linalg.norm(meant - b_avg @ a_avg) / np.linalg.norm(meant)
    assert aggregation_error(states, list(p * 10)) == pytest.approx(dense, rel=1e-5)  # fp32 states

    from fedllm_flwr.strategy.lora_products import product_gap, product_norms

    a_got, b_got = rng.normal(size=(4, in_features)), rng.normal(size=(out_features, 4))
    lost, total = product_gap(a, b, p, a_got, b_got)
    assert lost == pytest.approx(np.square(meant - b_got @ a_got).sum(), rel=1e-10)
    assert total == pytest.approx(np.square(meant).sum(), rel=1e-10)
    np.testing.assert_allclose(product_norms(a, b), [np.linalg.norm(bk @ ak) for ak, bk in zip(a, b, strict=True)])


def test_the_error_is_computed_without_an_out_by_in_matrix():
    """At 1,500 x 1,500 a product B A of one client takes 9 MB in fp32 (18 MB in fp64):
    the metric of three rank-4 clients must stay far below one such matrix. NumPy
    reports its allocations to tracemalloc, so the peak counts every array it made."""
    import tracemalloc

    rng = np.random.default_rng(0)
    size, rank = 1500, 4
    states = [module(rng.normal(size=(rank, size)), rng.normal(size=(size, rank))) for _ in range(3)]
    tracemalloc.start()
    try:
        value = aggregation_error(states, [1.0, 2.0, 3.0])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert value is not None and 0 < value < 1
    assert peak < size * size * 4 / 4, f"peak {peak / 2**20:.1f} MiB: an out x in matrix was built"
