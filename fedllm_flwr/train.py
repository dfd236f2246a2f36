"""The local training loop: plain PyTorch, no Flower.

`train_steps` runs a fixed number of optimizer steps of the trainable (adapter)
parameters on a batch stream and returns what happened. Whether the steps are
one client's round or a centralized run is the caller's business.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedllm_flwr.config import TrainConfig
from fedllm_flwr.lm_loss import lm_loss, response_tokens
from fedllm_flwr.metrics import peak_memory_mb

if TYPE_CHECKING:
    from fedllm_flwr.privacy.dp_sgd import RecordDP


@contextmanager
def checkpointing(model: torch.nn.Module, enabled: bool, every: int = 1):
    """Gradient checkpointing of the decoder layers for the duration of a block:
    the activations of one layer in `every` are recomputed in the backward pass
    instead of kept."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled or not getattr(base, "supports_gradient_checkpointing", False):
        yield
        return
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old names warn
        base.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every)
        disable = base.activation_checkpointing_disable
    else:
        if every != 1:
            raise ValueError("train.checkpoint_every > 1 needs transformers with activation_checkpointing_enable")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = base.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate at global step `step` (0-based) of `total_steps`.

    The schedule spans all rounds: a client in round r starts at step
    (r - 1) * local_steps, so the rate keeps decaying across rounds.
    The cosine is the curve of transformers' `get_cosine_with_min_lr_schedule_with_warmup`
    (min_lr_rate 0.1), kept here as a function of the step because the server needs a
    round's rate without an optimizer (MIFA's lr_t) and a client starts mid-schedule.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = 0.1 * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _adalora_model(model: torch.nn.Module):
    """The AdaLoRA tuner inside a PEFT model, or None."""
    tuner = getattr(model, "base_model", None)
    return tuner if hasattr(tuner, "update_and_allocate") and hasattr(tuner, "rankallocator") else None


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16 on CUDA, where small gradients would underflow; bf16 and
    fp32 keep fp32's exponent range and need none."""
    return torch.amp.GradScaler("cuda") if device.type == "cuda" and dtype == torch.float16 else None


def _to(batch: dict, device: torch.device) -> dict:
    """A batch's tensors on `device`; anything else a task's collate adds (task=grpo's
    prompts and records) as it is."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_in(autocast, loss_fn: Callable, model: torch.nn.Module, batch: dict) -> torch.Tensor:  # noqa: ANN001
    with autocast:
        return loss_fn(model, batch)


@dataclass
class TrainResult:
    loss: float
    """Mean over the optimizer steps of each step's loss, itself the mean over the
    items (response tokens, or pairs) of its micro-batches."""
    steps: int
    """Optimizer steps asked for, including those the loss scaler skipped."""
    examples: int
    tokens: int
    """Non-padding tokens processed."""
    seconds: float
    peak_memory_mb: float
    skipped_steps: int = 0
    """Steps not taken: the fp16 loss scaler found a non-finite loss or gradient, or
    no micro-batch had an item to learn from."""


def train_steps(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    start_step: int = 0,
    total_steps: int | None = None,
    prox_mu: float = 0.0,
    compute_dtype: torch.dtype | None = None,
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    items_fn: Callable[[dict[str, torch.Tensor]], int] = response_tokens,
    private: RecordDP | None = None,
) -> TrainResult:
    """Run `cfg.local_steps` AdamW steps, each over `cfg.grad_accum` micro-batches.

    Only parameters with `requires_grad` are optimized (the adapter, kept fp32).
    The forward pass runs under autocast to `compute_dtype` (default: the dtype
    of the frozen weights); on CUDA in fp16 the loss is scaled with a
    GradScaler, which skips a step whose loss or gradients are not finite (any
    other precision raises FloatingPointError on a non-finite loss). The
    optimizer state is fresh each call, as in FedAvg's local solver.

    A step's gradient is that of the mean loss over every item of its
    micro-batches: `loss_fn` returns a micro-batch's mean over its items
    (`items_fn`: response tokens by default, pairs for task=reward), weighted by
    that micro-batch's share of the step's items, so a micro-batch of 3 response
    tokens counts a hundredth of one of 300, as in one large batch (transformers
    does the same with `num_items_in_batch`). `loss_fn(model, batch)` is the
    task loss (default: `lm_loss`; a pairwise reward loss for task=reward).

    With `prox_mu` > 0 (FedProx), mu/2 * ||w - w_start||^2 over the trainable
    weights is added once per step, w_start being the weights the call began
    with (the global adapter); the reported loss stays the task loss.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dtype = compute_dtype or next(p.dtype for p in model.parameters() if not p.requires_grad)
    scaler = grad_scaler(device, dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if half else nullcontext()
    loss_fn = loss_fn or (lambda m, b: lm_loss(m, b, cfg.response_logits))
    total = total_steps or cfg.local_steps
    adalora = _adalora_model(model)
    if adalora is not None:
        # The rank budget follows the whole run's schedule; importance scores start
        # afresh each call, so a worker serving several clients never mixes them.
        adalora.peft_config[adalora.trainable_adapter_name].total_step = total
        adalora.rankallocator.reset_ipt()
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else []
    model.train()
    t0 = time.perf_counter()
    step_losses, examples, tokens, skipped = [], 0, 0, 0
    with checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_every):
        for step in range(cfg.local_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(start_step + step, total, cfg)
            optimizer.zero_grad(set_to_none=True)
            if private is not None:
                if scaler is not None:
                    raise ValueError("privacy=dp_sgd clips fp32 record gradients; fp16 loss scaling is not supported")
                records = [_to(record, device) for record in next(batches)]
                step_loss, used = private.gradient(params, records, lambda b: _loss_in(autocast, loss_fn, model, b),
                                                   items_fn)  # fmt: skip
                examples += used
                tokens += sum(int(record["attention_mask"].sum()) for record in records)
                for p, a in zip(params, anchors, strict=False):  # FedProx: the term's gradient, data-free
                    p.grad.add_(p.detach() - a, alpha=prox_mu)
                optimizer.step()
                if math.isfinite(step_loss):
                    step_losses.append(step_loss)
                if adalora is not None:
                    adalora.update_and_allocate(start_step + step)
                continue
            # The step's micro-batches are drawn first: each one's weight needs the step's item count.
            micro = [_to(next(batches), device) for _ in range(cfg.grad_accum)]
            counts = [items_fn(batch) for batch in micro]
            n_items = sum(counts)
            if n_items == 0:  # nothing to predict in any micro-batch: no gradient, no step
                skipped += 1
                continue
            step_loss = 0.0
            for batch, count in zip(micro, counts, strict=True):
                examples += batch["input_ids"].shape[0]
                tokens += int(batch["attention_mask"].sum())
                if count == 0:
                    continue
                with autocast:
                    loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    if scaler is None:
                        raise FloatingPointError(f"non-finite loss {loss.item()} at local step {step}")
                    step_loss = math.nan  # the scaler finds the non-finite gradients and skips the step
                objective = loss * (count / n_items)
                if anchors:
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    objective = objective + 0.5 * prox_mu * drift / cfg.grad_accum
                (scaler.scale(objective) if scaler else objective).backward()
                step_loss += loss.item() * count / n_items
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if scaler:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped += int(scaler.get_scale() < scale)  # a skipped step lowers the scale
            else:
                optimizer.step()
            if math.isfinite(step_loss):
                step_losses.append(step_loss)
            if adalora is not None:
                adalora.update_and_allocate(start_step + step)  # needs this step's gradients
    model.eval()
    if not step_losses and private is None:  # a DP step may draw no record
        raise FloatingPointError(f"none of the {cfg.local_steps} local steps had a finite loss to learn from")
    return TrainResult(
        loss=sum(step_losses) / len(step_losses) if step_losses else math.nan,
        steps=cfg.local_steps,
        examples=examples,
        tokens=tokens,
        seconds=time.perf_counter() - t0,
        peak_memory_mb=peak_memory_mb(device),
        skipped_steps=skipped,
    )
