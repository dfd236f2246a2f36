"""What a client sends back: sound numbers only."""

import math

from fedllm_flwr.client import local_evaluate, local_train


def test_a_client_with_an_empty_held_out_split_says_so_instead_of_sending_nan(tiny_cfg):
    cfg = tiny_cfg("dataset.partition.holdout_fraction=0")
    state, _ = local_train(cfg, {}, 1, 0, 2)
    metrics = local_evaluate(cfg, state, 0, 2)
    assert metrics["num-examples"] == 0 and metrics["partition-id"] == 0
    assert not any(key.startswith("eval-") for key in metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values())
