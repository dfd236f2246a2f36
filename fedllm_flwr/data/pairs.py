"""Preference pairs (task=reward, task=dpo): a prompt with a chosen and a rejected
response, tokenized as prompt + response + EOS on each side, and batched side by side.

EOS closes both responses as in TRL's DPOTrainer and RewardTrainer (which append it
to the text unless it already ends with it): a DPO policy learns where a preferred
answer stops, and a reward model scores the finished response."""

from __future__ import annotations

from typing import NamedTuple

import torch

from fedllm_flwr.data.prompts import IGNORE_INDEX, bos_ids, format_prompt


class Pair(NamedTuple):
    """Token ids of prompt + chosen + EOS and of prompt + rejected + EOS, and the prompt's length."""

    chosen: list[int]
    rejected: list[int]
    prompt: int


def tokenize_pair(record: dict[str, str], tokenizer, max_seq_len: int, bos: list[int]) -> Pair | None:
    """Both sides of a pair as prompt + response + EOS (one EOS: none is added to a
    response that ends with it), cut to `max_seq_len`; None (the record is dropped
    and counted) for an empty response, or when the cut leaves the two identical
    (nothing tells them apart: identical texts, or a prompt that fills
    `max_seq_len`) or leaves a side no response token."""
    prompt = record.get("instruction", "")
    head = bos + (tokenizer.encode(format_prompt(prompt, record.get("input", "")), add_special_tokens=False)
                  if prompt else [])  # fmt: skip
    eos = tokenizer.eos_token_id
    responses = [tokenizer.encode(record[key], add_special_tokens=False) for key in ("chosen", "rejected")]
    if not all(responses):
        return None
    sides = [(head + r + ([] if r[-1] == eos else [eos]))[:max_seq_len] for r in responses]
    if sides[0] == sides[1] or min(len(side) for side in sides) <= len(head):
        return None
    return Pair(sides[0], sides[1], len(head))


class PairSet:
    """Tokenized pairs (held-out and test sets), with the count that truncation dropped."""

    def __init__(self, records: list[dict[str, str]], tokenizer, max_seq_len: int) -> None:
        bos = bos_ids(tokenizer)
        tokenized = [tokenize_pair(r, tokenizer, max_seq_len, bos) for r in records]
        self.pairs = [p for p in tokenized if p is not None]
        self.dropped = len(tokenized) - len(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def collate_pairs(rows: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as one right-padded batch of 2B sequences: the B chosen, then the B
    rejected; `labels` are the ids with prompt and padding masked (task=dpo)."""
    sequences = [(r.chosen, r.prompt) for r in rows] + [(r.rejected, r.prompt) for r in rows]
    width = max(len(s) for s, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, prompt) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, prompt : len(seq)] = ids[row, prompt : len(seq)]
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs a `collate_pairs` batch holds: the items a pairwise loss averages over."""
    return batch["input_ids"].shape[0] // 2
