"""The federated algorithms (`cfg.algorithm.name`), one plug-in each, found by name.

- `none` (`backprop`): nodes train the adapter a message carries with backprop;
- `fedot`: offsite tuning, nodes train against an emulator of the base model;
- `zo`: zeroth-order steps, messages of seed indices and coefficients.

The core asks `algorithm_for(cfg)` (an `Algorithm`, `base.py`) what to do and never
tests the name. Adding an algorithm costs a package here, a YAML in conf/algorithm/,
an entry in `ALGORITHMS` and a row in tests/combinations.py (tests/test_algorithms.py
keeps the four in step). Light at import: each plug-in imports its heavy modules when
a method needs them.
"""

from __future__ import annotations

from typing import Any

from fedllm_flwr.algorithms.backprop import Backprop
from fedllm_flwr.algorithms.base import Algorithm, ServerModel
from fedllm_flwr.algorithms.fedot import Fedot
from fedllm_flwr.algorithms.zo import Zo

ALGORITHMS: dict[str, type[Algorithm]] = {"none": Backprop, "fedot": Fedot, "zo": Zo}

__all__ = ["ALGORITHMS", "Algorithm", "ServerModel", "algorithm_for"]


def algorithm_for(cfg: Any) -> Algorithm:
    """The plug-in of `cfg.algorithm.name`, built for `cfg`."""
    return ALGORITHMS[cfg.algorithm.name](cfg)
