"""The `global` and `local` scenarios, as AdapterFedAvg variants in the same app.

- `GlobalFedAvg` (scenario=global): one holder of all training data. Each round a
  single sampled node trains on the union of all partitions for as many steps as
  all fed clients together take, so the total number of optimizer steps and the
  evaluation match the fed scenario. A simulation baseline: it needs a node that
  may read all the data.
- `LocalAdapters` (scenario=local): every node trains its own adapter on its own
  data; nothing is averaged. The server keeps one adapter per node, sends each
  node its own, and evaluates each one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fedllm_flwr.keys import DATA_KEY, STEPS_KEY
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.replies import ValidReply
from fedllm_flwr.strategy.round_setup import RoundSetup

if TYPE_CHECKING:
    from fedllm_flwr.config import Config


class GlobalFedAvg(AdapterFedAvg):
    holds_all_data = True

    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        return {"local_steps": cfg.train.local_steps}

    def __init__(self, *, local_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_steps = local_steps

    def select_train(self, server_round: int, messages: list[Message]) -> list[Message]:
        chosen = messages[0]  # nodes were sampled at random
        config = ConfigRecord(dict(chosen.content["config"].items()))
        config[DATA_KEY] = "all"
        config[STEPS_KEY] = self.local_steps * len(messages)
        chosen.content["config"] = config
        return [chosen]


class LocalAdapters(AdapterFedAvg):
    finds_nodes_by_partition = True  # a resumed run's adapters are kept by partition (`arrays_for`)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapters: dict[int, ArrayRecord] = {}
        """Each node's own adapter (fp32), by node id."""
        self.partitions: dict[int, int] = {}
        """Each node's partition id, as it reported it."""
        self.restored: dict[int, ArrayRecord] = {}
        """Adapters of a resumed run by partition, until their node is known."""

    def arrays_for(self, node_id: int, global_arrays: ArrayRecord) -> ArrayRecord:
        if node_id not in self.adapters and node_id in self.nodes:  # a resumed run: find it by partition
            restored = self.restored.pop(int(self.nodes[node_id]["partition-id"]), None)
            if restored is not None:
                self.adapters[node_id] = restored
                self.partitions[node_id] = int(self.nodes[node_id]["partition-id"])
        return self.adapters.get(node_id, global_arrays)

    def state(self) -> dict[str, np.ndarray]:
        return {f"{pid}/{k}": v.numpy() for pid, arrays in self.client_adapters().items() for k, v in arrays.items()}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        by_partition: dict[int, dict[str, np.ndarray]] = {}
        for key, value in arrays.items():
            pid, name = key.split("/", 1)
            by_partition.setdefault(int(pid), {})[name] = value
        self.restored = {pid: ArrayRecord({k: Array(v) for k, v in st.items()}) for pid, st in by_partition.items()}

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        for reply in valid:
            self.adapters[reply.node_id] = ArrayRecord({k: Array(v) for k, v in reply.state.items()})
            metrics = next(iter(reply.content.metric_records.values()))
            self.partitions[reply.node_id] = int(metrics.get("partition-id", reply.node_id))
        return None  # no global adapter: the initial one stays as Flower's `arrays`

    def client_adapters(self) -> dict[int, ArrayRecord]:
        """Adapters by partition id."""
        return {self.partitions[node]: arrays for node, arrays in sorted(self.adapters.items())}
