"""Zeroth-order steps from a seed pool, on the tiny model: the estimate, the exact
restore, and bit-identical weights from the same (seed, coefficient) list."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from fedllm_flwr.algorithms.zo.mezo import apply_steps, perturb, pool_id, seed_pool, two_point, zo_train


def _model_and_batch(tiny_model_dir):
    from tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(len(tok)).float()
    ids = torch.tensor([tok.encode("What is 12 + 30? 42")])
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _loss(model, batch):
    return model(**batch).loss.detach()


def test_the_pool_is_fixed_by_the_run_seed():
    assert np.array_equal(seed_pool(0, 4096), seed_pool(0, 4096)) and len(set(seed_pool(0, 4096))) == 4096
    assert pool_id(seed_pool(0, 8)) != pool_id(seed_pool(1, 8)) and pool_id(seed_pool(0, 8)) != pool_id(seed_pool(0, 9))
    with pytest.raises(ValueError):
        seed_pool(0, 0)


def test_two_point_estimate_is_the_directional_derivative_and_leaves_the_weights_as_they_were(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir)
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    seed = int(seed_pool(0, 4)[2])
    g, loss = two_point(model, params, batch, _loss, seed, eps=1e-3)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # restored bit for bit
    # The derivative along the same z, by autograd.
    model.zero_grad()
    model(**batch).loss.backward()
    z = copy.deepcopy(params)
    for t in z:
        t.data.zero_()
    perturb([t.data for t in z], seed, 1.0)
    exact = sum(float((p.grad * t.data).sum()) for p, t in zip(params, z, strict=True))
    assert g == pytest.approx(exact, rel=2e-2)
    assert loss == pytest.approx(float(_loss(model, batch)), rel=1e-3)


def test_nodes_applying_the_same_steps_hold_the_same_bits_and_a_late_node_catches_up(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir)
    model = model.to(torch.bfloat16)  # rounding makes any drift in order or values show
    pool = seed_pool(3, 64)
    a, b, late = (copy.deepcopy(model) for _ in range(3))
    rounds = [[(5, 1e-3), (17, -2e-3)], [(5, 4e-4), (63, 1e-3), (0, -1e-3)]]
    for steps in rounds:
        apply_steps(list(a.parameters()), pool, steps)
        apply_steps(list(b.parameters()), pool, steps)
    apply_steps(list(late.parameters()), pool, [s for steps in rounds for s in steps])  # replays what it missed
    for pa, pb, pl in zip(a.parameters(), b.parameters(), late.parameters(), strict=True):
        assert torch.equal(pa, pb) and torch.equal(pa, pl)
    assert any(not torch.equal(pa, p0) for pa, p0 in zip(a.parameters(), model.parameters(), strict=True))


def test_a_zeroth_order_round_lowers_the_loss_and_its_coefficients_replay_it(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir)
    start = copy.deepcopy(model)
    pool = seed_pool(0, 16)
    before = float(_loss(model, batch))
    result = zo_train(model, list(model.parameters()), iter([batch] * 40), pool, np.random.default_rng(0), 40,
                      lambda k: 3e-4, 1e-3, _loss)  # fmt: skip
    assert result.steps == 40 and result.skipped == 0 and set(result.coefficients) <= set(range(16))
    # A step along z moves every one of the ~60k weights: the rate is far below SGD's.
    assert float(_loss(model, batch)) < before - 0.02
    # The per-seed sums replay the round up to the order of the additions (fp32 rounding).
    apply_steps(list(start.parameters()), pool, sorted(result.coefficients.items()))
    for p, q in zip(model.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


_APPLY_STEPS = """
import hashlib, numpy as np, torch
from fedllm_flwr.algorithms.zo.mezo import apply_steps, seed_pool
params = [torch.zeros(64, 48), torch.full((1000,), 0.5), torch.zeros(7)]
apply_steps(params, seed_pool(0, 16), [(3, 1e-3), (9, -2.5e-4), (3, 7e-5)])
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha1(b"".join(p.numpy().tobytes() for p in params)).hexdigest())
"""


def test_nodes_on_cpus_with_other_torch_kernels_hold_the_same_bits():
    """torch picks its CPU kernels by what the CPU offers (ATEN_CPU_CAPABILITY caps it):
    the same steps must give the same weights under each."""
    import os
    import subprocess
    import sys

    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU has no AVX2: only torch's default kernels run here")
    root = str(Path(__file__).resolve().parents[1])
    runs = {
        capability: subprocess.Popen([sys.executable, "-c", _APPLY_STEPS], stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": root})
        for capability in ("default", "avx2")
    }  # fmt: skip
    out = {capability: run.communicate(timeout=120)[0].split() for capability, run in runs.items()}
    assert [out[c][0] for c in ("default", "avx2")] == ["DEFAULT", "AVX2"]  # each ran the kernels it was given
    assert out["default"][1] == out["avx2"][1]


# --- The federation: server strategy and nodes, over real records ----------------------


def _zo_reply(node, indices, coefficients, pool, n=10):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedllm_flwr.keys import ZO_POOL_KEY, ZO_REPLY_KEY

    content = RecordDict({
        ZO_REPLY_KEY: ArrayRecord({"indices": Array(np.asarray(indices, np.int64)),
                                   "coefficients": Array(np.asarray(coefficients, np.float64))}),
        "zo": ConfigRecord({ZO_POOL_KEY: pool}),
        "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, "partition-id": node}),
    })  # fmt: skip
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN))


def test_the_server_averages_seed_lists_refuses_bad_ones_and_sends_each_node_what_it_lacks(task_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedllm_flwr.algorithms.zo.strategy import SeedFederation
    from fedllm_flwr.keys import ARRAYS_KEY, ZO_POOL_KEY, ZO_STEPS_KEY

    pool = seed_pool(0, 8)
    start = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy = SeedFederation(pool=pool, order=list(start))

    def send(nodes, round_=1):
        messages = [
            Message(RecordDict({ARRAYS_KEY: arrays, "config": ConfigRecord({"server-round": round_})}),
                    dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes
        ]  # fmt: skip
        return {m.metadata.dst_node_id: m.content for m in strategy._wire(arrays, messages, remember=True)}

    sent = send([1, 2, 3, 4, 5, 6])
    assert ARRAYS_KEY not in sent[1] and sent[1]["config"][ZO_POOL_KEY] == pool_id(pool)
    assert len(sent[1][ZO_STEPS_KEY]["indices"].numpy()) == 0  # nothing to apply yet
    good = pool_id(pool)
    new, _ = strategy.aggregate_train(1, [
        _zo_reply(1, [0, 5], [1e-3, -2e-3], good, n=30),
        _zo_reply(2, [5, 7], [4e-3, 1e-3], good, n=10),
        _zo_reply(3, [8], [1e-3], good),  # outside the pool of 8
        _zo_reply(4, [1], [float("nan")], good),
        _zo_reply(5, [1], [1e-3], pool_id(seed_pool(1, 8))),  # another run's pool
        _zo_reply(6, [2, 2], [1e-3, 1e-3], good),  # an index twice
    ])  # fmt: skip
    assert strategy.ledger.pop(1)["clients-dropped"] == 4
    indices, coefficients = strategy.rounds[1]
    assert indices.tolist() == [0, 5, 7]
    np.testing.assert_allclose(coefficients, [0.75e-3, 0.75 * -2e-3 + 0.25 * 4e-3, 0.25e-3])
    # The server's adapter took the round's steps as a node will: in index order, from the same start.
    expected = [torch.from_numpy(v.copy()) for v in start.values()]
    apply_steps(expected, pool, zip(indices, coefficients, strict=True))
    assert all(torch.equal(torch.from_numpy(new[k].numpy()), e) for k, e in zip(start, expected, strict=True))

    sent = send([1, 9], 2)
    assert sent[1][ZO_STEPS_KEY]["rounds"].numpy().tolist() == [1, 1, 1]  # round 1's three steps
    assert sent[9][ZO_STEPS_KEY]["rounds"].numpy().tolist() == [1, 1, 1]  # a new node: everything
    restored = SeedFederation(pool=pool, order=list(start))
    restored.load_state(strategy.state())
    assert restored.rounds[1][0].tolist() == [0, 5, 7]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zo.params=all"], r"zo\.params='all': use adapter or full"),
        (["zo.eps=0"], r"num_seeds >= 1, eps > 0 and lr > 0"),
        (["strategy=median"], r"algorithm=zo cannot be combined with strategy=median"),
        (["privacy=dp"], r"algorithm=zo cannot be combined with privacy=dp"),
        (["compression=int8"], r"algorithm=zo cannot be combined with compression\.down=int8"),
        (["personalize.ft_steps=2"], r"algorithm=zo cannot be combined with personalize\.ft_steps=2"),
        (
            ["zo.params=full", "train.precision=bf16"],
            r"zo\.params=full cannot be combined with train\.precision=bf16: steps of ~1e-7 round away",
        ),
        (["zo.params=full", "peft=prompt_tuning"], r"zo\.params=full cannot be combined with peft=prompt_tuning"),
        (
            ["zo.params=full", "model.quantization=4bit"],
            r"zo\.params=full cannot be combined with model\.quantization=4bit",
        ),
    ],
)
def test_what_zeroth_order_cannot_run_with_is_refused_naming_the_key(overrides, message):
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.errors import UserError

    with pytest.raises(UserError, match=message):
        load_cfg(["algorithm=zo", *overrides])


def test_full_parameter_mode_computes_in_fp32_and_a_resume_is_allowed():
    from fedllm_flwr.config import load_cfg

    assert load_cfg(["algorithm=zo", "zo.params=full"]).train.precision == "fp32"
    assert load_cfg(["algorithm=zo"]).train.precision == "auto"  # the adapter's own weights are fp32 already
    assert load_cfg(["algorithm=zo", "zo.params=full", "resume=/somewhere"]).resume == "/somewhere"


def test_a_step_without_a_copy_matches_the_exact_step_to_rounding(tiny_model_dir):
    from fedllm_flwr.algorithms.zo.mezo import step_in_place

    model, batch = _model_and_batch(tiny_model_dir)
    exact, start = copy.deepcopy(model), copy.deepcopy(model)
    seed = int(seed_pool(0, 4)[1])
    g, loss = step_in_place(model, list(model.parameters()), batch, _loss, seed, 1e-3, 1e-3)
    g_exact, loss_exact = two_point(exact, list(exact.parameters()), batch, _loss, seed, 1e-3)
    apply_steps(list(exact.parameters()), np.array([seed]), [(0, 1e-3 * g_exact)])
    assert g == pytest.approx(g_exact, rel=1e-3) and loss == pytest.approx(loss_exact, rel=1e-6)
    params = (m.parameters() for m in (model, exact, start))
    for p, q, p0 in (tuple(t.detach() for t in ts) for ts in zip(*params, strict=True)):
        step = float((q - p0).abs().max())
        assert step > 0  # the step moved every tensor
        # The two differ by rounding (the undo's, and g's from the losses' last bits): far below the step.
        assert float((p - q).abs().max()) <= 1e-2 * step


def test_full_weights_are_saved_as_a_model_transformers_loads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from fedllm_flwr.algorithms.zo.full_weights import base_weights, save_model
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.model import build_model, clear_model_cache

    clear_model_cache()
    cfg = load_cfg([f"model.name={tiny_model_dir}", "algorithm=zo", "zo.params=full"])
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    weights = base_weights(bundle.model)
    assert all("lora_" not in k and not k.startswith("base_model") for k in weights)
    apply_steps(list(weights.values()), seed_pool(0, 4), [(1, 0.05)])  # move every base weight
    saved = save_model(bundle.model, bundle.tokenizer, weights, tmp_path / "model" / "final")
    loaded = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32)
    ids = torch.tensor([bundle.tokenizer.encode("What is 12 + 30?")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, bundle.model(input_ids=ids).logits)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(ids).logits,
                                  loaded(ids).logits)  # fmt: skip
    assert (saved / "tokenizer_config.json").is_file()
    clear_model_cache()


def test_the_base_weights_are_the_bases_alone_under_ffa_lora(tiny_cfg):
    """zo.params=full tunes the base model's weights; FFA-LoRA's A is frozen too, but it is
    the adapter's: it is no base weight, and no base checkpoint holds it."""
    from fedllm_flwr.algorithms.zo.full_weights import base_weights
    from fedllm_flwr.model import build_model, clear_model_cache

    clear_model_cache()
    cfg = tiny_cfg("peft=ffa_lora")
    model = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed).model
    names = set(base_weights(model))
    assert not any("lora_" in n for n in names)
    assert "model.embed_tokens.weight" in names and len(names) > 10
