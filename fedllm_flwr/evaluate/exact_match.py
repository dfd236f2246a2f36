"""Exact-match accuracy of greedy answers, per category and overall."""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from fedllm_flwr.data.prompts import format_prompt


def normalize(text: str) -> str:
    """Compare answers on their first line, case- and space-insensitive, no final period."""
    first = text.strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip().rstrip(".").strip().lower()


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer, records: list[dict[str, str]], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy completions of the records' prompts (left-padded batches)."""
    device = next(model.parameters()).device
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return answers


def exact_match(
    model: torch.nn.Module, tokenizer, records: list[dict[str, str]], batch_size: int = 16, max_new_tokens: int = 16
) -> dict[str, float]:
    """`accuracy` overall and `accuracy-<category>` for each category present."""
    answers = generate_answers(model, tokenizer, records, batch_size, max_new_tokens)
    hits: dict[str, list[int]] = defaultdict(list)
    for rec, answer in zip(records, answers, strict=True):
        ok = int(normalize(answer) == normalize(rec["output"]))
        hits["accuracy"].append(ok)
        if rec.get("category"):
            hits[f"accuracy-{rec['category']}"].append(ok)
    return {key: sum(v) / len(v) for key, v in hits.items()}
