"""Aggregation beyond FedAvg, over adapter weights only.

Every reply is decoded once (`AdapterFedAvg.validated`) into the adapter it stands for
and the update it carries; then Flower's own strategy does the arithmetic:

- `ServerOptFedAvg` (strategy=fedavgm|fedadam|fedyogi): Flower's FedAvgM, FedAdam or
  FedYogi step (Reddi et al. 2021, "Adaptive Federated Optimization"; Flower's FedAdam
  corrects the step's bias, as Adam does). Its pseudo-gradient is the weighted mean of
  the clients' decoded updates, each relative to the adapter that client decoded.
- `RobustAggregate` (strategy=median|trimmed_mean): Flower's FedMedian, or FedTrimmedAvg
  (the mean after dropping the `trim` share of largest and smallest values per
  coordinate). Unweighted, so one client cannot pull the result by claiming many
  examples.
- `Mifa` (strategy=mifa; Gu et al. 2021, "Fast Federated Learning in the Presence of
  Arbitrary Device Unavailability"; Flower has no MIFA): the server remembers, for every
  client, its latest update divided by the learning rate it used, G_i = (w_i - w_t) / lr_t
  (w_t as the client decoded it), and moves the global adapter by lr_t * mean over all
  clients of G_i, the stale G_i of clients that did not answer included. lr_t is the
  clients' rate at the round's first step, from the schedule the server knows (`lr_for`),
  never read from a reply. A running sum keeps each refresh O(1) per client.
- FedProx needs no server change: its proximal term lives in the clients' loss
  (`train.train_steps(prox_mu=...)`); the server averages as FedAvg does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from logging import INFO
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedMedian, FedTrimmedAvg, FedYogi

from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.replies import ValidReply
from fedllm_flwr.strategy.round_setup import RoundSetup

if TYPE_CHECKING:
    from fedllm_flwr.config import Config

State = dict[str, np.ndarray]


def to_state(arrays: ArrayRecord) -> State:
    return {k: v.numpy().astype(np.float32) for k, v in arrays.items()}


def to_arrays(state: State, dtype: type = np.float32) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=dtype)) for k, v in state.items()})


def flower_replies(states: list[State], weights: list[float]) -> list[Message]:
    """Decoded adapters in the form Flower's strategies aggregate: one ArrayRecord and the
    weight as `num-examples`, in float64 so that Flower's "mean minus current" gives back
    the clients' mean update without float32 rounding."""
    return [
        Message(
            RecordDict({"arrays": to_arrays(state, np.float64), "metrics": MetricRecord({"num-examples": weight})}),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        for state, weight in zip(states, weights, strict=True)
    ]


def server_optimizer(kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
    """Flower's strategy whose server step is `kind` (avgm, adam or yogi), with our knobs."""
    if kind == "avgm":
        return FedAvgM(server_learning_rate=lr, server_momentum=beta1)
    if kind in ("adam", "yogi"):
        return (FedAdam if kind == "adam" else FedYogi)(eta=lr, beta_1=beta1, beta_2=beta2, tau=tau)
    raise ValueError(f"unknown server optimizer {kind!r}")


class _KeepsGlobal(AdapterFedAvg):
    """Remembers the global adapter each round was started from."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.current: State = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.current = to_state(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def update_of(self, reply: ValidReply) -> State:
        """What a client changed. A lossy downlink (even fp16) hands each client a
        rounded copy of `current`; measuring its adapter against the fp32 `current`
        would add that rounding to every pseudo-gradient, so the decoded update is used."""
        if reply.update is not None:
            return reply.update
        return {k: reply.state[k] - self.current[k] for k in reply.state}


class ServerOptFedAvg(_KeepsGlobal):
    """FedAvgM, FedAdam or FedYogi: Flower's server step on the clients' mean update."""

    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        s = cfg.strategy
        return {"optimizer": server_optimizer(s.name.removeprefix("fed"), s.server_lr, s.server_momentum, s.beta2,
                                              s.tau)}  # fmt: skip

    def __init__(self, *, optimizer: FedAvgM | FedAdam | FedYogi, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = optimizer

    def state(self) -> dict[str, np.ndarray]:
        opt = self.optimizer
        if isinstance(opt, FedAvgM):
            names = list(self.current)
            return {f"m/{k}": v for k, v in zip(names, opt.momentum_vector or [], strict=False)}
        return {**{f"m/{k}": v for k, v in opt.m_t.items()}, **{f"v/{k}": v for k, v in opt.v_t.items()}}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        opt = self.optimizer
        if isinstance(opt, FedAvgM):
            opt.momentum_vector = list(m.values()) or None
            return
        opt.m_t, opt.v_t = m, {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        # Flower's step averages its replies and moves from `current_arrays` by that mean
        # minus `current_arrays`: replies of current + update_i make that the mean update.
        current = {k: v.astype(np.float64) for k, v in self.current.items()}
        opt = self.optimizer
        opt.current_arrays = to_arrays(current, np.float64) if isinstance(opt, FedAvgM) else current
        updates = [self.update_of(r) for r in valid]
        replies = flower_replies([{k: current[k] + u[k] for k in current} for u in updates], [r.weight for r in valid])
        arrays, _ = opt.aggregate_train(server_round, replies)
        return to_arrays(to_state(arrays)) if arrays is not None else None


class RobustAggregate(AdapterFedAvg):
    """Flower's FedMedian or FedTrimmedAvg over the decoded adapters (unweighted)."""

    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        return {"kind": cfg.strategy.name, "trim": cfg.strategy.trim}

    def __init__(self, *, kind: str, trim: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust aggregate {kind!r}")
        self.kind, self.trim = kind, trim
        self.flower = FedMedian() if kind == "median" else FedTrimmedAvg(beta=trim)

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        replies = flower_replies([r.state for r in valid], [r.weight for r in valid])
        arrays, _ = self.flower.aggregate_train(server_round, replies)
        return to_arrays(to_state(arrays)) if arrays is not None else None


class MifaMemory:
    """Every client's latest G_i = (w_i - w_t) / lr_i, and their running sum."""

    def __init__(self) -> None:
        self.updates: dict[int, State] = {}
        self.sum: State = {}

    def refresh(self, client: int, g: State) -> None:
        old = self.updates.get(client)
        for key, value in g.items():
            base = self.sum.get(key, np.zeros_like(value))
            self.sum[key] = base + value - (old[key] if old is not None else 0.0)
        self.updates[client] = g

    def mean_over(self, num_clients: int) -> State:
        """Mean of G_i over `num_clients`; clients never seen count as zero."""
        return {k: v / max(num_clients, len(self.updates)) for k, v in self.sum.items()}


def round_lr(cfg: Config, server_round: int) -> float:
    """The learning rate every client starts round `server_round` with."""
    from fedllm_flwr.train import lr_at

    steps = cfg.train.local_steps
    return lr_at((server_round - 1) * steps, cfg.num_rounds * steps, cfg.train)


class Mifa(_KeepsGlobal):
    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        return {"wait_for_all": cfg.strategy.mifa_wait_for_all, "lr_for": partial(round_lr, cfg)}

    def __init__(self, *, lr_for: Callable[[int], float], wait_for_all: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lr_for = lr_for
        """Round -> the learning rate clients start that round with (the run's schedule)."""
        self.wait_for_all = wait_for_all
        self.memory = MifaMemory()
        self.num_clients = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.num_clients = max(self.num_clients, len(list(grid.get_node_ids())))
        return super().configure_train(server_round, arrays, config, grid)

    def state(self) -> dict[str, np.ndarray]:
        """Every client's G_i, and the running sum as it stands: refreshed as sum + new - old
        round after round, it differs in the last bits from the G_i added up again, and a
        resumed run must move the adapter exactly as the run that never stopped."""
        out = {f"g/{client}/{k}": v for client, g in self.memory.updates.items() for k, v in g.items()}
        out.update({f"sum/{k}": v for k, v in self.memory.sum.items()})
        out["num-clients"] = np.array([self.num_clients])
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.num_clients = int(arrays["num-clients"].reshape(-1)[0])
        self.memory = MifaMemory()
        updates: dict[int, State] = {}
        for key, value in arrays.items():
            if key.startswith("g/"):
                _, client, name = key.split("/", 2)
                updates.setdefault(int(client), {})[name] = value
        for client, g in sorted(updates.items()):
            self.memory.refresh(client, g)
        kept = {key.removeprefix("sum/"): value for key, value in arrays.items() if key.startswith("sum/")}
        if kept:  # a checkpoint written before the sum was kept has the G_i alone: their sum stands
            self.memory.sum = kept

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        lr_t = float(self.lr_for(server_round))
        if not math.isfinite(lr_t) or lr_t <= 0:
            raise ValueError(f"MIFA needs a positive learning rate, the schedule gives {lr_t} for round {server_round}")
        for reply in valid:
            metrics = next(iter(reply.content.metric_records.values()))
            client = int(metrics.get("partition-id", reply.node_id))
            self.memory.refresh(client, {k: v / lr_t for k, v in self.update_of(reply).items()})
        seen = len(self.memory.updates)
        self.ledger.set(server_round, "mifa-clients-remembered", seen)
        if self.wait_for_all and seen < self.num_clients:
            log(INFO, "Round %s: MIFA waits until every client answered once (%s of %s)", server_round, seen,
                self.num_clients)  # fmt: skip
            return None
        mean = self.memory.mean_over(self.num_clients)
        return to_arrays({k: self.current[k] + lr_t * mean[k] for k in self.current})
