"""Direct preference optimisation (task=dpo): the losses against TRL's, response
log-probabilities, the reference with the adapter off, bad pairs, training."""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedllm_flwr.client import local_evaluate, local_train
from fedllm_flwr.config import DpoLossConfig, load_cfg
from fedllm_flwr.data import client_data
from fedllm_flwr.data.pairs import PairSet, collate_pairs
from fedllm_flwr.errors import UserError
from fedllm_flwr.lm_loss import sequence_logps
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state, load_tokenizer, set_adapter_state
from fedllm_flwr.tasks.dpo import closer_to_chosen, dpo_loss, dpo_loss_fn, evaluate_dpo, policy_and_reference
from fedllm_flwr.tasks.registry import task_of

DPO = ["task=dpo", "train.precision=fp32"]


def _trl_loss(name, beta, smoothing, per_token, completion, ref_chosen, ref_rejected):
    """TRL's DPOTrainer._compute_loss on a hand batch: a stand-in model returns the
    given per-token log-probs; the reference log-probs are given as precomputed."""
    pytest.importorskip("trl")
    from trl import DPOTrainer

    seq = per_token.shape[1]
    zeros = torch.zeros_like(per_token)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    model = SimpleNamespace(training=False)
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[name], loss_weights=[1.0], beta=beta,
        label_smoothing=smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    inputs = {
        "input_ids": torch.zeros(per_token.shape[0], seq + 1, dtype=torch.long),
        "attention_mask": torch.ones(per_token.shape[0], seq + 1, dtype=torch.long),
        "completion_mask": completion, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected,
    }  # fmt: skip
    return float(DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False))


@pytest.mark.parametrize(("name", "smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_each_loss_matches_trl_on_a_hand_batch(name, smoothing):
    gen = torch.Generator().manual_seed(0)
    pairs, seq = 3, 6
    completion = torch.zeros(2 * pairs, seq + 1, dtype=torch.long)
    for row, start in enumerate([2, 3, 1, 4, 2, 5]):  # responses of different lengths
        completion[row, start:] = 1
    per_token = -torch.rand(2 * pairs, seq, generator=gen) * completion[:, 1:]  # 0 off the response
    reference = -torch.rand(2 * pairs, generator=gen) * 3
    cfg = DpoLossConfig(name=name, beta=0.5, label_smoothing=smoothing)
    ours = dpo_loss(per_token.sum(1), reference, completion.sum(1), cfg).mean()
    theirs = _trl_loss(name, 0.5, smoothing, per_token, completion, *reference.chunk(2))
    assert float(ours) == pytest.approx(theirs, rel=1e-6)


def test_conservative_dpo_is_the_smoothed_sigmoid_and_robust_undoes_the_flip_bias():
    policy, reference, tokens = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), torch.tensor([2, 2])
    h = (-3.0 + 4.0) - (-5.0 + 4.0)  # 2.0
    e, beta = 0.1, 0.5
    smoothed = dpo_loss(policy, reference, tokens, DpoLossConfig(name="sigmoid", beta=beta, label_smoothing=e))
    expected = -(1 - e) * F.logsigmoid(torch.tensor(beta * h)) - e * F.logsigmoid(torch.tensor(-beta * h))
    assert float(smoothed) == pytest.approx(float(expected))
    # rDPO: the expectation over a flip with probability e is the clean DPO loss.
    robust = DpoLossConfig(name="robust", beta=beta, label_smoothing=e)
    flipped = torch.tensor([-5.0, -3.0])
    mean = (1 - e) * dpo_loss(policy, reference, tokens, robust) + e * dpo_loss(flipped, reference, tokens, robust)
    assert float(mean) == pytest.approx(float(-F.logsigmoid(torch.tensor(beta * h))), rel=1e-6)


def _bundle(tiny_cfg, *overrides):
    clear_model_cache()
    cfg = tiny_cfg(*DPO, *overrides)
    return cfg, build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="CAUSAL_LM")


def _batch(cfg, bundle, n=4):
    data = client_data(cfg, bundle.tokenizer, 0, 1)
    return collate_pairs([data.train.example(i) for i in range(n)], bundle.tokenizer.pad_token_id)


def test_response_log_probs_sum_the_response_tokens_only_on_either_path(tiny_cfg):
    cfg, bundle = _bundle(tiny_cfg)
    batch = _batch(cfg, bundle)
    with torch.no_grad():
        fast, tokens = sequence_logps(bundle.model, batch, response_logits=True)
        full, same = sequence_logps(bundle.model, batch, response_logits=False)
    torch.testing.assert_close(fast, full)
    torch.testing.assert_close(tokens, same)
    assert (tokens > 0).all() and (batch["labels"][:, 0] == -100).all()  # the prompt is masked
    # Row by row, the mean log-prob is minus the model's own LM loss on that row.
    for row in range(batch["input_ids"].shape[0]):
        one = {k: v[row : row + 1] for k, v in batch.items()}
        with torch.no_grad():
            loss = bundle.model(**one).loss
        assert float(fast[row] / tokens[row]) == pytest.approx(-float(loss), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_the_reference_is_the_base_with_the_adapter_off(tiny_cfg, method):
    from transformers import AutoModelForCausalLM

    cfg, bundle = _bundle(tiny_cfg, f"peft={method}")
    batch = _batch(cfg, bundle)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    expected, _ = sequence_logps(base, batch)
    with torch.no_grad():
        for p in bundle.model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # the policy moves off the base
    policy, reference, _ = policy_and_reference(bundle.model, batch)
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(policy, reference)
    assert reference.grad_fn is None and policy.grad_fn is not None  # only the policy is differentiated


def test_at_the_start_policy_and_reference_agree_and_training_moves_the_margin(tiny_cfg):
    cfg, bundle = _bundle(tiny_cfg, "train.local_steps=8", "train.lr=5e-3")
    data = client_data(cfg, bundle.tokenizer, 0, 1)
    pad = bundle.tokenizer.pad_token_id
    start = evaluate_dpo(bundle.model, PairSet(data.holdout_records + [], bundle.tokenizer, 64), pad, cfg.dpo_loss)
    assert start["margin"] == 0.0 and start["eval-loss"] == pytest.approx(np.log(2))  # LoRA's B = 0: pi = ref
    loss = dpo_loss_fn(cfg.dpo_loss)(bundle.model, _batch(cfg, bundle))
    assert float(loss.detach()) == pytest.approx(np.log(2), rel=1e-5)
    trained, metrics = local_train(cfg, get_adapter_state(bundle.model), 1, 0, 1)
    assert np.isfinite(metrics["train-loss"])
    set_adapter_state(bundle.model, trained)
    scores = local_evaluate(cfg, trained, 0, 1)
    assert {"eval-loss", "eval-preference-accuracy", "eval-margin"} <= set(scores) and scores["num-examples"] > 0
    assert scores["eval-margin"] != 0.0 and np.isfinite(scores["eval-loss"])


@pytest.mark.parametrize("task", ["dpo", "reward"])
def test_every_chosen_and_rejected_response_ends_with_eos_as_trl_tokenizes_them(tiny_cfg, task):
    """TRL's DPOTrainer and RewardTrainer append EOS to both responses (unless the text already
    ends with it): the policy learns to stop, and a reward model scores the closed response."""
    cfg = tiny_cfg(f"task={task}", "train.precision=fp32")
    tok = load_tokenizer(str(cfg.model.name))
    eos = tok.eos_token_id
    data = client_data(cfg, tok, 0, 1)
    pairs = [p for i in range(len(data.train.records)) if (p := data.train.example(i)) is not None]
    assert pairs and all(p.chosen[-1] == eos and p.rejected[-1] == eos for p in pairs)
    assert all(eos not in p.chosen[:-1] and eos not in p.rejected[:-1] for p in pairs)  # one EOS, at the end
    labels = collate_pairs(pairs, tok.pad_token_id)["labels"]
    ends = [len(p.chosen) - 1 for p in pairs] + [len(p.rejected) - 1 for p in pairs]
    assert all(labels[row, end] == eos for row, end in enumerate(ends))  # EOS is scored with the response
    closed = {"instruction": "What is 2 + 3?", "chosen": "5" + tok.eos_token, "rejected": "6"}
    pair = PairSet([closed], tok, 64).pairs[0]
    assert pair.chosen.count(eos) == 1 and pair.chosen[-1] == eos and pair.rejected[-1] == eos


def test_the_policy_trains_without_dropout_so_its_log_probs_are_deterministic(tiny_cfg):
    """The reference (the adapter switched off) has no LoRA dropout; TRL disables dropout in the
    policy too (DPOConfig.disable_dropout). In training mode two forwards must agree."""
    cfg, bundle = _bundle(tiny_cfg, "peft.dropout=0.5")
    batch = _batch(cfg, bundle)
    with torch.no_grad():
        for name, p in bundle.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA's B = 0 at the start hides what dropout does to A's input
    bundle.model.train()
    with task_of(cfg).training(bundle.model):
        first, reference, _ = policy_and_reference(bundle.model, batch)
        second, _, _ = policy_and_reference(bundle.model, batch)
        torch.testing.assert_close(first, second, rtol=0, atol=0)
        assert not torch.allclose(first, reference)  # the adapter does act
        loss = dpo_loss_fn(cfg.dpo_loss)
        assert float(loss(bundle.model, batch).detach()) == float(loss(bundle.model, batch).detach())


@pytest.mark.parametrize("task", ["dpo", "grpo"])
def test_a_task_that_trains_without_dropout_gives_it_back_to_the_cached_model(tiny_cfg, task):
    """The model is cached per process: after a DPO or GRPO client's round, a task=lm job
    in the same (warm) process must train with the dropout it configured."""
    from fedllm_flwr.client import _setup, local_train

    cfg = tiny_cfg(f"task={task}", "peft.dropout=0.3", "train.local_steps=1", "grpo.max_new_tokens=2")
    bundle, _ = _setup(cfg, 0, 2)
    local_train(cfg, get_adapter_state(bundle.model), 1, 0, 2)
    rates = {m.p for m in bundle.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert 0.3 in rates and 0.0 not in rates


@pytest.mark.parametrize("peft", ["ffa_lora", "adalora"])
def test_the_reference_leaves_frozen_adapter_tensors_frozen(tiny_cfg, peft):
    """peft's disable_adapter marks every adapter tensor trainable on its way out, FFA-LoRA's
    frozen A and AdaLoRA's rank divisor included: after a reference forward the adapter
    state would hold tensors no node sends (and the server would drop every reply)."""
    extra = ["scenario=local"] if peft == "adalora" else []
    cfg, bundle = _bundle(tiny_cfg, f"peft={peft}", *extra)
    before = set(get_adapter_state(bundle.model))
    policy_and_reference(bundle.model, _batch(cfg, bundle))
    assert set(get_adapter_state(bundle.model)) == before


def test_bad_pairs_are_dropped_and_counted_never_a_nan_loss(tiny_cfg):
    cfg, bundle = _bundle(tiny_cfg)
    tok = bundle.tokenizer
    good = {"instruction": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
    bad = [
        {"instruction": "What is 2 + 3?", "chosen": "5", "rejected": "5"},  # identical
        {"instruction": "What is 2 + 3?", "chosen": "", "rejected": "6"},  # an empty response
        {"instruction": "word " * 200, "chosen": "5", "rejected": "6"},  # the prompt fills max_seq_len
    ]
    data = PairSet([good, *bad], tok, 64)
    assert len(data) == 1 and data.dropped == 3
    scores = evaluate_dpo(bundle.model, data, tok.pad_token_id, cfg.dpo_loss)
    assert all(np.isfinite(v) for v in scores.values())


def test_closeness_counts_answers_nearer_the_chosen_response():
    records = [{"chosen": "the cat sat", "rejected": "a dog ran"}] * 2 + [{"chosen": "yes", "rejected": "no"}]
    scores = closer_to_chosen(["the cat sat down", "a dog ran off", "maybe"], records)
    assert scores == {"closer-to-chosen": pytest.approx(1 / 3), "closer-ties": pytest.approx(1 / 3)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dpo_loss.name=kto"], r"dpo_loss\.name='kto': use one of sigmoid, hinge, ipo, robust"),
        (["dpo_loss.beta=0"], r"beta > 0"),
        (["dpo_loss=hinge", "dpo_loss.label_smoothing=0.1"], r"applies to sigmoid and robust, not hinge"),
        (["algorithm=fedot"], r"task=dpo cannot be combined with algorithm=fedot: .*reference"),
        (["personalize.ft_steps=2"], r"task=dpo cannot be combined with personalize\.ft_steps=2"),
        (["strategy=stacking"], r"stacking"),
    ],
)
def test_what_dpo_cannot_run_with_is_refused_naming_the_key(overrides, message):
    with pytest.raises(UserError, match=message):
        load_cfg(["task=dpo", *overrides])
