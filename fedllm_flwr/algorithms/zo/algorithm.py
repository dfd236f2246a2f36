"""The zeroth-order plug-in (`Zo`): what the core asks of `algorithm=zo`. Light at
import: each method imports the modules it needs (see the package's docstring)."""

from __future__ import annotations

import functools
from typing import Any

from flwr.app import RecordDict

from fedllm_flwr.algorithms.base import Algorithm, ServerModel


class Zo(Algorithm):
    """Seed lists both ways; each node keeps its own copy of the global model."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        if cfg.zo.params == "full":  # the tuned model is the base weights: saved whole, as model/final only
            self.model_saver = _save_full_model

    @functools.cached_property
    def pool(self):  # noqa: ANN201 - a mezo.SeedPool
        """The run's seed pool and its fingerprint, built on first use and then kept: once
        per run on the server, once per message on a node (catch-up and round share it)."""
        from fedllm_flwr.algorithms.zo.mezo import SeedPool

        return SeedPool.of(self.cfg.seed, self.cfg.zo.num_seeds)

    def train(self, cfg: Any, content: RecordDict, node: Any, partition_id: int, num_partitions: int) -> RecordDict:
        from fedllm_flwr.algorithms.zo.node import train_reply

        ledger = node.dp if cfg.privacy.record_level else None
        return train_reply(cfg, self.pool, content, node.zo, node.identity, partition_id, num_partitions, ledger)

    def evaluated_adapter(self, cfg: Any, content: RecordDict, node: Any, partition_id: int) -> dict:
        """The node's adapter after the steps the message carries; zo.params=full: the
        initial one ({}), the weights are in the model."""
        from fedllm_flwr.algorithms.zo.node import catch_up

        return catch_up(cfg, self.pool, content, node.zo, node.identity, partition_id) or {}

    def server_model(self) -> ServerModel:
        model = super().server_model()
        if self.cfg.zo.params == "full":  # the base weights are the global model
            from fedllm_flwr.algorithms.zo.full_weights import base_weights, reset_to_base

            reset_to_base(base_weights(model.bundle.model), model.bundle.base_path)
        return model

    def strategy(self, model: Any) -> dict[str, Any]:
        """`SeedFederation` over the tensors `zo.params` tunes in the server's `model`
        (zo.params=full: its base weights, which the steps move in place)."""
        from fedllm_flwr.algorithms.zo.mezo import tuned_tensors
        from fedllm_flwr.algorithms.zo.strategy import SeedFederation

        if model is None:
            raise ValueError("algorithm=zo: the strategy needs the server's model (the tensors its steps tune)")
        tuned = tuned_tensors(model, self.cfg.zo.params)
        return {"override": SeedFederation, "pool": self.pool.seeds, "order": list(tuned),
                "weights": tuned if self.cfg.zo.params == "full" else None}  # fmt: skip


def _save_full_model(bundle: Any, target: Any) -> Any:
    """The base weights of `bundle`'s model as a model folder transformers loads."""
    from fedllm_flwr.algorithms.zo.full_weights import base_weights, save_model

    return save_model(bundle.model, bundle.tokenizer, base_weights(bundle.model), target)
