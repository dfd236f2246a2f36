"""What the core asks an algorithm (`cfg.algorithm.name`), and the answers of one that
exchanges adapters trained by backprop: the defaults, which `Backprop` keeps and FedOT
and zeroth-order override where they differ.

The core (a node, the client loop, the server, a strategy) never tests the name; it
takes `algorithm_for(cfg)` and asks. Light at import: a node imports this before it
knows whether it will need torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import RecordDict


@dataclass
class ServerModel:
    """What the server federates: the model whose adapter travels, and what else the
    algorithm needs the run to carry."""

    bundle: Any
    """The `ModelBundle` whose adapter state is the global model's."""
    views: list | None = None
    """The models the server evaluates the adapter on (`server.evaluation.View`s);
    None: `bundle`."""
    client_config: dict[str, Any] = field(default_factory=dict)
    """Entries of every message's "config"."""
    broadcast: RecordDict | None = None
    """Records sent once to each node, with its first message."""


class Algorithm:
    """An algorithm whose messages carry adapters that nodes train with backprop
    (`fedllm_flwr.node.train`, `fedllm_flwr.client.local_train`). Built once per run on
    the server and once per message on a node; derived objects it needs are its state."""

    model_before_first_round: bool = True
    """Whether a node knows the model it trains before its first message (a warm-up
    loads it then); FedOT's emulator comes with that message."""
    server_writes_model_cache: bool = False
    """Whether the server writes into the model cache (`model.cache_dir`) whatever the
    model: checked writable before a run starts (fedllm_flwr/preflight.py), as it is for
    a GGUF converted there."""
    model_saver: Callable[[Any, Path], Path] | None = None
    """When set, the global model is the whole model, not an adapter: the server saves
    it with this (`bundle`, target folder) as `model/final` only."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # --- on a node: `cfg` is the config the node trains with (FedOT's is the emulator's) --
    def node_config(self, cfg: Any, content: RecordDict) -> Any:
        """The config a node trains and evaluates with, given the message."""
        return cfg

    def train(
        self, cfg: Any, content: RecordDict, node: Any, partition_id: int, num_partitions: int
    ) -> RecordDict | None:
        """The reply to a train message when the algorithm's messages are its own;
        None: the message carries an adapter and the node trains it (`node.train`)."""
        return None

    def evaluated_adapter(self, cfg: Any, content: RecordDict, node: Any, partition_id: int) -> dict | None:
        """The adapter state a node evaluates when the message does not carry it; None:
        the message's adapter."""
        return None

    # --- on the server -----------------------------------------------------------------
    def server_model(self) -> ServerModel:
        """The server's model, built once per run."""
        from fedllm_flwr.model import build_model
        from fedllm_flwr.tasks.registry import task_of

        cfg = self.cfg
        task_type = task_of(cfg).peft_task_type
        return ServerModel(build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task_type=task_type))

    def strategy(self, model: Any) -> dict[str, Any]:
        """`build_strategy`'s `override` and its arguments when the algorithm aggregates
        something else than adapters ({}: the configured strategy), given the server's model."""
        return {}

    def summary(self, strategy: Any, first: dict, last: dict, primary: str | None) -> dict | None:
        """The algorithm's figures for summary.json (under its name), or None."""
        return None
