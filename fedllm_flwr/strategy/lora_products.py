"""LoRA's factors and their products: what averaging A and B separately loses.

A LoRA module adds B A to its frozen weight. FedAvg averages the clients' A and B
separately, and the product of the averages is not the average of the products:
B_avg A_avg != sum_k p_k B_k A_k. `aggregation_error` measures the gap over all of
an adapter's LoRA modules, so a run shows how far its aggregate is from what its
clients trained. `at_rank`, `padded` and `product_factors` move factors between
ranks for sites of unequal ranks. Plain NumPy, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

State = Mapping[str, np.ndarray]


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(A, B) tensor names of every LoRA module in an adapter state (also DoRA's)."""
    names = set(keys)
    return [
        (k, k.replace("lora_A", "lora_B"))
        for k in sorted(names)
        if "lora_A" in k and k.replace("lora_A", "lora_B") in names
    ]


def multiplying_pairs(state: State) -> list[tuple[str, str]]:
    """The (A, B) pairs of `state` whose factors multiply (B: out x r, A: r x in)."""
    return [
        (a, b) for a, b in lora_pairs(state)
        if np.ndim(state[a]) == np.ndim(state[b]) == 2 and np.shape(state[b])[1] == np.shape(state[a])[0]
    ]  # fmt: skip


def rank_of(state: State) -> int:
    """The LoRA rank of an adapter state (0 when it has no LoRA module)."""
    pairs = multiplying_pairs(state)
    return int(np.shape(state[pairs[0][0]])[0]) if pairs else 0


def at_rank(state: State, rank: int) -> dict[str, np.ndarray]:
    """The state truncated to `rank`: A's first `rank` rows, B's first `rank` columns;
    every other tensor as it is."""
    out = dict(state)
    for a_key, b_key in multiplying_pairs(state):
        out[a_key], out[b_key] = state[a_key][:rank], state[b_key][:, :rank]
    return out


def padded(state: State, rank: int) -> dict[str, np.ndarray]:
    """The state zero-padded to `rank` (A's rows and B's columns past its own rank
    are zeros), so B A is unchanged; every other tensor as it is."""
    out = dict(state)
    for a_key, b_key in multiplying_pairs(state):
        a, b = state[a_key], state[b_key]
        out[a_key] = np.concatenate([a, np.zeros((rank - a.shape[0], a.shape[1]), a.dtype)], axis=0)
        out[b_key] = np.concatenate([b, np.zeros((b.shape[0], rank - b.shape[1]), b.dtype)], axis=1)
    return out


def product_factors(
    a_list: list[np.ndarray], b_list: list[np.ndarray], weights: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The best rank-`rank` factors of sum_k p_k B_k A_k: (B, A, squared norm of the
    sum, squared norm of what the truncation drops).

    The sum is B_cat A_cat with B_cat = [p_1 B_1 ... p_K B_K] and A_cat the A_k stacked,
    of rank at most sum_k r_k, so its SVD comes from two thin QRs and the SVD of a
    small core, never from the dense out x in matrix. The singular values are split
    evenly, B = U sqrt(S) and A = sqrt(S) V^T, so neither factor starts far larger than
    the other. Directions past the sum's own rank are zero in both factors."""
    b_cat = np.concatenate([p * b for p, b in zip(weights, b_list, strict=True)], axis=1)
    a_cat = np.concatenate(a_list, axis=0)
    q_b, r_b = np.linalg.qr(b_cat)
    q_a, r_a = np.linalg.qr(a_cat.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    b = np.zeros((b_cat.shape[0], rank))
    a = np.zeros((rank, a_cat.shape[1]))
    b[:, :keep] = (q_b @ u[:, :keep]) * root
    a[:keep] = root[:, None] * (vt[:keep] @ q_a.T)
    return b, a, float(np.square(s).sum()), float(np.square(s[keep:]).sum())


def aggregation_error(states: list[State], weights: list[float]) -> float | None:
    """||sum_k p_k B_k A_k - B_avg A_avg||_F / ||sum_k p_k B_k A_k||_F over every LoRA
    module together (p_k the clients' normalised weights, B_avg and A_avg the weighted
    means FedAvg sends back); None when the adapter has no LoRA module whose factors
    multiply. 0 when the
    clients' products are all zero (nothing trained, nothing lost)."""
    # Only factors that multiply; a metric never fails a round.
    pairs = multiplying_pairs(states[0]) if states else []
    if not pairs:
        return None
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    lost = meant_total = 0.0
    for a_key, b_key in pairs:
        a = [np.asarray(s[a_key], dtype=np.float64) for s in states]
        b = [np.asarray(s[b_key], dtype=np.float64) for s in states]
        meant = sum(pk * (bk @ ak) for pk, ak, bk in zip(p, a, b, strict=True))
        got = sum(pk * bk for pk, bk in zip(p, b, strict=True)) @ sum(pk * ak for pk, ak in zip(p, a, strict=True))
        lost += float(np.square(meant - got).sum())
        meant_total += float(np.square(meant).sum())
    return math.sqrt(lost / meant_total) if meant_total > 0 else 0.0
