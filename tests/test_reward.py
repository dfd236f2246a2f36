"""Reward models (task=reward): pairs, the pairwise losses, the head that travels, evaluation."""

import json
import math
import random

import pytest
import torch
from conftest import TINY_OVERRIDES

from fedllm_flwr.client import local_evaluate, local_train
from fedllm_flwr.config import REWARD_LOSSES, RewardLossConfig, load_cfg
from fedllm_flwr.data import client_data, records
from fedllm_flwr.data.pairs import Pair, PairSet, collate_pairs
from fedllm_flwr.data.prompts import iter_batches
from fedllm_flwr.data.synthetic import TASKS, generate, wrong_answer
from fedllm_flwr.errors import UserError
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.tasks.reward import evaluate_preferences, margins, pairwise_loss, reward_loss_fn
from fedllm_flwr.transport import manifest_of, pack, unpack_state

REWARD = ["task=reward", "train.precision=fp32"]


@pytest.fixture
def reward_cfg(tiny_cfg):
    def make(*overrides):
        clear_model_cache()
        return tiny_cfg(*REWARD, *overrides)

    return make


def test_synthetic_pairs_reject_a_plausible_wrong_answer():
    rng = random.Random(0)
    for rec in generate(sorted(TASKS), 30, seed=1):
        wrong = wrong_answer(rec, rng)
        assert wrong != rec["output"], rec
        if rec["output"].isdigit():
            assert wrong.lstrip("-").isdigit()  # a number for a number
        elif rec["category"] in ("reverse", "sort"):
            assert sorted(wrong.split()) == sorted(rec["output"].split())  # the same words, misordered


def test_reward_records_are_pairs_from_the_generator_or_a_mapped_file(reward_cfg, tmp_path):
    train, test = records(reward_cfg())
    assert {"instruction", "chosen", "rejected", "category"} <= set(train[0]) and "output" not in train[0]
    assert all(r["chosen"] != r["rejected"] for r in train + test)
    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(10)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": "q", "good": "g"}\n')
    fields = ["dataset=file", f"dataset.path={path}", "dataset.fields.instruction=question",
              "dataset.fields.chosen=good", "dataset.fields.rejected=bad"]  # fmt: skip
    with pytest.raises(UserError, match=r"pairs.jsonl, line 11: missing field 'bad' \(dataset.fields.rejected\)"):
        records(reward_cfg(*fields))


def test_the_head_trains_with_the_adapter_and_travels_in_its_state(reward_cfg):
    cfg = reward_cfg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="SEQ_CLS")
    state = get_adapter_state(bundle.model)
    heads = [k for k in state if "score" in k]
    assert heads and state[heads[0]].shape == (1, 32)  # one output from the tiny model's 32 features
    assert all(v.dtype == torch.float32 for v in state.values())
    back = unpack_state(pack(state), manifest_of(state))
    assert set(back) == set(state)
    trained, metrics = local_train(cfg, state, 1, 0, 2)
    assert not torch.equal(trained[heads[0]], state[heads[0]]) and math.isfinite(metrics["train-loss"])
    scores = local_evaluate(cfg, trained, 0, 2)
    assert 0.0 <= scores["eval-preference-accuracy"] <= 1.0 and math.isfinite(scores["eval-margin"])


def test_on_a_bf16_base_the_head_stays_fp32_and_scores_in_fp32(reward_cfg):
    cfg = reward_cfg("train.precision=bf16")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="SEQ_CLS")
    assert next(p for n, p in bundle.model.named_parameters() if "embed" in n).dtype == torch.bfloat16
    state = get_adapter_state(bundle.model)
    trained, metrics = local_train(cfg, state, 1, 0, 2)
    assert math.isfinite(metrics["train-loss"]) and any(not torch.equal(trained[k], state[k]) for k in state)
    head = next(p for n, p in bundle.model.named_parameters() if "score" in n and p.requires_grad)
    assert head.dtype == torch.float32
    batch = bundle.tokenizer(["a b", "c"], return_tensors="pt", padding=True)
    assert bundle.model(**batch).logits.dtype == torch.float32


@pytest.mark.parametrize("name", REWARD_LOSSES)
def test_every_loss_pushes_chosen_above_rejected(reward_cfg, name):
    cfg = reward_cfg(f"reward_loss={name}")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="SEQ_CLS")
    data = client_data(cfg, bundle.tokenizer, 0, 1)
    batch = next(iter_batches(data.train, 8, bundle.tokenizer.pad_token_id, seed=0, collate_fn=collate_pairs))
    loss_fn = reward_loss_fn(cfg.reward_loss)
    params = [p for p in bundle.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)
    bundle.model.eval()  # no dropout: the same function before and after the step
    with torch.no_grad():
        before_d, before = margins(bundle.model, batch), loss_fn(bundle.model, batch).item()
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(bundle.model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        after_d, after = margins(bundle.model, batch), loss_fn(bundle.model, batch).item()
    assert after < before and after_d.mean() > before_d.mean(), (name, before, after)


def test_losses_match_their_formulas():
    d = torch.tensor([-2.0, 0.0, 0.5, 3.0])
    cfg = RewardLossConfig
    bt = -torch.nn.functional.logsigmoid(d).mean()
    assert torch.isclose(pairwise_loss(d, cfg("logsigmoid")), bt)
    assert torch.isclose(pairwise_loss(d, cfg("bce")), bt)  # no smoothing: the same as Bradley-Terry
    assert torch.isclose(pairwise_loss(d, cfg("focal", gamma=0.0)), bt)
    assert torch.isclose(pairwise_loss(d, cfg("hinge", margin=1.0)), torch.tensor((3.0 + 1.0 + 0.5 + 0.0) / 4))
    assert torch.isclose(pairwise_loss(d, cfg("mse", margin=1.0)), torch.tensor((9.0 + 1.0 + 0.25 + 4.0) / 4))
    huber = [2.5, 0.5, 0.125, 1.5]  # |x| - 0.5 beyond 1, x^2 / 2 within
    assert torch.isclose(pairwise_loss(d, cfg("smooth_l1", margin=1.0)), torch.tensor(sum(huber) / 4))
    smooth = pairwise_loss(d, cfg("bce", label_smoothing=0.1))
    q = 0.9
    by_hand = -(q * torch.nn.functional.logsigmoid(d) + (1 - q) * torch.nn.functional.logsigmoid(-d)).mean()
    assert torch.isclose(smooth, by_hand)


class FixedScores(torch.nn.Module):
    """Scores a sequence by its first token id: the chosen side wins when its id is larger."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": input_ids[:, :1].float()})()


def test_preference_accuracy_and_margin_are_counted_over_pairs():
    data = PairSet.__new__(PairSet)
    data.pairs, data.dropped = [Pair([5], [3], 0), Pair([2], [4], 0), Pair([9], [1], 0), Pair([7], [7, 1], 0)], 0
    scores = evaluate_preferences(FixedScores(), data, pad_id=0, batch_size=3)
    assert scores["preference-accuracy"] == 0.5  # 5 > 3, 9 > 1; 2 < 4 and 7 = 7 are not wins
    assert scores["margin"] == pytest.approx((2 - 2 + 8 + 0) / 4) and scores["pairs"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["peft=prompt_tuning"], "adds virtual tokens"),
        (["algorithm=fedot"], "task=reward cannot be combined with algorithm=fedot"),
        (["personalize.ft_steps=2"], "task=reward cannot be combined with personalize.ft_steps=2"),
    ],
)
def test_unsupported_combinations_are_refused(tiny_model_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES, "task=reward", *overrides])


def test_a_saved_reward_adapter_loads_with_peft_and_scores_the_same(reward_cfg, tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    from fedllm_flwr.run_dir import RunDir

    cfg = reward_cfg("run.name=r", f"run.output_dir={tmp_path}")
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type="SEQ_CLS")
    trained, _ = local_train(cfg, get_adapter_state(bundle.model), 1, 0, 2)
    folder = RunDir.create(cfg).save_adapters(bundle.model, "final", {"": trained})
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    loaded.config.pad_token_id = bundle.tokenizer.pad_token_id
    pairs = PairSet(records(cfg)[1][:6], bundle.tokenizer, cfg.dataset.max_seq_len)
    batch = collate_pairs(pairs.pairs, bundle.tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(margins(loaded.eval(), batch), margins(bundle.model.eval(), batch))
