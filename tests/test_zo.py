"""Zeroth-order steps from a seed pool, on the tiny model: the estimate, the exact
restore, and bit-identical weights from the same (seed, coefficient) list."""

import copy

import numpy as np
import pytest
import torch

from fedllm_flwr.zo import apply_steps, perturb, pool_id, seed_pool, two_point, zo_train


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
