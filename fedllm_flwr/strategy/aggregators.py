"""Aggregation beyond FedAvg, over adapter weights only.

- `ServerOptimizer` (strategy=fedavgm|fedadam|fedyogi): the weighted mean of the
  clients' updates (each decoded once, relative to the adapter that client
  decoded) is a pseudo-gradient; a server-side
  momentum, Adam or Yogi step applies it (Reddi et al. 2021, "Adaptive
  Federated Optimization"). State is fp32 and keyed by tensor name.
- `RobustAggregate` (strategy=median|trimmed_mean): coordinate-wise median, or
  the mean after dropping the `trim` share of largest and smallest values per
  coordinate. Unweighted, so one client cannot pull the result by claiming many
  examples.
- `Mifa` (strategy=mifa; Gu et al. 2021, "Fast Federated Learning in the
  Presence of Arbitrary Device Unavailability"): the server remembers, for every
  client, its latest update divided by the learning rate it used,
  G_i = (w_i - w_t) / lr_t (w_t as the client decoded it), and moves the global adapter by
  lr_t * mean over all clients of G_i, the stale G_i of clients that did not
  answer included. lr_t is the clients' rate at the round's first step, from
  the schedule the server knows (`lr_for`), never read from a reply. A running
  sum keeps each refresh O(1) per client.
- FedProx needs no server change: its proximal term lives in the clients' loss
  (`train.train_steps(prox_mu=...)`); the server averages as FedAvg does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg, ValidReply, weighted_mean

State = dict[str, np.ndarray]


def to_state(arrays: ArrayRecord) -> State:
    return {k: v.numpy().astype(np.float32) for k, v in arrays.items()}


def to_arrays(state: State) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in state.items()})


def coordinate_median(states: list[State]) -> State:
    return {k: np.median(np.stack([s[k] for s in states]), axis=0).astype(np.float32) for k in states[0]}


def trimmed_mean(states: list[State], trim: float) -> State:
    """Mean per coordinate after dropping floor(trim * n) values at each end."""
    n = len(states)
    cut = int(trim * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {n} replies at each end leaves nothing to average")
    out = {}
    for key in states[0]:
        stacked = np.sort(np.stack([s[key] for s in states]), axis=0)
        out[key] = stacked[cut : n - cut].mean(axis=0).astype(np.float32)
    return out


class ServerOptimizer:
    """Momentum, Adam or Yogi on the server, applied to pseudo-gradients."""

    def __init__(self, kind: str, lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if kind not in ("avgm", "adam", "yogi"):
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}

    def step(self, current: State, delta: State) -> State:
        """The new global state for pseudo-gradient `delta`, the clients' mean update."""
        out = {}
        for key, d in delta.items():
            d = d.astype(np.float32)
            if self.kind == "avgm":  # FedAvgM: m = beta m + delta; w += lr m
                m = self.beta1 * self.m.get(key, np.zeros_like(d)) + d
                self.m[key] = m
                out[key] = current[key] + self.lr * m
                continue
            m = self.beta1 * self.m.get(key, np.zeros_like(d)) + (1 - self.beta1) * d
            v_old = self.v.get(key, np.full_like(d, self.tau**2))
            if self.kind == "adam":
                v = self.beta2 * v_old + (1 - self.beta2) * d * d
            else:  # yogi: v moves toward d^2 by at most (1 - beta2) d^2, additively
                v = v_old - (1 - self.beta2) * d * d * np.sign(v_old - d * d)
            self.m[key], self.v[key] = m, v
            out[key] = current[key] + self.lr * m / (np.sqrt(v) + self.tau)
        return {k: v.astype(np.float32) for k, v in out.items()}


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
    def __init__(self, *, optimizer: ServerOptimizer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer = optimizer

    def state(self) -> dict[str, np.ndarray]:
        return {
            **{f"m/{k}": v for k, v in self.optimizer.m.items()},
            **{f"v/{k}": v for k, v in self.optimizer.v.items()},
        }

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.optimizer.m = {k[2:]: v for k, v in arrays.items() if k.startswith("m/")}
        self.optimizer.v = {k[2:]: v for k, v in arrays.items() if k.startswith("v/")}

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        delta = weighted_mean([self.update_of(r) for r in valid], [r.weight for r in valid])
        return to_arrays(self.optimizer.step(self.current, delta))


class RobustAggregate(AdapterFedAvg):
    def __init__(self, *, kind: str, trim: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust aggregate {kind!r}")
        self.kind, self.trim = kind, trim

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        states = [r.state for r in valid]
        if self.kind == "median":
            return to_arrays(coordinate_median(states))
        return to_arrays(trimmed_mean(states, self.trim))


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


class Mifa(_KeepsGlobal):
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
        out = {f"g/{client}/{k}": v for client, g in self.memory.updates.items() for k, v in g.items()}
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
