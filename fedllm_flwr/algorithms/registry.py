"""The algorithm registry: each `algorithm.name` to its plug-in (`compat.ALGORITHMS`)."""

from __future__ import annotations

from typing import Any

from fedllm_flwr.algorithms.backprop import Backprop
from fedllm_flwr.algorithms.base import Algorithm
from fedllm_flwr.algorithms.compat import ALGORITHMS as NAMES
from fedllm_flwr.algorithms.fedot.algorithm import Fedot
from fedllm_flwr.algorithms.zo.algorithm import Zo

_CLASSES = {kind.__name__: kind for kind in (Backprop, Fedot, Zo)}
#: algorithm.name -> its plug-in class.
ALGORITHMS: dict[str, type[Algorithm]] = {name: _CLASSES[kind] for name, kind in NAMES.items()}


def algorithm_for(cfg: Any) -> Algorithm:
    """The plug-in of `cfg.algorithm.name`, built for `cfg`."""
    return ALGORITHMS[cfg.algorithm.name](cfg)
