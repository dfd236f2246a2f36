"""Sampling a group of answers per prompt, and the batch that scores them. No Flower.

Answers are sampled from the policy (the model with its adapter) with transformers'
`generate` (left-padded prompts, the KV cache, `num_return_sequences` = G), drawn from
torch's global generator, which the client seeds per (seed, round, client). An answer
ends at its first end-of-sequence token, which it keeps (as TRL's completion mask does),
or at `max_new_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedllm_flwr.data.prompts import IGNORE_INDEX


@dataclass
class Group:
    """Answers to a batch of prompts, G per prompt, the answers of one prompt together."""

    prompts: list[list[int]]
    """Each answer's prompt ids (each prompt repeated G times)."""
    answers: list[list[int]]
    """Each answer's ids, up to and including its end-of-sequence token."""
    ended: list[bool]
    """Whether the answer ended by itself (False: cut at max_new_tokens)."""


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `rows`, padded on the left for generation."""
    width = max(len(ids) for ids in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, prompt in enumerate(rows):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def sample_groups(
    model: torch.nn.Module, prompts: list[list[int]], *, group_size: int, temperature: float, top_p: float,
    max_new_tokens: int, eos_id: int, pad_id: int,
) -> Group:  # fmt: skip
    """`group_size` sampled answers to each prompt."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True, temperature=temperature,
            top_p=top_p, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=group_size,
            pad_token_id=pad_id, eos_token_id=eos_id,
        )  # fmt: skip
    finally:
        model.train(was_training)
    answers, ended = [], []
    for row in out[:, ids.shape[1] :].tolist():
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        answers.append(row[:end])
        ended.append(eos_id in row)
    repeated = [prompt for prompt in prompts for _ in range(group_size)]
    return Group(repeated, answers, ended)


def answer_batch(group: Group, pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + answer per row, right-padded, the answer's tokens labelled: the batch whose
    per-token log-probabilities the loss needs (`lm_loss.token_logps`)."""
    rows = [p + a for p, a in zip(group.prompts, group.answers, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(group.prompts, group.answers, strict=True)):
        ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        mask[i, : len(prompt) + len(answer)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
