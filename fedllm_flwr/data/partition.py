"""Split a dataset across clients with flwr-datasets partitioners.

`iid` and `dirichlet` use flwr-datasets' partitioners directly. `natural` gives
each client one value of a column (its category) through `NaturalIdPartitioner`;
when the number of clients differs from the number of values, values are first
mapped to client groups (round-robin when there are more values than clients,
shared by several clients when there are fewer), so any `num-partitions` works.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import random
import sys
import types

from datasets import Dataset


class _Deferred(types.ModuleType):
    """Stands in for a module until something is looked up in it, then loads it.

    Dunder lookups other than `__all__` do not load it: tools that scan
    `sys.modules` (inspect, torch at import) ask every module for `__file__`."""

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            raise AttributeError(attr)
        sys.modules.pop(self.__name__, None)
        real = importlib.import_module(self.__name__)
        self.__dict__.update(real.__dict__)  # whoever holds the stand-in now sees the module
        return getattr(real, attr)


def _defer_flwr_datasets_plots() -> None:
    """Load `flwr_datasets.visualization` on first use rather than with the package.

    flwr_datasets' `__init__` imports its plotting helpers (seaborn, scipy,
    matplotlib): over 1 s of what it takes a simulation worker, and the
    ServerApp, to import our stack at every run's start. We only partition; the
    subpackage still loads in full when anything in it is used.
    """
    name = "flwr_datasets.visualization"
    if "flwr_datasets" in sys.modules or name in sys.modules:
        return
    package = importlib.util.find_spec("flwr_datasets")  # a top-level spec: imports nothing
    if package is None or not package.submodule_search_locations:
        return
    stand_in = _Deferred(name)
    # Its submodules stay importable without loading it.
    stand_in.__path__ = [os.path.join(p, "visualization") for p in package.submodule_search_locations]
    sys.modules[name] = stand_in


_defer_flwr_datasets_plots()

from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner  # noqa: E402

from fedllm_flwr.config import PartitionConfig  # noqa: E402
from fedllm_flwr.errors import UserError  # noqa: E402

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
