"""Held-out loss and perplexity on response tokens."""

from __future__ import annotations

import math

import torch

from fedllm_flwr.data.prompts import IGNORE_INDEX, TokenizedSet, collate


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, data: TokenizedSet, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean cross-entropy over response tokens, and its exp."""
    if len(data) == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate(data.input_ids[start : start + batch_size], data.labels[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += loss.item()
        count += int((shift_labels != IGNORE_INDEX).sum())
    mean = total / count
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}
