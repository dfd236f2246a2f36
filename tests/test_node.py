"""A node driven without Flower's app machinery: records and dicts in, records out."""

import json
import subprocess
import sys

import numpy as np
from conftest import ROOT
from flwr.app import ConfigRecord, RecordDict

from fedllm_flwr import node
from fedllm_flwr.keys import FEEDBACK_KEY, PRIVATE_KEY
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.transport import is_relative, pack, unpack_state


def test_a_node_keeps_its_private_tensors_and_residual_between_messages(tiny_cfg, tiny_model_dir):
    clear_model_cache()
    cfg = tiny_cfg("compression=topk", "personalize.private=[lora_B]")
    full = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    shared = {k: v for k, v in full.items() if "lora_B" not in k}
    overrides = " ".join([f"model.name={tiny_model_dir}", "dataset.synthetic.train_per_task=20", "train.local_steps=2",
                          "train.batch_size=4", "compression=topk", "personalize.private=[lora_B]"])  # fmt: skip
    run_config, node_config = {"overrides": overrides}, {"partition-id": 1, "num-partitions": 2}
    record = RecordDict()  # what Flower keeps as the node's context.state
    kept = []
    for server_round in (1, 2):
        state = node.NodeState.load(record)
        assert (state.private is None) == (server_round == 1)
        content = pack(shared)
        content["config"] = ConfigRecord({"server-round": server_round})
        reply = node.train(content, run_config, node_config, state)
        state.save(record)
        assert is_relative(reply) and set(unpack_state(reply)) == set(shared)  # B stays home
        assert reply["metrics"]["num-examples"] > 0
        private = node.NodeState.load(record).private_state()
        assert set(private) == {k for k in full if "lora_B" in k}
        assert all(float(v.abs().max()) > 0 for v in private.values())  # trained, not the zero init
        kept.append((private, record.array_records[FEEDBACK_KEY]["residual"].numpy().copy()))
    (b1, r1), (b2, r2) = kept
    assert any(not np.array_equal(b1[k].numpy(), b2[k].numpy()) for k in b1)  # round 2 went on from round 1's B
    assert np.abs(r1).max() > 0 and not np.array_equal(r1, r2)
    assert PRIVATE_KEY in record.array_records

    # Evaluation scores the shared adapter completed with this node's own B.
    scores = node.evaluate(pack(shared), run_config, node_config, node.NodeState.load(record))
    assert scores["metrics"]["partition-id"] == 1 and scores["metrics"]["eval-loss"] > 0


def test_a_node_keeps_its_zeroth_order_state_in_its_own_object_and_the_records_it_always_used():
    """`NodeState.zo` is a `ZoState`; what it saves to and loads from Flower's context is
    unchanged (a node's state from before the change still loads)."""
    from flwr.app import Array, ArrayRecord

    from fedllm_flwr.algorithms.zo.state import ZoState
    from fedllm_flwr.keys import ZO_ROUND_KEY, ZO_STATE_KEY

    adapter = ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))})
    record = RecordDict({ZO_STATE_KEY: adapter, ZO_ROUND_KEY: ConfigRecord({"round": 4, "count": 3, "weights": "f"})})
    state = node.NodeState.load(record)
    assert isinstance(state.zo, ZoState) and (state.zo.round, state.zo.count, state.zo.weights) == (4, 3, "f")
    assert np.array_equal(state.zo.adapter["w"].numpy(), np.arange(3))
    again = RecordDict()
    state.save(again)
    assert set(again) == {ZO_STATE_KEY, ZO_ROUND_KEY}
    assert dict(again[ZO_ROUND_KEY]) == {"round": 4, "count": 3, "weights": "f"}
    untouched = RecordDict()
    node.NodeState.load(RecordDict()).save(untouched)  # a node that never ran zeroth-order keeps nothing of it
    assert not set(untouched)


def test_a_node_describes_its_data_without_loading_the_model_stack(tiny_model_dir, tmp_path):
    """A deployed SuperNode answers every message in a fresh process: describing its
    partition must not cost the import of transformers' models and peft, or the model."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from flwr.app import RecordDict
from fedllm_flwr import node
reply = node.query(RecordDict(), {{"overrides": "model.name={tiny_model_dir} dataset.synthetic.train_per_task=20"}},
                   {{"partition-id": 1, "num-partitions": 2}})
heavy = ("transformers.modeling_utils", "peft", "fedllm_flwr.model", "fedllm_flwr.client")
loaded = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({{"info": dict(reply["info"].items()), "loaded": loaded}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["info"]["partition-id"] == 1 and result["info"]["num-partitions"] == 2
    from fedllm_flwr.data.synthetic import TASKS

    assert result["info"]["category"] in TASKS


def test_handle_runs_a_message_with_the_state_in_its_context(tiny_cfg, tiny_model_dir, task_identity):
    """`node.handle` is what the ClientApp runs (in its process or a site worker): it loads and
    saves the node's state in `context.state`, and `started` is the reply's process-start-seconds."""
    import pytest
    from flwr.app import Context, Message, MessageType

    clear_model_cache()
    cfg = tiny_cfg("compression=topk")
    adapter = get_adapter_state(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model)
    overrides = f"model.name={tiny_model_dir} dataset.synthetic.train_per_task=20 train.local_steps=1 compression=topk"
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config={"overrides": overrides})  # fmt: skip
    content = pack(adapter)
    content["config"] = ConfigRecord({"server-round": 1})
    reply = node.handle("train", Message(content, dst_node_id=2, message_type=MessageType.TRAIN), context, started=12.5)
    assert reply["metrics"]["process-start-seconds"] == 12.5 and FEEDBACK_KEY in context.state
    default = node.handle("train", Message(content, dst_node_id=2, message_type=MessageType.TRAIN), context)
    assert default["metrics"]["process-start-seconds"] > 0  # this process's age
    described = node.handle("query", Message(RecordDict(), dst_node_id=2, message_type=MessageType.QUERY), context)
    assert described["info"]["partition-id"] == 0
    kept = set(context.state)
    with pytest.raises(ValueError, match="no node function for message kind 'other'"):
        node.handle("other", Message(RecordDict(), dst_node_id=2, message_type=MessageType.QUERY), context)
    assert set(context.state) == kept
