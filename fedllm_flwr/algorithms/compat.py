"""What the algorithms are called, and what each cannot serve (gathered from each
algorithm's own `compat`); `registry` maps each name to its class."""

from __future__ import annotations

from fedllm_flwr.algorithms.fedot import compat as fedot
from fedllm_flwr.algorithms.zo import compat as zo

#: algorithm.name -> the name of its plug-in class (`registry.ALGORITHMS`); `none` is backprop.
ALGORITHMS = {"none": "Backprop", "fedot": "Fedot", "zo": "Zo"}

CONFLICTS = (*fedot.CONFLICTS, *zo.CONFLICTS)
