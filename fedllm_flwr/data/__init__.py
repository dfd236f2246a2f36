"""Data: sources, prompts, partitioning. `client_data` and `server_data` are the entry points."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

from fedllm_flwr.config import Config
from fedllm_flwr.data.partition import partition_dataset, split_holdout
from fedllm_flwr.data.prompts import TokenizedSet, tokenize_records
from fedllm_flwr.data.sources import load_records, to_dataset

_RECORDS: dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]] = {}


def records(cfg: Config) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, test) records of the configured dataset, cached per process."""
    key = repr((cfg.dataset, cfg.seed))
    if key not in _RECORDS:
        _RECORDS[key] = load_records(cfg.dataset, cfg.seed)
    return _RECORDS[key]


@dataclass
class ClientData:
    train: TokenizedSet
    holdout: TokenizedSet
    holdout_records: list[dict[str, str]]


def client_data(cfg: Config, tokenizer, partition_id: int, num_partitions: int) -> ClientData:
    """One client's tokenized training split and held-out split."""
    train, _ = records(cfg)
    part = partition_dataset(to_dataset(train), cfg.dataset.partition, partition_id, num_partitions, cfg.seed)
    fit, hold = split_holdout(part, cfg.dataset.partition.holdout_fraction, cfg.seed)
    fit_records, hold_records = fit.to_list(), hold.to_list()
    return ClientData(
        train=tokenize_records(fit_records, tokenizer, cfg.dataset.max_seq_len),
        holdout=tokenize_records(hold_records, tokenizer, cfg.dataset.max_seq_len),
        holdout_records=hold_records,
    )


def main_category(cfg: Config, partition_id: int, num_partitions: int) -> str:
    """The most common category in a client's partition ("" when the data has none)."""
    train, _ = records(cfg)
    part = partition_dataset(to_dataset(train), cfg.dataset.partition, partition_id, num_partitions, cfg.seed)
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


def server_data(cfg: Config, tokenizer) -> tuple[list[dict[str, str]], TokenizedSet]:
    """The server's test records (`eval.limit` of them, spread across categories) and
    their tokenized form."""
    _, test = records(cfg)
    if cfg.eval.limit:
        test = spread_subset(test, cfg.eval.limit)
    return test, tokenize_records(test, tokenizer, cfg.dataset.max_seq_len)
