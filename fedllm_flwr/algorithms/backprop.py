"""Plain adapter tuning (`algorithm=none`): each node trains the adapter a message
carries with backprop on the full base model and replies with its update. Its steps
are the core's own (`fedllm_flwr.node.train`, `fedllm_flwr.client.local_train`), so
the plug-in keeps every default of `Algorithm`."""

from __future__ import annotations

from fedllm_flwr.algorithms.base import Algorithm


class Backprop(Algorithm):
    """Adapters both ways, the base model whole on every node."""
