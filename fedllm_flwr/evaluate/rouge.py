"""ROUGE-L of generated responses against reference responses (generic / Dolly).

Scored with Google's `rouge-score` package, which runs offline (the `evaluate`
library fetches its ROUGE script from the hub at load time). F1 of the longest
common subsequence, Porter-stemmed, averaged over examples, in [0, 1].
"""

from __future__ import annotations

import torch

from fedllm_flwr.data.prompts import format_prompt
from fedllm_flwr.evaluate.generation import generate


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over prediction/reference pairs (0.0 for no pairs)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / len(scores)


def rouge_eval(
    model: torch.nn.Module,
    tokenizer,
    records: list[dict[str, str]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    desc: str = "",
) -> tuple[dict[str, float], list[dict]]:
    """`rougeL` overall and `rougeL-<category>` per category of greedy responses."""
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    stop = ("### Instruction", "\n\n\n")
    outputs = generate(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, stop=stop, desc=desc
    )
    predictions = [o[0].strip() for o in outputs]
    metrics = {"rougeL": rouge_l(predictions, [r["output"] for r in records]), "num-examples": len(records)}
    for category in sorted({r.get("category", "") for r in records} - {""}):
        idx = [i for i, r in enumerate(records) if r.get("category") == category]
        metrics[f"rougeL-{category}"] = rouge_l([predictions[i] for i in idx], [records[i]["output"] for i in idx])
    samples = [
        {"instruction": r["instruction"], "prediction": p, "reference": r["output"], "category": r.get("category", "")}
        for r, p in zip(records, predictions, strict=True)
    ]
    return metrics, samples
