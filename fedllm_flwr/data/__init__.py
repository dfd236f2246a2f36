"""Data: sources, prompts, partitioning. `client_data` and `server_data` are the entry points."""

from __future__ import annotations

import functools
import itertools
from collections import Counter

from datasets import Dataset

from fedllm_flwr.config import Config
from fedllm_flwr.data.pairs import PairSet, tokenize_pair
from fedllm_flwr.data.partition import partition_dataset, split_holdout
from fedllm_flwr.data.prompts import LazyExamples, tokenize_question, tokenize_records
from fedllm_flwr.data.sources import load_records, to_dataset

#: How a client's training records are tokenized, by the records its task reads
#: (`fedllm_flwr.tasks.compat.TASK_RECORDS`); None: prompt-masked LM examples.
TOKENIZE = {"prompts": None, "pairs": tokenize_pair, "questions": tokenize_question}

_RECORDS: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]] = {}
_TRAIN_SETS: dict[str, Dataset] = {}


def _pairs(cfg: Config) -> bool:
    """Whether the task reads preference pairs (`fedllm_flwr.tasks.compat.TASK_RECORDS`)."""
    return cfg.task.pairs


def records(cfg: Config) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records of the configured dataset (preference pairs for
    task=reward), cached per process."""
    key = repr((cfg.dataset, cfg.seed, _pairs(cfg)))
    if key not in _RECORDS:
        _RECORDS[key] = load_records(cfg.dataset, cfg.seed, _pairs(cfg))
    return _RECORDS[key]


def train_set(cfg: Config) -> Dataset:
    """The training records as one Arrow-backed dataset, cached per process.

    Clients read only this (a partition is a view of it, not a copy); the record
    lists behind it are not kept, so a client process holds its data once.
    """
    key = repr((cfg.dataset, cfg.seed, _pairs(cfg)))
    if key not in _TRAIN_SETS:
        train = _RECORDS[key][0] if key in _RECORDS else load_records(cfg.dataset, cfg.seed, _pairs(cfg))[0]
        _TRAIN_SETS[key] = to_dataset(train)
    return _TRAIN_SETS[key]


def tokenize_set(cfg: Config, items: list[dict[str, str]], tokenizer):
    """Evaluation records tokenized for the configured task: a TokenizedSet, or a
    PairSet of preference pairs (task=reward)."""
    if _pairs(cfg):
        return PairSet(items, tokenizer, cfg.dataset.max_seq_len)
    return tokenize_records(items, tokenizer, cfg.dataset.max_seq_len)


class ClientData:
    """One client's training split (tokenized as drawn) and held-out split
    (tokenized when first evaluated)."""

    def __init__(self, cfg: Config, fit: Dataset, hold: Dataset, tokenizer) -> None:
        self.train = LazyExamples(fit, tokenizer, cfg.dataset.max_seq_len, TOKENIZE[cfg.task.records])
        self._cfg, self._hold, self._tokenizer = cfg, hold, tokenizer

    @functools.cached_property
    def holdout_records(self) -> list[dict[str, str]]:
        return self._hold.to_list()

    @functools.cached_property
    def holdout(self):
        return tokenize_set(self._cfg, self.holdout_records, self._tokenizer)


def client_data(cfg: Config, tokenizer, partition_id: int, num_partitions: int) -> ClientData:
    """One client's training split and held-out split."""
    part = partition_dataset(train_set(cfg), cfg.dataset.partition, partition_id, num_partitions, cfg.seed)
    fit, hold = split_holdout(part, cfg.dataset.partition.holdout_fraction, cfg.seed)
    return ClientData(cfg, fit, hold, tokenizer)


def train_size(cfg: Config, partition_id: int, num_partitions: int) -> int:
    """How many training records client `partition_id` of `num_partitions` holds
    (what it may claim as `num-examples`)."""
    part = partition_dataset(train_set(cfg), cfg.dataset.partition, partition_id, num_partitions, cfg.seed)
    return len(split_holdout(part, cfg.dataset.partition.holdout_fraction, cfg.seed)[0])


def main_category(cfg: Config, partition_id: int, num_partitions: int) -> str:
    """The most common category in a client's partition ("" when the data has none)."""
    part = partition_dataset(train_set(cfg), cfg.dataset.partition, partition_id, num_partitions, cfg.seed)
    counts = Counter(part["category"])
    return counts.most_common(1)[0][0] if counts else ""


def spread_subset(items: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """The first `limit` records taken round-robin across categories, so a subset
    keeps every category (in file order within each)."""
    by_category: dict[str, list[dict[str, str]]] = {}
    for item in items:
        by_category.setdefault(item.get("category", ""), []).append(item)
    interleaved = [r for group in itertools.zip_longest(*by_category.values()) for r in group if r is not None]
    return interleaved[:limit]


def test_records(cfg: Config) -> list[dict[str, str]]:
    """The server's test records: `eval.limit` of them (spread across categories), or all."""
    _, test = records(cfg)
    return spread_subset(test, cfg.eval.limit) if cfg.eval.limit else test


def server_data(cfg: Config, tokenizer):
    """The server's test records and their tokenized form (see `tokenize_set`)."""
    test = test_records(cfg)
    return test, tokenize_set(cfg, test, tokenizer)
