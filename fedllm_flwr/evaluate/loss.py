"""Held-out loss and perplexity on response tokens."""

from __future__ import annotations

import math

import torch

from fedllm_flwr.data.prompts import TokenizedSet, collate
from fedllm_flwr.lm_loss import lm_loss, response_tokens


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: TokenizedSet, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean cross-entropy over response tokens, and its exp.

    `lm_loss` scores the same response tokens for every method (prompt-learning
    methods, whose virtual tokens lengthen the logits, through the model's own loss).
    """
    if len(data) == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data.input_ids[start : start + batch_size], data.labels[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        n_targets = response_tokens(batch)
        total += lm_loss(model, batch).float().item() * n_targets
        count += n_targets
    mean = total / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
