"""Preference pairs (task=reward): a prompt with a chosen and a rejected response,
tokenized as prompt + response on each side, and batched side by side."""

from __future__ import annotations

import torch

from fedllm_flwr.data.prompts import bos_ids, format_prompt

Pair = tuple[list[int], list[int]]
"""Token ids of prompt + chosen and of prompt + rejected."""


def tokenize_pair(record: dict[str, str], tokenizer, max_seq_len: int, bos: list[int]) -> Pair | None:
    """Both sides of a pair as prompt + response, cut to `max_seq_len`; None when
    the cut leaves the two identical (nothing tells them apart)."""
    prompt = record.get("instruction", "")
    head = bos + (tokenizer.encode(format_prompt(prompt, record.get("input", "")), add_special_tokens=False)
                  if prompt else [])  # fmt: skip
    sides = [(head + tokenizer.encode(record[key], add_special_tokens=False))[:max_seq_len]
             for key in ("chosen", "rejected")]  # fmt: skip
    return None if sides[0] == sides[1] else (sides[0], sides[1])


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
    """B pairs as one right-padded batch of 2B sequences: the B chosen, then the B rejected."""
    sequences = [chosen for chosen, _ in rows] + [rejected for _, rejected in rows]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs a `collate_pairs` batch holds: the items a pairwise loss averages over."""
    return batch["input_ids"].shape[0] // 2
