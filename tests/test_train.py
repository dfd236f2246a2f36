import math

import pytest
import torch

from fedllm_flwr.client import local_evaluate, local_train
from fedllm_flwr.config import TrainConfig
from fedllm_flwr.data import client_data
from fedllm_flwr.data.prompts import iter_batches
from fedllm_flwr.data.sites import partition_of
from fedllm_flwr.model import build_model, clear_model_cache, get_adapter_state
from fedllm_flwr.tasks.registry import TASKS
from fedllm_flwr.train import lr_at, train_steps


@pytest.fixture
def setup(tiny_cfg):
    clear_model_cache()
    cfg = tiny_cfg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    data = client_data(cfg, bundle.tokenizer, 0, 1)
    return cfg, bundle, data


def test_training_lowers_the_loss_on_a_fixed_batch(setup):
    cfg, bundle, data = setup
    batch = next(iter_batches(data.train, 8, bundle.tokenizer.pad_token_id, seed=0))

    def same_batch():
        while True:
            yield batch

    before = bundle.model(**batch).loss.item()
    result = train_steps(bundle.model, same_batch(), TrainConfig(lr=5e-2, local_steps=20, lr_schedule="constant"))
    after = bundle.model(**batch).loss.item()
    assert math.isfinite(result.loss) and after < before - 0.1
    assert result.steps == 20 and result.examples == 20 * 8 and result.tokens > 0


def test_only_the_adapter_changes(setup):
    cfg, bundle, data = setup
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if not p.requires_grad}
    adapter = get_adapter_state(bundle.model)
    train_steps(bundle.model, iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, 0), TrainConfig(local_steps=2))
    assert all(torch.equal(p, frozen[n]) for n, p in bundle.model.named_parameters() if not p.requires_grad)
    after = get_adapter_state(bundle.model)
    assert any(not torch.equal(after[k], adapter[k]) for k in adapter)


def count_optimizer_steps(monkeypatch) -> list:
    """A list that gets one entry per AdamW step taken (the step still runs)."""
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    return steps


def test_gradient_accumulation_takes_one_step_per_accum_batches(setup, monkeypatch):
    cfg, bundle, data = setup
    steps = count_optimizer_steps(monkeypatch)
    result = train_steps(
        bundle.model,
        iter_batches(data.train, 2, bundle.tokenizer.pad_token_id, 0),
        TrainConfig(local_steps=3, grad_accum=4),
    )
    assert len(steps) == 3 and result.examples == 3 * 4 * 2


def test_lr_schedule_spans_rounds():
    cfg = TrainConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    assert lr_at(0, 100, cfg) == pytest.approx(5e-4)
    assert lr_at(2, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(99, 100, cfg) == pytest.approx(1e-4, rel=0.01)
    assert lr_at(10, 100, cfg) > lr_at(50, 100, cfg) > lr_at(90, 100, cfg)
    assert lr_at(50, 100, TrainConfig(lr=3e-4, lr_schedule="constant")) == 3e-4


def test_local_train_and_evaluate_reply_metrics(tiny_cfg):
    clear_model_cache()
    cfg = tiny_cfg()
    bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed)
    start = get_adapter_state(bundle.model)
    state, metrics = local_train(cfg, start, server_round=2, partition_id=1, num_partitions=2)
    assert set(state) == set(start)
    assert metrics["num-examples"] == 36  # 2 of 4 task families x 20, minus a 10% hold-out
    assert metrics["examples-seen"] == cfg.train.local_steps * cfg.train.batch_size
    for key in ("train-loss", "tokens", "seconds", "peak-memory-mb"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    ev = local_evaluate(cfg, state, 1, 2)
    assert ev["num-examples"] == 4 and math.isfinite(ev["eval-loss"]) and ev["eval-ppl"] > 1


def test_same_seed_same_training(tiny_cfg):
    results = []
    for _ in range(2):
        clear_model_cache()
        cfg = tiny_cfg()
        start = get_adapter_state(build_model(cfg.model, cfg.peft, "auto", cfg.seed).model)
        results.append(local_train(cfg, start, 1, 0, 2))
    assert results[0][1]["train-loss"] == results[1][1]["train-loss"]
    assert all(torch.equal(results[0][0][k], results[1][0][k]) for k in results[0][0])


def test_partition_of_requires_both_keys():
    assert partition_of({"partition-id": 1, "num-partitions": 3}) == (1, 3)
    with pytest.raises(ValueError, match="partition-id and num-partitions"):
        partition_of({"partition-id": 0})


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_prefers_bf16_where_the_gpu_supports_it(monkeypatch, bf16, expected):
    from fedllm_flwr.model import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == expected


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_precision_on_cpu_is_bf16_only_where_the_cpu_computes_in_it(monkeypatch, native, expected):
    """An AVX2-only CPU emulates bf16 matmuls ~50x slower than fp32: auto must not pick them there."""
    from fedllm_flwr import model

    monkeypatch.setattr(model, "cpu_has_bf16", lambda: native)
    assert model.resolve_dtype("auto", torch.device("cpu")) == expected
    assert model.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # asked for, it is kept


def _step_gradients(model, micro_batches, monkeypatch, **train_kwargs):
    """The gradients of one optimizer step over `micro_batches` (the step itself not taken)."""
    seen = {}

    def record(self, *args, **kwargs):
        seen.update({id(p): p.grad.detach().clone() for group in self.param_groups for p in group["params"]})

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = TrainConfig(local_steps=1, grad_accum=len(micro_batches), max_grad_norm=0.0, lr_schedule="constant")
    train_steps(model, iter(micro_batches), cfg, compute_dtype=torch.float32, **train_kwargs)
    return [seen[id(p)] for p in model.parameters() if p.requires_grad]


def _lm_rows(cfg, bundle):
    """Four examples; the first two keep only their last response token, so the two
    micro-batches predict 2 and dozens of tokens."""
    from fedllm_flwr.data.prompts import IGNORE_INDEX, collate
    from fedllm_flwr.lm_loss import response_tokens

    data = client_data(cfg, bundle.tokenizer, 0, 1)
    rows = [data.train.example(i) for i in range(4)]
    ids = [r[0] for r in rows]
    labels = [[IGNORE_INDEX] * (len(r[1]) - 1) + r[1][-1:] if i < 2 else r[1] for i, r in enumerate(rows)]
    pad = bundle.tokenizer.pad_token_id
    micro = [collate(ids[:2], labels[:2], pad), collate(ids[2:], labels[2:], pad)]
    assert [response_tokens(b) for b in micro][0] == 2 < response_tokens(micro[1])
    return micro, [collate(ids, labels, pad)], {}


def _reward_rows(cfg, bundle):
    """Micro-batches of 1 pair and 3 pairs."""
    from fedllm_flwr.data.pairs import collate_pairs, pair_count
    from fedllm_flwr.tasks.reward import reward_loss_fn

    data = client_data(cfg, bundle.tokenizer, 0, 1)
    rows = [data.train.example(i) for i in range(4)]
    pad = bundle.tokenizer.pad_token_id
    micro = [collate_pairs(rows[:1], pad), collate_pairs(rows[1:], pad)]
    return micro, [collate_pairs(rows, pad)], {"loss_fn": reward_loss_fn(cfg.reward_loss), "items_fn": pair_count}


def _dpo_rows(cfg, bundle):
    """Micro-batches of 1 pair and 3 pairs, under the DPO loss (policy against the adapter-off reference)."""
    from fedllm_flwr.tasks.dpo import dpo_loss_fn

    micro, whole, kwargs = _reward_rows(cfg, bundle)
    return micro, whole, {**kwargs, "loss_fn": dpo_loss_fn(cfg.dpo_loss)}


@pytest.mark.parametrize(("task", "rows"), [("lm", _lm_rows), ("reward", _reward_rows), ("dpo", _dpo_rows)])
def test_accumulated_micro_batches_give_the_gradient_of_one_large_batch(tiny_cfg, monkeypatch, task, rows):
    """Each micro-batch counts by its items (response tokens; pairs), not as an equal share."""
    clear_model_cache()
    cfg = tiny_cfg("peft.dropout=0", "train.precision=fp32", *([f"task={task}"] if task != "lm" else []))
    bundle = build_model(cfg.model, cfg.peft, "fp32", cfg.seed, task_type=TASKS[task].peft_task_type)
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient
        for p in bundle.model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)
    micro, whole, kwargs = rows(cfg, bundle)
    accumulated = _step_gradients(bundle.model, micro, monkeypatch, **kwargs)
    large = _step_gradients(bundle.model, whole, monkeypatch, **kwargs)
    assert all(g.abs().max() > 0 for g in large)
    for a, b in zip(accumulated, large, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_fp16_loss_scaler_skips_a_step_with_a_non_finite_loss(setup, monkeypatch):
    """On CUDA in fp16 an overflowing loss skips its step instead of ending the client's
    round (here with the CPU's GradScaler, which works the same way)."""
    import fedllm_flwr.train as train
    from fedllm_flwr.lm_loss import lm_loss

    cfg, bundle, data = setup
    monkeypatch.setattr(train, "grad_scaler", lambda device, dtype: torch.amp.GradScaler("cpu"))
    calls = []

    def overflowing_second_step(model, batch):
        calls.append(1)
        loss = lm_loss(model, batch)
        return loss * float("inf") if len(calls) == 2 else loss

    taken = count_optimizer_steps(monkeypatch)
    result = train_steps(
        bundle.model,
        iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, 0),
        TrainConfig(local_steps=3),
        loss_fn=overflowing_second_step,
    )
    assert len(calls) == 3 and len(taken) == 2 and result.skipped_steps == 1
    assert math.isfinite(result.loss) and result.steps == 3
    calls.clear()
    monkeypatch.setattr(train, "grad_scaler", lambda device, dtype: None)
    with pytest.raises(FloatingPointError, match="non-finite loss"):  # no scaler: a non-finite loss is an error
        train_steps(bundle.model, iter_batches(data.train, 4, bundle.tokenizer.pad_token_id, 0),
                    TrainConfig(local_steps=3), loss_fn=overflowing_second_step)  # fmt: skip
