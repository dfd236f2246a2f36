"""Shared fixtures: a tiny offline model folder and configs that use it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MINI = ROOT.parent / "shared" / "data" / "mini"
sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_tiny_model  # noqa: E402

from fedllm_flwr.config import Config, load_cfg  # noqa: E402

# Small enough that a config builds, trains and evaluates in well under a second.
TINY_OVERRIDES = [
    "dataset.synthetic.train_per_task=20",
    "dataset.synthetic.test_per_task=4",
    "train.local_steps=2",
    "train.batch_size=4",
    "eval.max_new_tokens=4",
]


def finite(value, low: float = -math.inf, high: float = math.inf) -> bool:
    """A number (not None, not NaN or Inf) within [low, high]."""
    return isinstance(value, int | float) and math.isfinite(value) and low <= value <= high


#: Modules whose slow tests start first, in this order (sweeps and deployments hold the
#: longest runs), so that under `pytest -n N` no long test starts last; the unit tests
#: fill the gaps at the end.
SLOW_FIRST = ("test_sweep.py", "test_deploy.py", "test_e2e.py", "test_smollm2.py")


def docs_hooks():
    """docs/hooks.py, which writes the docs' generated parts, as a module (MkDocs loads it
    by path; it needs MkDocs only to serve files, not to render a page)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    import torch

    # Tiny models gain nothing from threads, and `make test` runs three workers on two
    # cores: more threads than cores make every worker spin-wait for the others.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> tuple[int, int]:
        module = item.path.name
        order = SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)
        return (0 if item.get_closest_marker("slow") else 1, order)

    items.sort(key=rank)  # stable: each module keeps its own order


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Run folders and model caches go to the test's temp dir, never to $HOME."""
    monkeypatch.setenv("FEDLLM_FLWR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDLLM_FLWR_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_cfg(tiny_model_dir):
    def make(*overrides: str) -> Config:
        return load_cfg([f"model.name={tiny_model_dir}", *TINY_OVERRIDES, *overrides])

    return make


@pytest.fixture
def shared_mini() -> Path:
    if not SHARED_MINI.is_dir():
        pytest.skip("../shared/data/mini is not present (it is not part of a fresh clone)")
    return SHARED_MINI


@pytest.fixture
def task_identity(monkeypatch):
    """Flower Messages need a run id; outside a Flower run, set one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0, raising=False)
