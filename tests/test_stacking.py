"""Stacking (FLoRA): the merged delta on a model, its export, and the server's
bookkeeping of which node holds which round's stack."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.keys import MERGED_KEY
from fedllm_flwr.lora_merge import module_of, save_merged, set_merged, stacked
from fedllm_flwr.strategy import Stacking
from fedllm_flwr.transport import pack

A, B = "m.layers.0.q_proj.lora_A.default.weight", "m.layers.0.q_proj.lora_B.default.weight"


def _lora_layers(model):
    return [
        name for name, _ in model.named_modules() if name.endswith(("q_proj", "v_proj")) and ".base_layer" not in name
    ]


def test_the_merged_delta_acts_as_merged_weights_and_exports_as_a_peft_adapter(tiny_cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm_flwr.model import build_model, clear_model_cache

    clear_model_cache()
    cfg = tiny_cfg("train.precision=fp32")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    model = bundle.model
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for path in _lora_layers(model):
        layer = model.get_submodule(path)
        factors[path] = (torch.randn(6, layer.in_features, generator=gen) * 0.1,
                         torch.randn(layer.out_features, 6, generator=gen) * 0.1)  # fmt: skip
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        set_merged(model, factors)
        hooked = model(input_ids=ids).logits
        # The same delta merged into copies of the weights, by hand.
        saved = {}
        for path, (a, b) in factors.items():
            base = model.get_submodule(path).base_layer
            saved[path] = base.weight.clone()
            base.weight += model.get_submodule(path).scaling["default"] * (b @ a)
        set_merged(model, None)
        merged = model(input_ids=ids).logits
        for path, weight in saved.items():
            model.get_submodule(path).base_layer.weight.copy_(weight)
        assert torch.equal(model(input_ids=ids).logits, before)  # set_merged(None) took the delta away
    assert not torch.allclose(hooked, before, atol=1e-3)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-5)

    folder = save_merged(model, tmp_path / "final", factors)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)  # the export left no trace
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(folder))
    assert loaded.peft_config["default"].r == 6 and loaded.peft_config["default"].lora_alpha == 16 * 6 / 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged, atol=1e-5, rtol=1e-5)


def test_stacked_factors_multiply_to_the_sum_of_the_rounds():
    gen = torch.Generator().manual_seed(1)
    parts = {t: {A: torch.randn(r, 5, generator=gen), B: torch.randn(4, r, generator=gen)} for t, r in ((2, 3), (1, 2))}
    ((path, (a, b)),) = stacked(parts).items()
    assert path == module_of(A) == "m.layers.0.q_proj" and a.shape == (5, 5) and b.shape == (4, 5)
    torch.testing.assert_close(b @ a, parts[1][B] @ parts[1][A] + parts[2][B] @ parts[2][A])
    torch.testing.assert_close(a[:2], parts[1][A])  # rounds in order


def _reply(node, state, n):
    content = pack({k: torch.from_numpy(v) for k, v in state.items()})
    content["metrics"] = MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node})
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def _round(strategy, arrays, nodes):
    strategy.current = {k: v.numpy() for k, v in arrays.items()}
    strategy._expected = [(k, tuple(v.shape)) for k, v in strategy.current.items()]
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]
    return {m.metadata.dst_node_id: m for m in strategy._wire(arrays, messages, remember=True)}


def test_stacking_is_exact_restarts_from_the_initial_adapter_and_catches_nodes_up(task_identity):
    rng = np.random.default_rng(0)
    start = {A: rng.normal(size=(2, 5)).astype(np.float32), B: np.zeros((4, 2), np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy = Stacking()
    strategy.ranks = {1: 1, 2: 2, 3: 2}
    sent = _round(strategy, arrays, [1, 2])
    assert MERGED_KEY not in sent[1].content  # nothing merged yet
    one = {A: rng.normal(size=(1, 5)).astype(np.float32), B: rng.normal(size=(4, 1)).astype(np.float32)}
    two = {A: rng.normal(size=(2, 5)).astype(np.float32), B: rng.normal(size=(4, 2)).astype(np.float32)}
    new, _ = strategy.aggregate_train(1, [_reply(1, one, 10), _reply(2, two, 30)])
    # The next round starts from the initial adapter again.
    np.testing.assert_array_equal(new[A].numpy(), start[A])
    np.testing.assert_array_equal(new[B].numpy(), 0)
    row = strategy.ledger.pop(1)
    assert row["lora-aggregation-error"] == 0.0 and row["merged-rank"] == 3
    stack = strategy.stacks[1]
    meant = 0.25 * one[B] @ one[A] + 0.75 * two[B] @ two[A]
    np.testing.assert_allclose(stack[B].astype(np.float64) @ stack[A], meant, rtol=2e-3, atol=2e-3)  # fp16 wire
    assert stack[A].dtype == np.float16  # as the nodes decode it: the server's copy is theirs

    # Round 2: nodes 1 and 2 get round 1's stack; node 3 (new) too.
    sent = _round(strategy, new, [1, 3])
    for node in (1, 3):
        carried = sent[node].content[MERGED_KEY]
        assert sorted(carried) == [f"1/{A}", f"1/{B}"]
    strategy.aggregate_train(2, [_reply(1, one, 10)])  # node 3 never answers
    assert strategy.catch_up.known == {1: 1, 2: 0}  # node 2 was not asked this round; node 3 never answered
    sent = _round(strategy, new, [1, 3])
    assert sorted(sent[1].content[MERGED_KEY]) == [f"2/{A}", f"2/{B}"]  # only what node 1 lacks
    assert sorted(sent[3].content[MERGED_KEY]) == sorted(f"{t}/{k}" for t in (1, 2) for k in (A, B))

    # A checkpoint restores every stack; a restarted run sends each node all of them.
    restored = Stacking()
    restored.load_state(strategy.state())
    assert restored.stacks.keys() == strategy.stacks.keys() and restored.catch_up.known == {}
    np.testing.assert_array_equal(restored.stacks[2][B], strategy.stacks[2][B])


def test_a_node_keeps_every_rounds_stack_and_a_resent_round_counts_once():
    from fedllm_flwr.node import NodeState

    node = NodeState()
    one = ArrayRecord({f"1/{A}": Array(np.ones((1, 3), np.float16)), f"1/{B}": Array(np.ones((2, 1), np.float16))})
    two = ArrayRecord({f"2/{A}": Array(np.ones((2, 3), np.float16)), f"2/{B}": Array(np.ones((2, 2), np.float16))})
    assert node.merge(RecordDict()) is None
    node.merge(RecordDict({MERGED_KEY: one}))
    node.merge(RecordDict({MERGED_KEY: one}))  # sent again after a lost reply
    factors = node.merge(RecordDict({MERGED_KEY: two}))
    a, b = factors["m.layers.0.q_proj"]
    assert a.shape == (3, 3) and b.shape == (2, 3) and a.dtype == torch.float32
    state = RecordDict()
    node.save(state)
    assert len(NodeState.load(state).merged) == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=stacking", "peft=dora"], "strategy=stacking merges the clients' B A under a fresh adapter"),
        (["strategy=stacking", "personalize.ft_steps=2"], "strategy=stacking exports the merged delta"),
    ],
)
def test_what_stacking_cannot_serve_is_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_cfg(overrides)


def test_what_an_evaluation_message_brings_is_kept_and_a_node_that_lost_a_round_refuses(
    tiny_cfg, tiny_model_dir, task_identity
):
    """Stacking sends round t's stack with the next message, usually an evaluation: the
    ClientApp must keep it, or the node trains round t+1 without it."""
    from flwr.app import ConfigRecord, Context, Message, MessageType

    import client_app
    from fedllm_flwr.model import build_model, get_adapter_state

    cfg = tiny_cfg("strategy=stacking")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    initial = get_adapter_state(bundle.model)
    a_key = next(k for k in initial if ".lora_A." in k)
    b_key = a_key.replace("lora_A", "lora_B")
    stack = {
        f"1/{a_key}": Array(np.ones((2, initial[a_key].shape[1]), np.float16)),
        f"1/{b_key}": Array(np.zeros((initial[b_key].shape[0], 2), np.float16)),
    }
    overrides = [f"model.name={tiny_model_dir}", "strategy=stacking", "dataset.synthetic.train_per_task=20",
                 "dataset.synthetic.test_per_task=4"]  # fmt: skip
    run_config = {"overrides": " ".join(overrides)}
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config=run_config)  # fmt: skip
    content = pack(initial)
    content["config"] = ConfigRecord({"rounds-held": 1})
    content[MERGED_KEY] = ArrayRecord(stack)
    reply = client_app.evaluate(Message(content, dst_node_id=7, message_type=MessageType.EVALUATE), context)
    assert not reply.has_error()
    assert sorted(context.state[MERGED_KEY]) == sorted(stack)  # kept for the next message

    content = pack(initial)
    content["config"] = ConfigRecord({"rounds-held": 2})  # round 2's stack never arrived
    from fedllm_flwr import node

    with pytest.raises(ValueError, match="this node holds 1 rounds' stacks and the global model 2"):
        node.evaluate(content, run_config, context.node_config, node.NodeState.load(context.state))


def test_the_merged_factors_are_put_on_the_layer_once_and_no_forward_moves_them(monkeypatch):
    """A forward hook that copies its factors to the input's device pays a host-to-device
    copy in every forward of every LoRA layer: they belong on the layer's device, once."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.q_proj(x)

    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    path = "base_model.model.q_proj"
    layer = model.get_submodule(path)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6, generator=gen), torch.randn(4, 3, generator=gen)
    set_merged(model, {path: (a, b)})
    moved = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        if "device" in kwargs or any(isinstance(arg, torch.device | str) for arg in args):
            moved.append(tuple(self.shape))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    x = torch.randn(2, 6, generator=gen)
    with torch.no_grad():
        out = layer(x)
        expected = layer.base_layer(x) + 2.0 * (x @ a.T) @ b.T  # the fresh adapter's B is 0; scaling 4 / 2
    assert moved == []
    torch.testing.assert_close(out, expected)
