"""FedAvg for LoRA adapters of unequal ranks: each site trains at its own rank.

The global adapter has the largest rank R (the server learns every node's rank
before round 1, see `fedllm_flwr.server.ranks`, and asks a node that connects
later before its first message). Each node is sent the global adapter truncated
to its rank (A's first r rows, B's first r columns) and replies with an update of
that shape, which is validated against what it was sent. The strategies differ in
how they combine the replies into a new rank-R adapter:

- `ZeroPadding` (HetLoRA, Cho et al. 2024): each client's A and B zero-padded to R,
  then averaged per LoRA module with HetLoRA's sparsity weights ||B_k A_k||_F / Z
  (Z their sum over the round's clients; example counts do not enter). Rows a
  small-rank client does not hold are averaged with its zeros, so they shrink
  towards zero as it takes part; rows no reply holds keep their values.
- `Stacking` (FLoRA, in `stacking.py`): exact, by stacking the factors; its own module.
- `SvdRedistribution` (FlexLoRA, Bai et al. 2024): the weighted sum of the clients'
  products sum_k p_k B_k A_k per module, split by a truncated SVD into rank-R factors;
  a node of rank r gets the best rank-r approximation of that sum (the truncation of
  an SVD is the SVD of the truncation). `lora-aggregation-error` is what rank R drops.

Every site's alpha is scaled with its rank (`AdapterConfig.at_rank`), so all of
them scale B A alike and the factors combine as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.aggregators import to_arrays
from fedllm_flwr.strategy.lora_products import (
    at_rank,
    multiplying_pairs,
    product_factors,
    product_gap,
    product_norms,
    rank_of,
)
from fedllm_flwr.strategy.replies import ValidReply, weighted_mean
from fedllm_flwr.strategy.round_setup import RoundSetup

if TYPE_CHECKING:
    from fedllm_flwr.config import Config

AskRanks = Callable[[list[int]], dict[int, int | str]]
"""Asks nodes for their LoRA rank: node id -> its rank, or why it cannot train here
(`fedllm_flwr.server.ranks.RankQuery`)."""


class RankedLoRA(AdapterFedAvg):
    """Sends each node the global adapter at its own rank; `merge` makes the new one."""

    learns_ranks = True

    @classmethod
    def settings(cls, cfg: Config, setup: RoundSetup) -> dict[str, Any]:
        return {"ranks": setup.ranks, "ask_ranks": setup.ask_ranks}

    def __init__(self, *, ranks: Mapping[int, int] | None = None, ask_ranks: AskRanks | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.ranks: dict[int, int] = dict(ranks or {})
        """Node id -> its LoRA rank, learned before round 1 or asked since."""
        self.ask_ranks = ask_ranks
        """Asks a node not in `ranks` before it is sent anything; a node it cannot
        give a rank for is left out of that message's round. None (tests): such a
        node is sent the global rank R."""
        self.current: dict[str, np.ndarray] = {}
        """The global adapter this round started from (rank R)."""
        self._by_rank: dict[int, ArrayRecord] = {}
        """One truncation per rank, shared by its nodes, of the adapter whose content is `_source`."""
        self._source = ""

    @property
    def global_rank(self) -> int:
        return rank_of(self.current)

    def arrays_for(self, node_id: int, global_arrays: ArrayRecord) -> ArrayRecord:
        full = rank_of({k: v.numpy() for k, v in global_arrays.items()})
        rank = self.ranks.get(node_id, full)
        if rank == full:
            return global_arrays
        # Keyed by content: Flower's object_id, a hash of the record computed once and
        # cached on it. An id() is given to the next record once this one is freed,
        # and would serve an older adapter's truncation.
        if global_arrays.object_id != self._source:
            self._by_rank, self._source = {}, global_arrays.object_id
        if rank not in self._by_rank:
            self._by_rank[rank] = to_arrays(at_rank({k: v.numpy() for k, v in global_arrays.items()}, rank))
        return self._by_rank[rank]

    def _wire(self, arrays: ArrayRecord, messages: Iterable[Message], remember: bool = False) -> list[Message]:
        """Every message for a node of a known rank (asking the others first); a node
        with no rank that can be served is left out, with the reason logged."""
        messages = list(messages)
        unknown = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.ranks]
        if unknown and self.ask_ranks is not None:
            for node, answer in sorted(self.ask_ranks(unknown).items()):
                if isinstance(answer, str):
                    log(WARNING, "[fedllm-flwr] node %s left out of this round: %s", node, answer)
                else:
                    self.ranks[node] = answer
            messages = [m for m in messages if m.metadata.dst_node_id in self.ranks]
        return super()._wire(arrays, messages, remember)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = {k: v.numpy().astype(np.float32) for k, v in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def combine(self, server_round: int, valid: list[ValidReply]) -> ArrayRecord | None:
        rank = self.global_rank
        weights = np.asarray([r.weight for r in valid], dtype=np.float64)
        merged, error = self.merge([r.state for r in valid], weights / weights.sum(), rank)
        if error is not None:
            self.ledger.set(server_round, "lora-aggregation-error", error)
        return to_arrays(merged)

    def merge(
        self, states: list[dict[str, np.ndarray]], weights: np.ndarray, rank: int
    ) -> tuple[dict[str, np.ndarray], float | None]:
        """(the new rank-`rank` adapter, its lora-aggregation-error) from the clients'
        states at their own ranks and their normalised weights."""
        raise NotImplementedError


class ZeroPadding(RankedLoRA):
    """HetLoRA's aggregation: zero-pad to rank R, sparsity-weighted mean, truncate on the way down.

    Per LoRA module, client k's weight is ||B_k A_k||_F / sum_j ||B_j A_j||_F (Cho et
    al. 2024, "sparsity-weighted aggregation"): a client whose update moved the
    module more counts more, whatever its example count; a module whose products
    are all zero falls back to the example weights. Other tensors (DoRA's
    magnitudes) take the example-weighted mean. A rank slot j no reply holds (the
    rank-R sites failed, timed out or were not sampled) keeps the previous A[j] and
    B[:, j]: averaged with zeros alone it would be 0 in both, and B A's gradient
    with respect to either is then 0 for good. `lora-aggregation-error` compares
    the new B A with sum_k w_k B_k A_k under the same weights."""

    def merge(self, states, weights, rank):
        pairs = multiplying_pairs(states[0])
        factored = {key for pair in pairs for key in pair}
        rest = [{k: v for k, v in s.items() if k not in factored} for s in states]
        out = weighted_mean(rest, list(weights)) if rest[0] else {}
        total = lost = 0.0
        for a_key, b_key in pairs:
            a_list = [np.asarray(s[a_key], np.float64) for s in states]
            b_list = [np.asarray(s[b_key], np.float64) for s in states]
            norms = product_norms(a_list, b_list)
            w = norms / norms.sum() if norms.sum() > 0 else np.asarray(weights, np.float64)
            a = np.zeros((rank, a_list[0].shape[1]))
            b = np.zeros((b_list[0].shape[0], rank))
            for wk, ak, bk in zip(w, a_list, b_list, strict=True):  # zero-padded: only the first r_k slots
                a[: ak.shape[0]] += wk * ak
                b[:, : bk.shape[1]] += wk * bk
            held = max(ak.shape[0] for ak in a_list)
            if held < rank and a_key in self.current:
                a[held:], b[:, held:] = self.current[a_key][held:rank], self.current[b_key][:, held:rank]
            gap, norm = product_gap(a_list, b_list, w, a, b)
            out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
            total, lost = total + norm, lost + gap
        return out, math.sqrt(lost / total) if total > 0 else 0.0


class SvdRedistribution(RankedLoRA):
    """FlexLoRA's aggregation: the weighted sum of the clients' B A, truncated SVD to rank R."""

    def merge(self, states, weights, rank):
        pairs = multiplying_pairs(states[0])
        factored = {key for pair in pairs for key in pair}
        rest = [{k: v for k, v in s.items() if k not in factored} for s in states]
        out = weighted_mean(rest, list(weights)) if rest[0] else {}
        total = dropped = 0.0
        for a_key, b_key in pairs:
            b, a, norm, lost = product_factors(
                [np.asarray(s[a_key], np.float64) for s in states],
                [np.asarray(s[b_key], np.float64) for s in states],
                weights,
                rank,
            )
            # A direction the sum does not use keeps the previous A's row (B's column
            # is zero, so B A is unchanged): training can still move it next round.
            unused = ~np.any(a, axis=1)
            if a_key in self.current:
                a[unused] = self.current[a_key][unused]
            out[a_key], out[b_key] = a.astype(np.float32), b.astype(np.float32)
            total, dropped = total + norm, dropped + lost
        return out, (math.sqrt(dropped / total) if total > 0 else 0.0)
