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

    from fedllm_flwr.strategy import AdapterFedAvg
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
