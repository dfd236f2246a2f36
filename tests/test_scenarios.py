import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.config import load_cfg
from fedllm_flwr.keys import DATA_KEY, MANIFEST_KEY, STEPS_KEY
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.registry import build_strategy
from fedllm_flwr.strategy.scenarios import GlobalFedAvg, LocalAdapters
from fedllm_flwr.transport import pack, state_to_arrays, unpack_state


@pytest.fixture(autouse=True)
def _messages(task_identity):
    pass


class FakeGrid:
    def get_node_ids(self):
        return [11, 12, 13]


def state(value: float) -> dict[str, torch.Tensor]:
    return {"a.lora_A.weight": torch.full((2, 3), value)}


def reply(node: int, st: dict, partition: int) -> Message:
    content = pack(st)
    content["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 1.0, "partition-id": partition})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


@pytest.mark.parametrize("scenario, kind", [("fed", AdapterFedAvg), ("global", GlobalFedAvg), ("local", LocalAdapters)])
def test_scenario_config_picks_the_strategy(scenario, kind):
    assert type(build_strategy(load_cfg([f"scenario={scenario}"]))) is kind


def test_global_sends_one_node_all_data_and_all_steps():
    strat = GlobalFedAvg(local_steps=10, min_train_nodes=3, min_available_nodes=3)
    messages = list(strat.configure_train(1, state_to_arrays(state(0.0)), ConfigRecord(), FakeGrid()))
    assert len(messages) == 1
    config = messages[0].content["config"]
    assert config[DATA_KEY] == "all" and config[STEPS_KEY] == 30  # 3 fed clients x 10 steps
    assert strat.ledger.pop(1)["clients-sampled"] == 1


def test_local_keeps_and_returns_each_nodes_own_adapter():
    strat = LocalAdapters(min_train_nodes=3, min_available_nodes=3)
    initial = state_to_arrays(state(0.0))
    first = list(strat.configure_train(1, initial, ConfigRecord(), FakeGrid()))
    assert all(np.allclose(unpack_state(m.content)["a.lora_A.weight"], 0.0) for m in first)
    arrays, metrics = strat.aggregate_train(
        1, [reply(11, state(1.0), 0), reply(12, state(2.0), 1), reply(13, state(3.0), 2)]
    )
    assert arrays is None and metrics is not None  # nothing is averaged
    assert "partition-id" not in metrics
    assert {pid: float(a["a.lora_A.weight"].numpy()[0, 0]) for pid, a in strat.client_adapters().items()} == {
        0: 1.0, 1: 2.0, 2: 3.0,
    }  # fmt: skip
    second = list(strat.configure_train(2, initial, ConfigRecord(), FakeGrid()))
    sent = {m.metadata.dst_node_id: float(unpack_state(m.content)["a.lora_A.weight"][0, 0]) for m in second}
    assert sent == {11: 1.0, 12: 2.0, 13: 3.0}
    assert len({id(m.content) for m in second}) == 3 and all(MANIFEST_KEY in m.content for m in second)
