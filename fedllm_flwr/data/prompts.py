"""Alpaca-style prompts, tokenization with the loss masked on the prompt, collation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
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


Example = tuple[list[int], list[int]]
"""(input ids, labels) of one training example."""


@dataclass
class TokenizedSet:
    """Examples ready for training: input ids, labels with the prompt masked."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int
    """Samples dropped because truncation left no response token."""

    def __len__(self) -> int:
        return len(self.input_ids)

    def example(self, index: int) -> Example | None:
        return self.input_ids[index], self.labels[index]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def bos_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and _adds_bos(tokenizer) else []


def tokenize_example(record: dict[str, str], tokenizer, max_seq_len: int, bos: list[int]) -> Example | None:
    """Prompt + response + EOS cut to `max_seq_len`, labels masked on the prompt;
    None when the prompt alone fills `max_seq_len` (no target token is left)."""
    prompt = bos + tokenizer.encode(
        format_prompt(record["instruction"], record.get("input", "")), add_special_tokens=False
    )
    target = tokenizer.encode(record["output"], add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = (prompt + target)[:max_seq_len]
    n_prompt = min(len(prompt), len(ids))
    if n_prompt >= len(ids):
        return None
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def tokenize_question(record: dict[str, str], tokenizer, max_seq_len: int, bos: list[int]):
    """(prompt ids, the record) for a task that samples its own answers (task=grpo): the
    prompt up to the response header, and the record its reward functions read; None
    when the prompt leaves no room for an answer within `max_seq_len`."""
    prompt = bos + tokenizer.encode(
        format_prompt(record["instruction"], record.get("input", "")), add_special_tokens=False
    )
    return (prompt, record) if len(prompt) < max_seq_len else None


def tokenize_records(records: Iterable[dict[str, str]], tokenizer, max_seq_len: int) -> TokenizedSet:
    """Tokenize every record (see `tokenize_example`).

    Labels are IGNORE_INDEX on prompt tokens, so the loss covers the response
    only. A sample whose prompt fills `max_seq_len` would have no target token
    (a NaN loss); it is dropped and counted instead.
    """
    out = TokenizedSet([], [], 0)
    bos = bos_ids(tokenizer)
    for rec in records:
        example = tokenize_example(rec, tokenizer, max_seq_len, bos)
        if example is None:
            out.dropped += 1
            continue
        out.input_ids.append(example[0])
        out.labels.append(example[1])
    return out


class LazyExamples:
    """Training records tokenized when first drawn, not all up front.

    A client draws `local_steps x batch_size` examples a round, often a small
    share of its partition (3 rounds x 10 steps x batch 4 = 120 of the 21,051
    Alpaca records a client holds with 2 clients): tokenizing all of them first
    cost ~10 s and ~1 GB of Python lists per client process. `records` is any
    indexable sequence of records (a `datasets.Dataset` view costs no copy).
    """

    def __init__(self, records: Sequence[dict[str, str]], tokenizer, max_seq_len: int, tokenize=None) -> None:
        self.records, self.tokenizer, self.max_seq_len = records, tokenizer, max_seq_len
        self.tokenize = tokenize or tokenize_example
        """(record, tokenizer, max_seq_len, bos) -> example or None; a preference
        pair for task=reward (`fedllm_flwr.data.pairs.tokenize_pair`)."""
        self.bos_ids = bos_ids(tokenizer)
        self._cache: dict[int, Example | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int) -> Example | None:
        """The tokenized record, or None when truncation leaves it no target token."""
        if index not in self._cache:
            self._cache[index] = self.tokenize(self.records[index], self.tokenizer, self.max_seq_len, self.bos_ids)
        return self._cache[index]

    @property
    def dropped(self) -> int:
        """Records dropped by truncation among those drawn so far."""
        return sum(1 for example in self._cache.values() if example is None)


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


def _positions(n: int, seed: int, position: int) -> Iterator[int]:
    """Indices of the concatenated per-epoch permutations of range(n), from `position` on."""
    epoch, offset = divmod(position, n)
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        yield from order[offset:]
        epoch, offset = epoch + 1, 0


def collate_examples(rows: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    return collate([ids for ids, _ in rows], [labels for _, labels in rows], pad_id)


def iter_batches(
    data: TokenizedSet | LazyExamples, batch_size: int, pad_id: int, seed: int, start: int = 0, collate_fn=None
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of shuffled batches, starting at batch number `start`.

    Batch k holds examples [k*bs, (k+1)*bs) of the concatenated per-epoch
    permutations, so a client resuming at `start` in the next round continues
    through its data instead of replaying the first batches. Records of a
    `LazyExamples` that truncation drops are skipped where they fall.
    `collate_fn(rows, pad_id)` makes a batch (default: prompt-masked LM examples).
    """
    collate_fn = collate_fn or collate_examples
    n = len(data)
    if n == 0:
        raise ValueError("no training examples")
    # An eager set holds no dropped records, so batch `start` begins at a known position;
    # a lazy one is walked from the beginning (cached, so only the first time costs).
    eager = isinstance(data, TokenizedSet)
    skip = 0 if eager else start * batch_size
    rows: list[Example] = []
    misses = 0
    for index in _positions(n, seed, start * batch_size if eager else 0):
        example = data.example(index)
        if example is None:
            misses += 1
            if misses >= n:
                raise ValueError("no training examples: truncation to max_seq_len drops every record")
            continue
        misses = 0
        if skip:
            skip -= 1
            continue
        rows.append(example)
        if len(rows) == batch_size:
            yield collate_fn(rows, pad_id)
            rows = []
