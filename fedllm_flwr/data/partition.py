"""Split a dataset across clients with flwr-datasets partitioners.

`iid` and `dirichlet` use flwr-datasets' partitioners directly. `natural` gives
each client one value of a column (its category) through `NaturalIdPartitioner`;
when the number of clients differs from the number of values, values are first
mapped to client groups (round-robin when there are more values than clients,
shared by several clients when there are fewer), so any `num-partitions` works.
"""

from __future__ import annotations

import contextlib
import io
import random

from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

from fedllm_flwr.config import PartitionConfig
from fedllm_flwr.errors import UserError

GROUP_COLUMN = "__group__"


def _natural_groups(values: list[str], num_partitions: int, seed: int) -> list[int]:
    """Client index for each record under the natural split."""
    order = list(dict.fromkeys(values))  # categories in order of first appearance
    k = len(order)
    if k >= num_partitions:
        return [order.index(v) % num_partitions for v in values]
    # Fewer categories than clients: clients p with p % k == c share category c.
    owners = {c: [p for p in range(num_partitions) if p % k == i] for i, c in enumerate(order)}
    rng = random.Random(seed)
    counters = {c: rng.randrange(len(owners[c])) for c in order}
    groups = []
    for v in values:
        groups.append(owners[v][counters[v] % len(owners[v])])
        counters[v] += 1
    return groups


def partition_dataset(
    dataset: Dataset, cfg: PartitionConfig, partition_id: int, num_partitions: int, seed: int
) -> Dataset:
    """The rows of `dataset` that belong to client `partition_id` of `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise UserError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if num_partitions == 1:
        return dataset
    if cfg.method != "iid" and cfg.by not in dataset.column_names:
        raise UserError(f"dataset.partition.by={cfg.by!r} is not a column; columns: {dataset.column_names}")
    if cfg.method == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = dataset.shuffle(seed=seed)
    elif cfg.method == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=cfg.by,
            alpha=cfg.alpha,
            min_partition_size=1,
            self_balancing=True,
            seed=seed,
        )
        partitioner.dataset = dataset
    else:
        groups = _natural_groups([str(v) for v in dataset[cfg.by]], num_partitions, seed)
        empty = sorted(set(range(num_partitions)) - set(groups))
        if empty:
            raise UserError(f"natural split by {cfg.by!r} leaves client(s) {empty} without data")
        partitioner = NaturalIdPartitioner(partition_by=GROUP_COLUMN)
        partitioner.dataset = dataset.add_column(GROUP_COLUMN, groups)
    # NaturalIdPartitioner draws a tqdm bar on stderr for a split of a few rows.
    with contextlib.redirect_stderr(io.StringIO()):
        part = partitioner.load_partition(partition_id)
    return part.remove_columns(GROUP_COLUMN) if GROUP_COLUMN in part.column_names else part


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) rows of one client's partition."""
    if fraction <= 0 or len(dataset) < 2:
        return dataset, dataset.select([])
    n_hold = max(1, round(len(dataset) * fraction))
    shuffled = dataset.shuffle(seed=seed)
    return shuffled.select(range(n_hold, len(shuffled))), shuffled.select(range(n_hold))
