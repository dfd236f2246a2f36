import subprocess
import sys

import pytest
from datasets import Dataset

from fedllm_flwr.config import PartitionConfig
from fedllm_flwr.data.partition import partition_dataset, split_holdout
from fedllm_flwr.errors import UserError


def make(categories: list[str], per: int) -> Dataset:
    rows = [(f"{c}-{i}", c) for c in categories for i in range(per)]
    return Dataset.from_dict({"instruction": [r[0] for r in rows], "category": [r[1] for r in rows]})


def parts(ds, method, n, **kw):
    cfg = PartitionConfig(method=method, **kw)
    return [partition_dataset(ds, cfg, pid, n, seed=0) for pid in range(n)]


@pytest.mark.parametrize("method", ["iid", "dirichlet", "natural"])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_partitions_cover_the_data_exactly_once(method, n):
    ds = make(["a", "b", "c", "d"], 30)
    chunks = parts(ds, method, n)
    ids = [x for chunk in chunks for x in chunk["instruction"]]
    assert sorted(ids) == sorted(ds["instruction"])
    assert all(len(chunk) > 0 for chunk in chunks)


def test_natural_one_category_per_client_when_counts_match():
    chunks = parts(make(["a", "b", "c"], 10), "natural", 3)
    assert [set(c["category"]) for c in chunks] == [{"a"}, {"b"}, {"c"}]


def test_natural_deals_categories_round_robin_to_fewer_clients():
    chunks = parts(make(["a", "b", "c", "d"], 10), "natural", 2)
    assert [set(c["category"]) for c in chunks] == [{"a", "c"}, {"b", "d"}]


def test_natural_shares_a_category_among_more_clients():
    chunks = parts(make(["a", "b"], 10), "natural", 4)
    assert [set(c["category"]) for c in chunks] == [{"a"}, {"b"}, {"a"}, {"b"}]
    assert [len(c) for c in chunks] == [5, 5, 5, 5]


def test_iid_is_balanced_and_dirichlet_is_skewed():
    ds = make(["a", "b", "c", "d"], 50)
    iid = parts(ds, "iid", 4)
    assert [len(c) for c in iid] == [50, 50, 50, 50]
    skewed = parts(ds, "dirichlet", 4, alpha=0.1)
    shares = [max(c["category"].count(k) for k in "abcd") / len(c) for c in skewed]
    assert max(shares) > 0.5  # some client is dominated by one category


def test_partitioning_is_seeded():
    ds = make(["a", "b"], 20)
    cfg = PartitionConfig(method="iid")
    assert (
        partition_dataset(ds, cfg, 0, 2, seed=1)["instruction"]
        == partition_dataset(ds, cfg, 0, 2, seed=1)["instruction"]
    )
    assert (
        partition_dataset(ds, cfg, 0, 2, seed=1)["instruction"]
        != partition_dataset(ds, cfg, 0, 2, seed=2)["instruction"]
    )


def test_bad_partition_requests():
    ds = make(["a"], 4)
    with pytest.raises(UserError, match="outside"):
        partition_dataset(ds, PartitionConfig(), 2, 2, 0)
    with pytest.raises(UserError, match="not a column"):
        partition_dataset(ds, PartitionConfig(by="kind"), 0, 2, 0)


def test_holdout_split():
    train, hold = split_holdout(make(["a"], 20), 0.1, seed=0)
    assert len(train) == 18 and len(hold) == 2
    assert not set(train["instruction"]) & set(hold["instruction"])


def test_partitioning_imports_no_plotting_stack_and_the_plots_still_load():
    """flwr_datasets' plotting helpers load when used, not with every worker's import."""
    code = (
        "import sys\n"
        "import fedllm_flwr.data.partition, fedllm_flwr.client, fedllm_flwr.server.run\n"
        "assert not {'seaborn', 'matplotlib', 'scipy.stats'} & set(sys.modules), 'plots imported'\n"
        "import flwr_datasets\n"
        "from flwr_datasets.visualization import plot_label_distributions\n"
        "assert callable(flwr_datasets.visualization.plot_comparison_label_distribution)\n"
        "assert 'seaborn' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
