"""LoRA's factors and their products: what averaging A and B separately loses.

A LoRA module adds B A to its frozen weight. FedAvg averages the clients' A and B
separately, and the product of the averages is not the average of the products:
B_avg A_avg != sum_k p_k B_k A_k. `aggregation_error` measures the gap over all of
an adapter's LoRA modules, so a run shows how far its aggregate is from what its
clients trained, from the factors alone (`product_gap`: no out x in matrix, which
at 4096 x 4096 is 134 MB a client a module). `at_rank`, `padded` and
`product_factors` move factors between ranks for sites of unequal ranks. Plain
NumPy, no Flower.
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


def product_gap(
    a_list: list[np.ndarray], b_list: list[np.ndarray], weights: np.ndarray, a_got: np.ndarray, b_got: np.ndarray
) -> tuple[float, float]:
    """(||sum_k p_k B_k A_k - B_got A_got||_F^2, ||sum_k p_k B_k A_k||_F^2) of one LoRA
    module, without any out x in matrix; the ranks may all differ.

    The difference is L R with L = [p_1 B_1 ... p_K B_K, -B_got] (out x s) and
    R = [A_1; ...; A_K; A_got] (s x in), s = sum_k r_k + r_got. Thin QRs L = Q_L R_L and
    R^T = Q_R R_R leave ||L R||_F = ||R_L R_R^T||_F, an s x s product: O((out + in) s^2)
    work and memory instead of O(out x in x s). (The Gram form trace((L^T L)(R R^T))
    gives the same figure but squares the condition number: a gap of 1e-8 of the sum's
    norm would drown in rounding.) The sum alone is the first sum_k r_k columns of
    both triangular factors."""
    b_cat = np.concatenate([*(p * b for p, b in zip(weights, b_list, strict=True)), -b_got], axis=1)
    a_cat = np.concatenate([*a_list, a_got], axis=0)
    _, r_b = np.linalg.qr(b_cat)
    _, r_a = np.linalg.qr(a_cat.T)
    meant = sum(a.shape[0] for a in a_list)
    lost = float(np.square(r_b @ r_a.T).sum())
    total = float(np.square(r_b[:, :meant] @ r_a[:, :meant].T).sum())
    return lost, total


def product_norms(a_list: list[np.ndarray], b_list: list[np.ndarray]) -> np.ndarray:
    """||B_k A_k||_F of each (A_k, B_k), from r x r Gram matrices: ||B A||_F^2 =
    trace((B^T B)(A A^T)), never the out x in product."""
    squares = [np.sum((b.T @ b) * (a @ a.T)) for a, b in zip(a_list, b_list, strict=True)]
    return np.sqrt(np.maximum(np.asarray(squares, dtype=np.float64), 0.0))


def aggregation_error(states: list[State], weights: list[float]) -> float | None:
    """||sum_k p_k B_k A_k - B_avg A_avg||_F / ||sum_k p_k B_k A_k||_F over every LoRA
    module together (p_k the clients' normalised weights, B_avg and A_avg the weighted
    means FedAvg sends back, of factors zero-padded to the largest rank where ranks
    differ); None when the adapter has no LoRA module whose factors multiply. 0 when
    the clients' products are all zero (nothing trained, nothing lost). Factored
    (`product_gap`): no out x in matrix is formed."""
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
        rank = max(x.shape[0] for x in a)
        a_avg = sum(pk * np.pad(ak, ((0, rank - ak.shape[0]), (0, 0))) for pk, ak in zip(p, a, strict=True))
        b_avg = sum(pk * np.pad(bk, ((0, 0), (0, rank - bk.shape[1]))) for pk, bk in zip(p, b, strict=True))
        gap, total = product_gap(a, b, p, a_avg, b_avg)
        lost, meant_total = lost + gap, meant_total + total
    return math.sqrt(lost / meant_total) if meant_total > 0 else 0.0
