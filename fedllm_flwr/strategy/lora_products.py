"""LoRA's factors and their products: what averaging A and B separately loses.

A LoRA module adds B A to its frozen weight. FedAvg averages the clients' A and B
separately, and the product of the averages is not the average of the products:
B_avg A_avg != sum_k p_k B_k A_k. `aggregation_error` measures the gap over all of
an adapter's LoRA modules, so a run shows how far its aggregate is from what its
clients trained. Plain NumPy, no Flower.
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


def aggregation_error(states: list[State], weights: list[float]) -> float | None:
    """||sum_k p_k B_k A_k - B_avg A_avg||_F / ||sum_k p_k B_k A_k||_F over every LoRA
    module together (p_k the clients' normalised weights, B_avg and A_avg the weighted
    means FedAvg sends back); None when the adapter has no LoRA module whose factors
    multiply. 0 when the
    clients' products are all zero (nothing trained, nothing lost)."""
    # Only factors that multiply (B: out x r, A: r x in); a metric never fails a round.
    first = states[0] if states else {}
    pairs = [
        (a, b) for a, b in lora_pairs(first)
        if np.ndim(first[a]) == np.ndim(first[b]) == 2 and np.shape(first[b])[1] == np.shape(first[a])[0]
    ]  # fmt: skip
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
