"""What a client sends back: sound numbers only."""

import math

import torch

from fedllm_flwr.client import local_evaluate, local_train, training_threads


def test_a_client_with_an_empty_held_out_split_says_so_instead_of_sending_nan(tiny_cfg):
    cfg = tiny_cfg("dataset.partition.holdout_fraction=0")
    state, _ = local_train(cfg, {}, 1, 0, 2)
    metrics = local_evaluate(cfg, state, 0, 2)
    assert metrics["num-examples"] == 0 and metrics["partition-id"] == 0
    assert not any(key.startswith("eval-") for key in metrics)
    assert all(math.isfinite(float(v)) for v in metrics.values())


def test_the_server_knows_each_simulated_partitions_size_and_an_honest_claim_fits(tiny_cfg):
    from fedllm_flwr.data import train_set
    from fedllm_flwr.server.nodes import example_limits
    from fedllm_flwr.strategy.registry import strategy_class

    cfg = tiny_cfg()
    nodes = {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}
    limits = example_limits(cfg, nodes, strategy_class(cfg).holds_all_data)
    for node, pid in ((11, 0), (12, 1)):
        _, metrics = local_train(cfg, {}, 1, pid, 2)
        assert metrics["num-examples"] == limits[node] > 0
    assert limits[11] + limits[12] < len(train_set(cfg))  # the held-out records are not claimable
    glob = tiny_cfg("scenario=global")
    assert set(example_limits(glob, nodes, strategy_class(glob).holds_all_data).values()) == {len(train_set(glob))}


def test_the_one_training_node_of_scenario_global_takes_every_core(tiny_cfg, monkeypatch):
    """A simulation gives each client actor one CPU (OMP_NUM_THREADS=1); under global the
    other nodes wait while one trains, so it trains on every core, and goes back to its
    threads after. Elsewhere torch's default stands."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    before = torch.get_num_threads()
    with training_threads(tiny_cfg("scenario=global")) as n:
        assert n == torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    for cfg in (tiny_cfg("scenario=fed"), tiny_cfg("scenario=local"), tiny_cfg("scenario=global", "train.threads=1")):
        with training_threads(cfg) as n:
            assert n == before  # train.threads, when set, is applied by the client's setup
