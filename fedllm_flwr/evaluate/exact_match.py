"""Exact-match accuracy of greedy answers, per category and overall."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from fedllm_flwr.data.prompts import format_prompt
from fedllm_flwr.evaluate.generation import generate


def normalize(text: str) -> str:
    """Compare answers on their first line, case- and space-insensitive, no final period."""
    first = text.strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip().rstrip(".").strip().lower()


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, str]],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    desc: str = "",
) -> tuple[dict[str, float], list[dict]]:
    """`accuracy` overall and `accuracy-<category>` for each category present,
    and one sample row (prediction, reference, correct) per record."""
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    answers = [
        c[0]
        for c in generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc)
    ]
    hits: dict[str, list[int]] = defaultdict(list)
    samples = []
    for rec, answer in zip(records, answers, strict=True):
        ok = int(normalize(answer) == normalize(rec["output"]))
        hits["accuracy"].append(ok)
        if rec.get("category"):
            hits[f"accuracy-{rec['category']}"].append(ok)
        samples.append(
            {"instruction": rec["instruction"], "prediction": answer, "reference": rec["output"], "correct": bool(ok)}
        )
    metrics = {key: sum(v) / len(v) for key, v in hits.items()}
    return {**metrics, "num-examples": len(records)}, samples
