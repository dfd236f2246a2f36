"""Batched generation for every evaluation: greedy by default, stop strings, progress.

One home for decoding, so GSM8K, HumanEval, ROUGE and exact match all see the
same prompts-to-completions behaviour, with or without an adapter.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList


def uses_prefix(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return getattr(getattr(config, "peft_type", None), "value", None) == "PREFIX_TUNING"


def uses_virtual_tokens(model: torch.nn.Module) -> bool:
    """Prompt tuning and P-tuning: learned embeddings before the input."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False)) and not uses_prefix(model)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class _StopStrings(StoppingCriteria):
    """Marks a row done once its new text contains a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stop, self.prompt_width = tokenizer, list(stop), prompt_width
        self.tail = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in stop) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]
        window = new[:, -self.tail :].tolist()
        texts = self.tokenizer.batch_decode(window, skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy_without_cache(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, stop: Sequence[str] = ()
) -> list[str]:
    """Greedy decoding by full forward passes over right-padded sequences.

    The reference decoding for every method, and prefix tuning's where a
    sliding attention window is shorter than the sequence (`_prefix_fits`):
    right padding keeps every row's positions and window exact. Slow: one
    full forward per new token.
    """
    device = next(model.parameters()).device
    offset = model.active_peft_config.num_virtual_tokens if uses_virtual_tokens(model) else 0
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
        # The head runs only where a row ends (its logits over a 262k vocabulary at every
        # position were most of the work); prompt tuning's virtual tokens come first.
        last = torch.tensor([len(s) - 1 for s in seqs], device=device) + offset
        keep = torch.unique(last)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
        picks = logits[torch.arange(len(seqs)), torch.searchsorted(keep, last)].argmax(-1).tolist()
        for i, token in enumerate(picks):
            if not done[i]:
                new[i].append(token)
                done[i] = token == tokenizer.eos_token_id or (
                    bool(stop) and any(s in tokenizer.decode(new[i][-16:]) for s in stop)
                )
        if all(done):
            break
    return tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    stop: Sequence[str] = (),
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    desc: str = "",
) -> list[list[str]]:
    """`num_samples` completions per prompt, each cut at the first stop string.

    Greedy when `temperature` is 0 (then `num_samples` must be 1), else
    nucleus sampling seeded by `seed`. Left-padded `generate` batches with the
    KV cache; prefix tuning seeds the cache with its prefix. A progress bar
    on stderr counts prompts when `desc` is given.
    """
    if temperature <= 0 and num_samples != 1:
        raise ValueError("several samples per prompt need temperature > 0")
    if uses_prefix(model) and temperature > 0:
        raise ValueError("sampling is not supported with prefix tuning; use temperature 0")
    device = next(model.parameters()).device
    model.eval()
    if temperature > 0:
        torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", file=sys.stderr, disable=not desc, dynamic_ncols=True)
    completions: list[list[str]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            if uses_prefix(model) and not _prefix_fits(model, tokenizer, chunk, max_new_tokens):
                texts = greedy_without_cache(model, tokenizer, chunk, max_new_tokens, stop)
            elif uses_prefix(model):
                texts = _generate_with_prefix(model, tokenizer, chunk, device, max_new_tokens, stop)
            else:
                texts = _generate_batch(
                    model, tokenizer, chunk, device, max_new_tokens, stop, num_samples, temperature, top_p
                )
            texts = [cut_at_stop(t, stop) for t in texts]
            completions.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
            bar.update(len(chunk))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return completions


def _with_virtual_tokens(model, enc) -> dict[str, torch.Tensor]:
    """The inputs of a prompt-tuning or P-tuning model as its forward pass builds them:
    the learned virtual tokens' embeddings first, then the prompt's, with the mask
    extended. peft 0.21's own generate() adds the virtual tokens again at every
    decoding step under transformers 5 (it looks for the cache under a name
    transformers renamed), so its answers came from a corrupted context."""
    embeds = model.get_input_embeddings()(enc["input_ids"])
    virtual = model.get_prompt(batch_size=embeds.shape[0]).to(embeds.dtype)
    ones = torch.ones(virtual.shape[:2], dtype=enc["attention_mask"].dtype, device=embeds.device)
    return {
        "inputs_embeds": torch.cat([virtual, embeds], 1),
        "attention_mask": torch.cat([ones, enc["attention_mask"]], 1),
    }


def _prefix_fits(model, tokenizer, prompts: list[str], max_new_tokens: int) -> bool:
    """Whether prefix, prompt and answer fit in the model's sliding attention window,
    if it has one. Left padding sits between the prefix and the prompt in the cache,
    so past the window a padded row would see fewer real tokens than it trained on."""
    window = getattr(model.get_base_model().config.get_text_config(), "sliding_window", None)
    width = max(len(tokenizer(p)["input_ids"]) for p in prompts)
    return window is None or model.active_peft_config.num_virtual_tokens + width + max_new_tokens < window


def _generate_with_prefix(model, tokenizer, prompts, device, max_new_tokens, stop) -> list[str]:
    """Prefix tuning decoded with the KV cache, seeded with the learned prefix.

    peft 0.21's own generate() loses the prefix under transformers 5 (it passes it
    under the cache's old name). Here the base model generates from a cache that
    already holds the prefix's keys and values; placeholder ids stand for those
    cached positions, so positions count from the prefix's end as in training.
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    rows, width = enc["input_ids"].shape[0], model.active_peft_config.num_virtual_tokens
    ids = torch.cat([torch.full((rows, width), tokenizer.pad_token_id, device=device), enc["input_ids"]], 1)
    mask = torch.cat([torch.ones_like(ids[:, :width]), enc["attention_mask"]], 1)
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, ids.shape[1])]) if stop else None
    out = model.get_base_model().generate(
        input_ids=ids,
        attention_mask=mask,
        cache=model.get_prompt(batch_size=rows),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stopping_criteria=criteria,
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)


def _generate_batch(model, tokenizer, prompts, device, max_new_tokens, stop, num_samples, temperature, top_p):
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    width = enc["input_ids"].shape[1]
    if uses_virtual_tokens(model):  # the base model decodes; only new tokens come back
        enc, width, model = _with_virtual_tokens(model, enc), 0, model.get_base_model()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)]) if stop else None
    with warnings.catch_warnings():
        # peft's prompt methods ignore position ids and say so on every call.
        warnings.filterwarnings("ignore", message="Position ids are not supported")
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_samples,
            do_sample=temperature > 0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=criteria,
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
