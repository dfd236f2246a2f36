"""Alpaca-style prompts, tokenization with the loss masked on the prompt, collation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt up to and including the response header."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


@dataclass
class TokenizedSet:
    """Examples ready for training: input ids, labels with the prompt masked."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int
    """Samples dropped because truncation left no response token."""

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize_records(records: Iterable[dict[str, str]], tokenizer, max_seq_len: int) -> TokenizedSet:
    """Tokenize prompt + response + EOS, cut to `max_seq_len`.

    Labels are IGNORE_INDEX on prompt tokens, so the loss covers the response
    only. A sample whose prompt fills `max_seq_len` would have no target token
    (a NaN loss); it is dropped and counted instead.
    """
    out = TokenizedSet([], [], 0)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []
    for rec in records:
        prompt = bos + tokenizer.encode(
            format_prompt(rec["instruction"], rec.get("input", "")), add_special_tokens=False
        )
        target = tokenizer.encode(rec["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (prompt + target)[:max_seq_len]
        n_prompt = min(len(prompt), len(ids))
        if n_prompt >= len(ids):
            out.dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append([IGNORE_INDEX] * n_prompt + ids[n_prompt:])
    return out


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids in input_ids)
    batch_ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    batch_labels = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(zip(input_ids, labels, strict=True)):
        batch_ids[row, : len(ids)] = torch.tensor(ids)
        batch_labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": mask}


def iter_batches(
    data: TokenizedSet, batch_size: int, pad_id: int, seed: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of shuffled batches, starting at batch number `start`.

    Batch k holds positions [k*bs, (k+1)*bs) of the concatenated per-epoch
    permutations, so a client resuming at `start` in the next round continues
    through its data instead of replaying the first batches.
    """
    n = len(data)
    if n == 0:
        raise ValueError("no training examples")
    position = start * batch_size
    while True:
        epoch, offset = divmod(position, n)
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=generator).tolist()
        rows = []
        while len(rows) < batch_size:
            if offset == n:
                epoch, offset = epoch + 1, 0
                generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
                order = torch.randperm(n, generator=generator).tolist()
            rows.append(order[offset])
            offset += 1
        position += batch_size
        yield collate([data.input_ids[i] for i in rows], [data.labels[i] for i in rows], pad_id)
