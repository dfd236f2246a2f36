"""Stacking (FLoRA): the merged delta on a model, its export, and the server's
bookkeeping of which node holds which round's stack."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedllm_flwr.config import load_cfg
from fedllm_flwr.errors import UserError
from fedllm_flwr.keys import MERGED_KEY
from fedllm_flwr.lora_merge import save_merged, set_merged, stacked
from fedllm_flwr.lora_stacks import module_of, stack_part
from fedllm_flwr.strategy.stacking import Stacking
from fedllm_flwr.transport import pack

A, B = "m.layers.0.q_proj.lora_A.default.weight", "m.layers.0.q_proj.lora_B.default.weight"
M = "m.layers.0.q_proj"


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
    for path in _lora_layers(model):  # compacted modules hold fewer ranks than the others
        layer, rank = model.get_submodule(path), 4 if path.endswith("v_proj") else 6
        factors[path] = (torch.randn(rank, layer.in_features, generator=gen) * 0.1,
                         torch.randn(layer.out_features, rank, generator=gen) * 0.1)  # fmt: skip
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
    for path in _lora_layers(loaded):  # each module at its own rank, alpha / r as trained
        layer = loaded.get_submodule(path)
        assert layer.r["default"] == (4 if path.endswith("v_proj") else 6) and layer.scaling["default"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged, atol=1e-5, rtol=1e-5)


def test_stacked_factors_multiply_to_the_sum_of_the_rounds():
    rng = np.random.default_rng(1)
    rounds = {
        t: (rng.normal(size=(r, 5)), rng.normal(size=(4, r)) * 1e-3, rng.dirichlet(np.ones(r)))
        for t, r in ((2, 3), (1, 2))
    }
    parts = {t: stack_part(module_of(A), list(a[:, None]), list(b.T[:, :, None]), p, np.float32)
             for t, (a, b, p) in rounds.items()}  # fmt: skip
    ((path, (a, b)),) = stacked(parts).items()
    assert path == module_of(A) == "m.layers.0.q_proj" and a.shape == (5, 5) and b.shape == (4, 5)
    meant = sum((b_t * p_t) @ a_t for a_t, b_t, p_t in rounds.values())  # each rank its client's weight
    np.testing.assert_allclose(b.double().numpy() @ a.double().numpy(), meant, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(a[:2].numpy(), parts[1][f"{module_of(A)}/A"])  # rounds in order
    assert np.allclose(np.linalg.norm(a.numpy(), axis=1), 1)  # unit vectors; the scale is in w, in fp32


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
    strategy = Stacking(ranks={1: 1, 2: 2, 3: 2})
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
    part = strategy.merged_parts()[1]
    assert part[f"{M}/A"].dtype == np.float16 and part[f"{M}/w"].dtype == np.float32  # the nodes' copy
    ((a, b),) = stacked(strategy.merged_parts()).values()
    meant = 0.25 * one[B] @ one[A] + 0.75 * two[B] @ two[A]
    np.testing.assert_allclose(b.double().numpy() @ a.double().numpy(), meant, rtol=2e-3, atol=2e-3)  # fp16 wire

    # Round 2: nodes 1 and 2 get round 1's stack; node 3 (new) too.
    sent = _round(strategy, new, [1, 3])
    for node in (1, 3):
        carried = sent[node].content[MERGED_KEY]
        assert sorted(carried) == [f"1/{M}/{f}" for f in "ABw"]
    strategy.aggregate_train(2, [_reply(1, one, 10)])  # node 3 never answers
    assert strategy.catch_up.known == {1: 1, 2: 0}  # node 2 was not asked this round; node 3 never answered
    sent = _round(strategy, new, [1, 3])
    assert sorted(sent[1].content[MERGED_KEY]) == [f"2/{M}/{f}" for f in "ABw"]  # only what node 1 lacks
    assert sorted(sent[3].content[MERGED_KEY]) == [f"{t}/{M}/{f}" for t in (1, 2) for f in "ABw"]

    # A checkpoint restores every part; a restarted run sends each node all of them.
    restored = Stacking()
    restored.load_state(strategy.state())
    assert restored.merged_parts().keys() == strategy.merged_parts().keys() and restored.catch_up.known == {}
    np.testing.assert_array_equal(restored.merged_parts()[2][f"{M}/B"], strategy.merged_parts()[2][f"{M}/B"])


def test_a_node_keeps_every_rounds_stack_and_a_resent_round_counts_once():
    from fedllm_flwr.node import NodeState

    def record(t, rank):
        part = stack_part(M, [np.ones((rank, 3))], [np.ones((2, rank))], [1.0], np.float16)
        return ArrayRecord({f"{t}/{k}": Array(v) for k, v in part.items()})

    node = NodeState()
    one, two = record(1, 1), record(2, 2)
    assert node.merge(RecordDict()) is None
    node.merge(RecordDict({MERGED_KEY: one}))
    node.merge(RecordDict({MERGED_KEY: one}))  # sent again after a lost reply
    factors = node.merge(RecordDict({MERGED_KEY: two}))
    a, b = factors[M]
    assert a.shape == (3, 3) and b.shape == (2, 3) and a.dtype == torch.float32
    state = RecordDict()
    node.save(state)
    assert len(NodeState.load(state).merged) == 6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=stacking", "peft=dora"], "strategy=stacking cannot be combined with peft=dora"),
        (
            ["strategy=stacking", "personalize.ft_steps=2"],
            "strategy=stacking cannot be combined with personalize.ft_steps=2",
        ),
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
    part = stack_part(module_of(a_key), [np.ones((2, initial[a_key].shape[1]))],
                      [np.ones((initial[b_key].shape[0], 2)) * 1e-3], [1.0], np.float16)  # fmt: skip
    stack = {f"1/{k}": Array(v) for k, v in part.items()}
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


# Modules of the compaction test: (in, out). min(in, out) is 2 for k_proj (A is re-factored),
# 3 for v_proj (B is), 8 for q_proj; o_proj never reaches 40 in 6 rounds of 3 or 4 ranks.
SHAPES = {"k_proj": (2, 6), "v_proj": (5, 3), "q_proj": (8, 8), "o_proj": (40, 40)}


def _name(module, factor):
    return f"m.layers.0.{module}.lora_{factor}.default.weight"


def _fp16able(x):
    """Values the fp16 uplink carries as they are (the truth is then the server's input)."""
    return np.asarray(x, np.float16).astype(np.float32)


def _state(rng, rank, scale):
    state = {}
    for module, (fan_in, fan_out) in SHAPES.items():
        state[_name(module, "A")] = _fp16able(rng.normal(size=(rank, fan_in)))
        state[_name(module, "B")] = _fp16able(rng.normal(size=(fan_out, rank)) * scale)
    return state


def _held(strategy):
    """The server's parts as a node keeps them: "<round>/<key>" -> array."""
    return {f"{t}/{k}": v for t, part in strategy.merged_parts().items() for k, v in part.items()}


def _same_bits(node, strategy):
    held = _held(strategy)
    kept = {k: v.numpy() for k, v in (node.merged or {}).items()}
    assert sorted(kept) == sorted(held)
    for key, value in held.items():
        assert kept[key].dtype == value.dtype and np.array_equal(kept[key], value), key


@pytest.mark.parametrize(("wire", "tolerance"), [("fp32", 1e-6), ("fp16", 2e-3)])
def test_past_min_in_out_a_modules_stack_is_compacted_exactly_and_every_node_holds_the_servers_bits(
    wire, tolerance, task_identity, tmp_path
):
    from fedllm_flwr.compression import Codec
    from fedllm_flwr.node import NodeState
    from fedllm_flwr.run_dir import RunDir

    rng = np.random.default_rng(0)
    strategy = Stacking(down=Codec(wire), ranks={1: 1, 2: 2, 3: 1})
    arrays = ArrayRecord({k: Array(v * (".lora_A." in k)) for k, v in _state(rng, 2, 1.0).items()})
    nodes = {n: NodeState() for n in (1, 2, 3)}
    truth = {module: np.zeros((fan_out, fan_in)) for module, (fan_in, fan_out) in SHAPES.items()}
    # Node 3 takes part in rounds 2 and 6 only: in round 6 it catches up on rounds 2 to 5.
    schedule = {1: [1, 2], 2: [1, 2, 3], 3: [1, 2], 4: [1, 2], 5: [1, 2], 6: [1, 2, 3]}
    stacked_rank = 0
    for t, taking_part in [*schedule.items(), (7, [1, 2, 3])]:
        sent = _round(strategy, arrays, taking_part)
        if t == 6:  # node 3 holds round 1: it gets each module's latest compaction and o_proj's stacks 2 to 5
            carried = sorted(sent[3].content[MERGED_KEY])
            assert sorted({int(k.split("/")[0]) for k in carried}) == [2, 3, 4, 5]
            compactions = [k for k in carried if k.endswith("/rounds")]
            assert compactions == [f"5/m.layers.0.{m}/rounds" for m in ("k_proj", "q_proj", "v_proj")]
        for n in taking_part:
            factors = nodes[n].merge(sent[n].content)  # checks it holds as many rounds as the server
            for module, (fan_in, fan_out) in SHAPES.items():
                if factors is not None:  # the rank never passes min(in, out)
                    assert factors[f"m.layers.0.{module}"][0].shape[0] <= min(fan_in, fan_out), (t, module)
            _same_bits(nodes[n], strategy)
        if t == 7:
            break
        states = {n: _state(rng, strategy.ranks[n], 0.01) for n in taking_part}
        arrays, _ = strategy.aggregate_train(t, [_reply(n, states[n], 10 * n) for n in taking_part])
        total = sum(10 * n for n in taking_part)
        stacked_rank += sum(strategy.ranks[n] for n in taking_part)
        for module in SHAPES:
            a_key, b_key = _name(module, "A"), _name(module, "B")
            truth[module] += sum(10 * n / total * states[n][b_key].astype(np.float64) @ states[n][a_key]
                                 for n in taking_part)  # fmt: skip
        server = stacked(strategy.merged_parts())
        assert strategy.ledger.pop(t)["merged-rank"] == max(a.shape[0] for a, _ in server.values())
        for module, (fan_in, fan_out) in SHAPES.items():
            a, b = server[f"m.layers.0.{module}"]
            assert a.shape[0] == min(stacked_rank, fan_in, fan_out), (t, module)
            error = np.linalg.norm(b.double().numpy() @ a.double().numpy() - truth[module])
            assert error <= tolerance * np.linalg.norm(truth[module]), (t, module)
    server = stacked(strategy.merged_parts())
    for n in (1, 2, 3):  # every node, the late one too, merges the server's delta bit for bit
        for path, (a, b) in nodes[n].merge(RecordDict()).items():
            assert torch.equal(a, server[path][0]) and torch.equal(b, server[path][1])

    # A node that lost its state is refused: o_proj's parts of rounds 1 to 5 are missing.
    with pytest.raises(ValueError, match="this node holds 1 rounds' stacks and the global model 6"):
        NodeState().merge(sent[1].content)
    # A run resumed from the checkpoint sends a new node every part, the same bits.
    run_dir = RunDir(tmp_path)
    run_dir.write_checkpoint(6, {k: v.numpy() for k, v in arrays.items()}, strategy.state())
    restored = Stacking(down=Codec(wire), ranks=strategy.ranks)
    restored.load_state(run_dir.read_checkpoint()[2])
    late = NodeState()
    late.merge(_round(restored, arrays, [4])[4].content)
    _same_bits(late, strategy)


def test_two_hundred_clients_with_small_factors_merge_without_underflow(task_identity):
    """p_k B_k in fp16 underflows with many clients (1/200 x 1e-4 is deep in fp16's
    subnormals); the clients' weights stay out of the fp16 factors."""
    from fedllm_flwr.node import NodeState

    rng = np.random.default_rng(0)
    start = {A: rng.normal(size=(1, 5)).astype(np.float32), B: np.zeros((4, 1), np.float32)}
    strategy = Stacking()
    states = [{A: _fp16able(rng.normal(size=(1, 5))), B: _fp16able(rng.normal(size=(4, 1)) * 1e-4)}
              for _ in range(200)]  # fmt: skip
    _round(strategy, ArrayRecord({k: Array(v) for k, v in start.items()}), range(1, 201))
    new, _ = strategy.aggregate_train(1, [_reply(n + 1, s, 10) for n, s in enumerate(states)])
    a, b = NodeState().merge(_round(strategy, new, [1])[1].content)["m.layers.0.q_proj"]
    truth = sum(s[B].astype(np.float64) @ s[A] for s in states) / 200
    error = np.linalg.norm(b.double().numpy() @ a.double().numpy() - truth) / np.linalg.norm(truth)
    assert error < 2e-3
