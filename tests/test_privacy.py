"""Privacy: differential privacy (clipping, noise, budget) and secure aggregation (SecAgg+)."""

import math
import random

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.compression import Codec
from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.privacy.dp import PrivacyBudget, clip_update, update_norm
from fedllm_flwr.privacy.dp_server import AccountedClientSideDP
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.transport import pack, state_to_arrays, update_between

FP16 = Codec("fp16")


@pytest.fixture(autouse=True)
def _messages(task_identity):
    pass


def clipped_reply(trained, base, codec, clip):
    """A client's reply under privacy=dp: its update, clipped to `clip` (None: as it is,
    as a client that does not clip would send it), packed relative."""
    update = update_between(trained, base)
    if clip is not None:
        update, _ = clip_update(update, clip)
    return pack(update, codec, relative=True)


def global_arrays():
    """The global adapter the DP tests start a round from, as the server holds it."""
    return state_to_arrays({k: torch.from_numpy(v) for k, v in adapter(seed=9).items()})


def adapter(seed=0, scale=0.02, size=4000):
    rng = np.random.default_rng(seed)
    return {f"layers.{i}.lora_{ab}.weight": (rng.standard_normal(size // 4) * scale).astype(np.float32)
            for i in range(2) for ab in "AB"}  # fmt: skip


def test_clipping_bounds_the_norm_and_leaves_small_updates_alone():
    update = adapter(scale=1.0)
    clipped, norm = clip_update(update, 0.5)
    assert norm > 0.5 and update_norm(clipped) <= 0.5
    direction = np.concatenate(list(clipped.values())) / np.concatenate(list(update.values()))
    assert np.allclose(direction, direction[0])  # scaled, not reshaped
    small = adapter(scale=1e-4)
    same, _ = clip_update(small, 0.5)
    assert same is small


def test_the_budget_grows_with_rounds_and_shrinks_with_noise_and_sampling():
    def eps(z, q, rounds):
        budget = PrivacyBudget(z, 1e-5)
        for _ in range(rounds):
            budget.step(q)
        return budget.epsilon()

    assert eps(1.0, 1.0, 0) == 0.0 and math.isinf(eps(0.0, 1.0, 1))
    assert eps(1.0, 1.0, 1) < eps(1.0, 1.0, 3) < eps(1.0, 1.0, 10)
    assert eps(2.0, 1.0, 3) < eps(1.0, 1.0, 3)
    assert eps(1.0, 0.5, 3) < eps(1.0, 1.0, 3)


def train_reply(node: int, content: RecordDict, n: int = 10) -> Message:
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0})
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=sent)


class NodesGrid:
    """Connected nodes a test sets (and changes between rounds): all the grid FedAvg's sampling reads."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def dp_strategy(noise=1.0, clip=0.1, clients=3):
    """The DP wrapper around AdapterFedAvg after configuring round 1 on `clients` nodes, all sampled."""
    inner = AdapterFedAvg(min_available_nodes=1, min_train_nodes=1, clip_norm=clip)
    runner = AccountedClientSideDP(inner, noise, clip, 1e-5)
    runner.configure_train(1, global_arrays(), ConfigRecord(), NodesGrid(range(1, clients + 1)))
    return runner, inner


def test_the_server_never_averages_an_update_above_the_clipping_norm():
    runner, inner = dp_strategy(noise=0.0, clip=0.1)
    inner.up = Codec(
        "fp32"
    )  # fp16 rounding could lift a clipped norm a hair above the bound (the server clips that too)
    base = {k: torch.from_numpy(v) for k, v in inner.sent[1].items()}
    replies = []
    for node, scale in ((1, 0.001), (2, 0.05), (3, 0.5)):
        trained = {k: v + scale * torch.randn_like(v) for k, v in base.items()}
        clip = 0.1 if node != 3 else None  # node 3 ignores the norm it was sent
        replies.append(train_reply(node, clipped_reply(trained, base, inner.up, clip), n=10 * node))
    arrays, _ = runner.aggregate_train(1, replies)
    row = inner.ledger.pop(1)
    assert row["update-norm-max"] <= 0.1 and row["updates-reclipped"] == 1 and row["clients-ok"] == 3
    mean = {k: arrays[k].numpy() - inner.sent[1][k] for k in arrays}
    assert update_norm(mean) <= 0.1  # equal weights: each clipped update counts 1/3, whatever num-examples says
    assert row["epsilon"] is not None and math.isinf(row["epsilon"])  # no noise, no privacy


def test_the_noise_on_the_mean_has_the_configured_spread_and_the_budget_is_logged():
    runner, inner = dp_strategy(noise=2.0, clip=0.1, clients=3)
    base = {k: torch.from_numpy(v) for k, v in inner.sent[1].items()}
    replies = [train_reply(n, clipped_reply(base, base, FP16, 0.1)) for n in (1, 2, 3)]  # zero updates
    arrays, _ = runner.aggregate_train(1, replies)
    noise = np.concatenate([arrays[k].numpy() - inner.sent[1][k] for k in arrays])
    assert noise.std() == pytest.approx(2.0 * 0.1 / 3, rel=0.1)
    row = inner.ledger.pop(1)
    assert 0 < row["epsilon"] < math.inf and row["delta"] == 1e-5 and row["noise-std"] == pytest.approx(0.2 / 3)


def test_a_failed_client_skips_the_round_as_flowers_dp_wrapper_does():
    from flwr.app import Error

    runner, inner = dp_strategy(clients=2)
    base = {k: torch.from_numpy(v) for k, v in inner.sent[1].items()}
    failed = Message(
        Error(code=0, reason="gone"), reply_to=Message(RecordDict(), dst_node_id=2, message_type=MessageType.TRAIN)
    )
    arrays, _ = runner.aggregate_train(1, [train_reply(1, clipped_reply(base, base, FP16, 0.1)), failed])
    assert arrays is None and runner.budget.rounds == 0  # nothing released, nothing spent


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy=dp", "scenario=local"], "aggregates nothing"),
        (["privacy=dp", "strategy=median"], "privacy=dp cannot be combined with strategy=median"),
        (["privacy=dp", "strategy=fedadam"], "sensitivity"),
        (["privacy=secagg", "compression=topk"], "masked integer vectors"),
        (["privacy=dp", "strategy.availability=per_client", "strategy.available_per_client=[1.0,0.5]"], "uniformly"),
    ],
)
def test_unsound_combinations_are_refused(tiny_model_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES, *overrides])


def test_dp_composes_with_compression():
    cfg = load_cfg(["privacy=dp", "compression=int8"])
    assert cfg.privacy.name == "dp" and cfg.compression.up == "int8"


# -- secure aggregation -------------------------------------------------------------------


class LocalGrid:
    """The ClientApp (with its SecAgg+ mod) in this process, one Context per node;
    `drop` makes (stage, node) pairs fail, as a node leaving mid-protocol would."""

    def __init__(self, overrides: str, nodes: int, drop=()):
        from flwr.app import Context

        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": nodes},
                             state=RecordDict(), run_config={"overrides": overrides})
            for i in range(nodes)
        }  # fmt: skip
        self.drop, self.seen = set(drop), []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Error
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        import client_app

        out = []
        for message in messages:
            message = own_copy(message)
            node = message.metadata.dst_node_id
            stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get("stage", "")
            if (stage, node) in self.drop:
                out.append(Message(Error(code=0, reason="left"), reply_to=message))
                continue
            reply = client_app.app(message, self.contexts[node])
            self.seen.append((stage, reply.content))
            out.append(reply)
        return out


def own_copy(message: Message) -> Message:
    """What a node receives over the wire: its own records (the SecAgg+ mod pops keys off the config)."""
    from flwr.app import ConfigRecord

    content = RecordDict(dict(message.content.items()))
    for key, record in message.content.config_records.items():
        content[key] = ConfigRecord(dict(record.items()))
    m = message.metadata
    return Message(content, dst_node_id=m.dst_node_id, message_type=m.message_type, group_id=m.group_id)


def secure_round(tiny_model_dir, drop=(), max_weight=100):
    """One SecAgg+ round on 3 tiny clients, and the plain weighted mean of the same updates."""
    from fedllm_flwr.client import local_train
    from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
    from fedllm_flwr.privacy.runner import private_strategy
    from fedllm_flwr.privacy.secagg import SecAggGrid
    from fedllm_flwr.transport import state_to_arrays

    clear_model_cache()
    overrides = [f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "privacy=secagg", f"privacy.max_weight={max_weight}",
                 "strategy.min_available_nodes=3", "strategy.min_train_nodes=3", "peft.dropout=0.0"]  # fmt: skip
    cfg = load_cfg(overrides)
    start = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    strategy = private_strategy(cfg)
    grid = LocalGrid(" ".join(overrides), 3, drop)
    arrays = state_to_arrays(start)
    from flwr.app import ConfigRecord

    messages = strategy.configure_train(1, arrays, ConfigRecord({"num-rounds": 1}), grid)
    replies = SecAggGrid(grid, strategy).send_and_receive(messages)
    new, _ = strategy.aggregate_train(1, replies)
    received = {k: torch.from_numpy(v) for k, v in next(iter(strategy.sent.values())).items()}
    kept = [i for i in range(3) if ("collect_masked_vectors", 100 + i) not in set(drop)]
    updates, weights = [], []
    for pid in kept:
        state, metrics = local_train(cfg, received, 1, pid, 3)
        updates.append({k: (state[k] - received[k]).numpy() for k in received})
        weights.append(metrics["num-examples"])
    plain = {
        k: received[k].numpy() + sum(w * u[k] for w, u in zip(weights, updates, strict=True)) / sum(weights)
        for k in received
    }
    return strategy, grid, new, plain


def test_secure_aggregation_gives_the_plain_weighted_mean_within_its_quantization(tiny_model_dir):
    strategy, grid, new, plain = secure_round(tiny_model_dir)
    # 3 clients x half a step of 16 / 2**22, over the sum of their weights / max_weight (~1.1 here)
    assert max(float(np.abs(new[k].numpy() - plain[k]).max()) for k in plain) < 2e-5
    assert any(float(np.abs(new[k].numpy() - plain[k]).max()) > 0 for k in plain)  # it did quantize
    row = strategy.ledger.pop(1)
    assert row["clients-ok"] == 3 and row["clients-failed"] == 0 and row["bytes-up"] > 0
    # What left a client in the masked stage carries no adapter arrays, only the masked vector.
    masked = [content for stage, content in grid.seen if stage == "collect_masked_vectors"]
    assert len(masked) == 3 and all(len(a) == 0 for c in masked for a in c.array_records.values())


def test_secure_aggregation_survives_a_client_leaving_mid_protocol(tiny_model_dir):
    strategy, grid, new, plain = secure_round(tiny_model_dir, drop=[("collect_masked_vectors", 102)])
    assert max(float(np.abs(new[k].numpy() - plain[k]).max()) for k in plain) < 2e-5  # the mean of the two left
    row = strategy.ledger.pop(1)
    assert row["clients-ok"] == 2 and row["clients-failed"] == 1 and row["failed-nodes"] == "102"


def test_a_round_with_a_dropped_reply_releases_a_mean_whose_sensitivity_matches_the_noise():
    """3 expected, one reply dropped (NaN): the 2 updates are summed over 3, not averaged over 2,
    so each client still moves the released mean by at most C / 3, what the noise is sized for."""
    runner, inner = dp_strategy(noise=0.0, clip=0.1, clients=3)
    inner.up = Codec("fp32")
    base = {k: torch.from_numpy(v) for k, v in inner.sent[1].items()}
    updates = {n: {k: 0.05 * torch.randn_like(v) for k, v in base.items()} for n in (1, 2, 3)}
    replies = [train_reply(n, clipped_reply({k: base[k] + u[k] for k in base}, base, inner.up, 0.1))
               for n, u in updates.items()]  # fmt: skip
    replies[2].content["metrics"] = MetricRecord({"num-examples": float("nan"), "train-loss": 1.0})
    arrays, _ = runner.aggregate_train(1, replies)
    assert inner.ledger.pop(1)["clients-dropped"] == 1
    clipped = {n: clip_update({k: v.numpy() for k, v in updates[n].items()}, 0.1)[0] for n in (1, 2)}
    for key in arrays:
        released = arrays[key].numpy() - inner.sent[1][key]
        np.testing.assert_allclose(released, (clipped[1][key] + clipped[2][key]) / 3, atol=1e-6)
    one = {k: arrays[k].numpy() - inner.sent[1][k] - clipped[2][k] / 3 for k in arrays}
    assert update_norm(one) <= 0.1 / 3 + 1e-6  # client 1's whole influence: C / n


def opacus_epsilon(rounds: list[tuple[float, float]], delta: float) -> float:
    """Epsilon by hand from Opacus's RDP analysis: one subsampled Gaussian step per (q, z)."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
    from opacus.accountants.rdp import RDPAccountant

    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = sum(compute_rdp(q=q, noise_multiplier=z, steps=rounds.count((q, z)), orders=alphas) for q, z in set(rounds))
    return get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)[0]


def dp_run(tiny_model_dir, *overrides):
    from fedllm_flwr.privacy.runner import private_runner, private_strategy

    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "privacy=dp", "privacy.noise_multiplier=1.3",
                    *overrides])  # fmt: skip
    return cfg, private_runner(cfg, private_strategy(cfg))


def dp_round(runner, grid, server_round):
    """One round through the DP wrapper: configure it on `grid`, every node sent a message
    answers (a zero update); the round's metrics row."""
    messages = list(runner.configure_train(server_round, global_arrays(), ConfigRecord(), grid))
    zero = {k: np.zeros_like(v) for k, v in adapter().items()}
    replies = [train_reply(m.metadata.dst_node_id, pack(zero, FP16, relative=True)) for m in messages]
    runner.aggregate_train(server_round, replies)
    return messages, runner.inner.ledger.pop(server_round)


def test_noise_and_rate_come_from_flowers_real_sample_not_fraction_train(tiny_model_dir):
    """10 nodes, fraction_train 0.1, min_train_nodes 2: Flower samples max(int(10 * 0.1), 2) = 2,
    so q = 0.2 and the noise is sized for n = 2 (not q = 0.1 and n = 1)."""
    from fedllm_flwr.privacy.runner import privacy_summary

    cfg, runner = dp_run(tiny_model_dir, "strategy.fraction_train=0.1", "strategy.min_train_nodes=2")
    grid = NodesGrid(range(1, 11))
    for server_round in (1, 2, 3):
        messages, row = dp_round(runner, grid, server_round)
        assert len(messages) == 2 and runner.inner.dp_denominator == 2
        assert row["dp-sample-rate"] == pytest.approx(0.2) and row["dp-clients"] == 2
        assert row["noise-std"] == pytest.approx(1.3 * cfg.privacy.clipping_norm / 2)
        assert row["epsilon"] == pytest.approx(opacus_epsilon([(0.2, 1.3)] * server_round, 1e-5), rel=1e-9)
    summary = privacy_summary(cfg, runner)
    assert summary["releases"] == 3 and summary["sample-rates"] == pytest.approx([0.2] * 3)
    assert summary["sampled-clients"] == [2, 2, 2]


def test_a_node_joining_between_rounds_changes_the_rate(tiny_model_dir):
    cfg, runner = dp_run(tiny_model_dir, "strategy.fraction_train=0.5")
    grid = NodesGrid(range(1, 11))
    _, first = dp_round(runner, grid, 1)
    grid.nodes.append(11)  # a late site: Flower samples int(11 * 0.5) = 5 of 11
    messages, second = dp_round(runner, grid, 2)
    assert first["dp-sample-rate"] == pytest.approx(0.5) and second["dp-sample-rate"] == pytest.approx(5 / 11)
    assert len(messages) == second["dp-clients"] == 5
    assert second["epsilon"] == pytest.approx(opacus_epsilon([(0.5, 1.3), (5 / 11, 1.3)], 1e-5), rel=1e-9)


def test_under_uniform_availability_the_rate_is_flowers_times_p_and_the_noise_fits_who_was_sent(tiny_model_dir):
    random.seed(0)
    cfg, runner = dp_run(tiny_model_dir, "strategy.fraction_train=0.5", "strategy.availability=uniform",
                         "strategy.available_p=0.8")  # fmt: skip
    messages, row = dp_round(runner, NodesGrid(range(1, 11)), 1)
    n = len(messages)  # the sampled 5 that were available
    assert 0 < n <= 5 and row["dp-clients"] == n == runner.inner.dp_denominator
    assert row["dp-sample-rate"] == pytest.approx(0.5 * 0.8)
    assert row["noise-std"] == pytest.approx(1.3 * cfg.privacy.clipping_norm / n)
    assert row["epsilon"] == pytest.approx(opacus_epsilon([(0.4, 1.3)], 1e-5), rel=1e-9)


def test_secure_aggregation_refuses_a_weight_above_max_weight(tiny_model_dir):
    """SecAgg+ would cap it and skew the mean: deployment stops at the first round's weights."""
    with pytest.raises(UserError, match="privacy.max_weight=3 is below a client's"):
        secure_round(tiny_model_dir, max_weight=3)


def test_secure_aggregation_refuses_max_weight_below_a_known_partition_before_round_1(tiny_model_dir):
    from fedllm_flwr.privacy.runner import private_strategy

    cfg = load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "privacy=secagg", "privacy.max_weight=3"])
    from fedllm_flwr.strategy.round_setup import RoundSetup

    # simulation: the server knows each partition's size
    strategy = private_strategy(cfg, setup=RoundSetup(max_examples={1: 2, 2: 30}))

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    from flwr.app import ArrayRecord, ConfigRecord

    with pytest.raises(UserError, match="set privacy.max_weight=30 or more"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid())


def test_the_dp_wrapper_refuses_a_strategy_that_does_not_enforce_its_clipping_norm():
    """The strategy gets the clipping norm in its constructor (`private_strategy`); one built
    without it would average unclipped updates under noise sized for clipped ones."""
    with pytest.raises(ValueError, match="clip_norm=None, not the clipping norm 0.1"):
        AccountedClientSideDP(AdapterFedAvg(), 1.0, 0.1, 1e-5)
