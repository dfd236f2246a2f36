"""Exact-match accuracy of greedy answers, per category and overall."""

from __future__ import annotations

import re
import warnings
from collections import defaultdict

import torch

from fedllm_flwr.data.prompts import format_prompt


def normalize(text: str) -> str:
    """Compare answers on their first line, case- and space-insensitive, no final period."""
    first = text.strip().split("\n", 1)[0]
    return re.sub(r"\s+", " ", first).strip().rstrip(".").strip().lower()


def _uses_prefix(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING"


@torch.no_grad()
def greedy_without_cache(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding by full forward passes over right-padded sequences.

    For prefix tuning: with peft 0.21 and transformers 5, `generate()` drops the
    learned prefix (it passes it as `past_key_values`, which the model now
    ignores), so it would score the base model. The forward pass keeps the
    prefix. Right padding keeps every row's positions exact. Slower: one full
    forward per new token.
    """
    device = next(model.parameters()).device
    model.eval()
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new_tokens):
        seqs = [r + n for r, n in zip(rows, new, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        last = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
        offset = logits.shape[1] - width  # prompt methods would prepend virtual tokens
        picks = logits[torch.arange(len(seqs)), last + offset].argmax(-1).tolist()
        for i, token in enumerate(picks):
            if not done[i]:
                new[i].append(token)
                done[i] = token == tokenizer.eos_token_id
        if all(done):
            break
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module, tokenizer, records: list[dict[str, str]], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy completions of the records' prompts (left-padded `generate` batches)."""
    device = next(model.parameters()).device
    model.eval()
    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    if _uses_prefix(model):
        return [
            a
            for start in range(0, len(prompts), batch_size)
            for a in greedy_without_cache(model, tokenizer, prompts[start : start + batch_size], max_new_tokens)
        ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            with warnings.catch_warnings():
                # peft's prompt methods ignore position ids and say so on every call.
                warnings.filterwarnings("ignore", message="Position ids are not supported")
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
