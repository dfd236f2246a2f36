import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.keys import MANIFEST_KEY
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.replies import aggregate_client_metrics, weighted_mean
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.transport import pack, state_to_arrays


@pytest.fixture(autouse=True)
def _messages(task_identity):
    pass


def state(value: float) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((2, 3), value), "a.lora_B.weight": torch.full((3, 2), 2 * value)}


def reply(node: int, content: RecordDict | Error) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(content, reply_to=sent)


def train_reply(node: int, st: dict, n: int, loss: float) -> Message:
    content = pack(st)
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": loss, "tokens": 10, "seconds": float(node)})
    return reply(node, content)


def strategy_for(global_state: dict, setup: RoundSetup | None = None) -> AdapterFedAvg:
    strat = AdapterFedAvg(train_metrics_aggr_fn=aggregate_client_metrics, setup=setup)
    strat._expected = [(k, tuple(v.shape)) for k, v in global_state.items()]
    return strat


def test_weighted_mean_matches_hand_computation():
    out = weighted_mean([{"w": np.array([1.0, 2.0])}, {"w": np.array([4.0, 8.0])}], [1, 3])
    np.testing.assert_allclose(out["w"], [(1 * 1 + 3 * 4) / 4, (1 * 2 + 3 * 8) / 4])
    assert out["w"].dtype == np.float32


def test_aggregate_is_fp32_weighted_by_num_examples():
    strat = strategy_for(state(0.0))
    replies = [train_reply(1, state(1.0), 10, 2.0), train_reply(2, state(0.5), 30, 1.0)]
    arrays, metrics = strat.aggregate_train(1, replies)
    expected = (10 * 1.0 + 30 * 0.5) / 40  # 0.625, exact in fp16 inputs
    a = arrays["a.lora_A.weight"].numpy()
    assert a.dtype == np.float32 and np.allclose(a, expected)
    assert np.allclose(arrays["a.lora_B.weight"].numpy(), 2 * expected)
    assert metrics["train-loss"] == pytest.approx((10 * 2.0 + 30 * 1.0) / 40)
    assert metrics["tokens"] == 20 and metrics["num-examples"] == 40 and metrics["seconds"] == 2.0
    ledger = strat.ledger.pop(1)
    assert ledger["clients-ok"] == 2 and ledger["clients-failed"] == 0
    assert ledger["bytes-up"] > 2 * 2 * 12  # two replies of 12 fp16 values each, plus framing


def test_invalid_and_failed_replies_are_dropped_and_counted():
    strat = strategy_for(state(0.0))
    nan_state = state(1.0)
    nan_state["a.lora_A.weight"][0, 0] = float("nan")
    wrong_key = {"b.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    wrong_shape = {"a.lora_A.weight": torch.zeros(3, 2), "a.lora_B.weight": torch.zeros(3, 2)}
    replies = [
        train_reply(1, state(1.0), 10, 1.0),
        train_reply(2, nan_state, 10, 1.0),
        train_reply(3, wrong_key, 10, 1.0),
        train_reply(4, wrong_shape, 10, 1.0),
        train_reply(5, state(9.0), 0, 1.0),  # zero weight
        reply(6, Error(code=0, reason="client crashed")),
    ]
    arrays, _ = strat.aggregate_train(3, replies)
    assert np.allclose(arrays["a.lora_A.weight"].numpy(), 1.0)  # only the valid reply
    ledger = strat.ledger.pop(3)
    assert ledger["clients-ok"] == 1 and ledger["clients-failed"] == 5 and ledger["clients-dropped"] == 4


def test_a_node_that_left_mid_round_is_counted_failed_once():
    strat = strategy_for(state(0.0))
    strat.sampled[3] = {1, 2, 7}
    # Node 7 died: the SuperLink answers for it with an error reply of its own (node 0).
    lost = reply(0, Error(code=0, reason="Node Unavailable"))
    arrays, _ = strat.aggregate_train(
        3, [train_reply(1, state(1.0), 10, 2.0), train_reply(2, state(1.0), 10, 2.0), lost]
    )
    assert arrays is not None
    ledger = strat.ledger.pop(3)
    assert ledger["clients-ok"] == 2 and ledger["clients-failed"] == 1 and ledger["failed-nodes"] == "7"
    strat.sampled[4] = {1, 2}  # node 2 never answered at all (the round timed out)
    strat.aggregate_train(4, [train_reply(1, state(1.0), 10, 2.0)])
    ledger = strat.ledger.pop(4)
    assert ledger["clients-failed"] == 1 and ledger["failed-nodes"] == "2"


def test_no_valid_reply_means_no_update():
    strat = strategy_for(state(0.0))
    assert strat.aggregate_train(1, [reply(1, Error(code=0, reason="x"))]) == (None, None)


class FakeGrid:
    def get_node_ids(self):
        return [11, 12]


def test_outgoing_messages_carry_only_the_packed_fp16_adapter():
    strat = AdapterFedAvg()
    glob = state_to_arrays(state(0.25))
    messages = list(strat.configure_train(1, glob, ConfigRecord(), FakeGrid()))
    assert len(messages) == 2
    content = messages[0].content
    assert set(content.array_records) == {"arrays"} and list(content["arrays"]) == ["adapter"]
    assert content["arrays"]["adapter"].dtype == "float16"
    assert list(content[MANIFEST_KEY]["names"]) == list(glob)
    assert isinstance(glob, ArrayRecord) and glob["a.lora_A.weight"].dtype == "float32"  # server copy untouched
    assert strat.ledger.pop(1)["bytes-down"] > 0


@pytest.mark.parametrize(
    ("every", "offset", "asked"), [(1, 0, [1, 2, 3, 4, 5]), (2, 0, [2, 4, 5]), (3, 1, [3, 5]), (0, 0, [])]
)
def test_clients_evaluate_on_the_rounds_the_server_does(every, offset, asked):
    """eval.every schedules the clients' held-out scoring too: after every N rounds and
    the last (a resumed run counts from its first round), never with 0."""
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.strategy.registry import build_strategy
    from fedllm_flwr.strategy.round_setup import RoundSetup

    strat = build_strategy(load_cfg(["num_rounds=5", f"eval.every={every}"]), setup=RoundSetup(round_offset=offset))
    glob = state_to_arrays(state(0.25))
    sent = {
        r + offset: len(list(strat.configure_evaluate(r, glob, ConfigRecord(), FakeGrid())))
        for r in range(1, 6 - offset)
    }
    assert [r for r, n in sent.items() if n] == asked
    assert all(n == 2 for n in sent.values() if n)  # each due round asks every node


@pytest.mark.parametrize(
    "bad",
    [
        {"num-examples": float("nan")},
        {"num-examples": float("inf")},
        {"num-examples": -5},
        {"num-examples": 2.5},  # not a count
        {"train-loss": float("nan")},
        {"train-loss": float("-inf")},
        {"lr": float("nan")},
    ],
)
def test_a_reply_with_a_non_finite_or_impossible_number_is_dropped(bad):
    strat = strategy_for(state(0.0))
    poisoned = train_reply(2, state(5.0), 10, 1.0)
    metrics = dict(poisoned.content["metrics"].items()) | bad
    poisoned.content["metrics"] = MetricRecord(metrics)
    arrays, metrics = strat.aggregate_train(1, [train_reply(1, state(1.0), 10, 2.0), poisoned])
    assert np.allclose(arrays["a.lora_A.weight"].numpy(), 1.0)  # finite, and only the sound reply
    assert metrics["train-loss"] == pytest.approx(2.0) and metrics["num-examples"] == 10
    ledger = strat.ledger.pop(1)
    assert ledger["clients-ok"] == 1 and ledger["clients-dropped"] == 1 and ledger["failed-nodes"] == "2"


def test_a_claim_beyond_the_nodes_partition_size_is_dropped():
    strat = strategy_for(state(0.0), RoundSetup(max_examples={1: 10, 2: 30}))
    replies = [train_reply(1, state(1.0), 10, 2.0), train_reply(2, state(3.0), 31, 1.0)]
    arrays, _ = strat.aggregate_train(1, replies)
    assert np.allclose(arrays["a.lora_A.weight"].numpy(), 1.0)
    assert strat.ledger.pop(1)["clients-dropped"] == 1


def metric_rows(*rows: dict) -> list[RecordDict]:
    return [RecordDict({"metrics": MetricRecord(row)}) for row in rows]


def test_a_metric_some_clients_report_is_weighted_over_those_that_do():
    rows = metric_rows(
        {"num-examples": 10, "train-loss": 1.0},
        {"num-examples": 30, "train-loss": 2.0},
        {"num-examples": 60, "train-loss": 3.0, "accuracy": 0.9, "tokens": 7},
    )
    out = aggregate_client_metrics(rows, "num-examples")
    assert out["accuracy"] == pytest.approx(0.9)  # only the third client has it
    assert out["tokens"] == 7  # keys come from every row, not the first one's
    assert out["train-loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 3) / 100)


def eval_reply(node: int, metrics: dict) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.EVALUATE)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=sent)


def test_evaluation_ignores_a_client_with_nothing_to_evaluate_and_drops_nan():
    strat = strategy_for(state(0.0))
    replies = [
        eval_reply(1, {"eval-loss": 2.0, "num-examples": 4, "partition-id": 0}),
        eval_reply(2, {"num-examples": 0, "partition-id": 1}),  # an empty held-out split
        eval_reply(3, {"eval-loss": float("nan"), "num-examples": 4, "partition-id": 2}),
    ]
    metrics = strat.aggregate_evaluate(1, replies)
    assert metrics["eval-loss"] == pytest.approx(2.0) and metrics["num-examples"] == 4
    ledger = strat.ledger.pop(1)
    assert ledger["eval-dropped"] == 1 and "client_2-held-out-loss" not in ledger
