"""The language-model loss of a prompt-masked batch: what training minimizes and
held-out evaluation reports (`train.py` and `evaluate/loss.py` both use it), and the
log-probability of each row's response (task=dpo, `tasks/dpo.py`) and of each of its
tokens (task=grpo, `tasks/grpo/`)."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from fedllm_flwr.data.prompts import IGNORE_INDEX

#: Model types whose causal-LM head is a plain projection of the decoder's last
#: hidden state (no logit scaling; Gemma 2 and 3 soft-cap logits only when their config's
#: `final_logit_softcapping` is set), so it may be applied to the response positions alone.
PLAIN_HEAD_MODELS = (
    "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "smollm3",
)  # fmt: skip


def _backbone(model: torch.nn.Module):
    """(decoder, head) of a PEFT or plain causal LM whose head may be sliced, else None."""
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        return None  # virtual tokens are prepended inside PeftModel.forward
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "model_type", "") not in PLAIN_HEAD_MODELS or not hasattr(base, "get_decoder"):
        return None
    if getattr(base.config, "final_logit_softcapping", None) is not None:
        return None
    return base.get_decoder(), base.get_output_embeddings()


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (transformers' own way to
    run the head at some positions only; it applies any logit scaling or capping)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def response_logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """The logits at the positions `keep` marks (position t predicts token t + 1),
    flattened row by row: (keep.sum(), vocab). The head runs at those positions alone,
    row by row where the decoder can be called on its own (`_backbone`); otherwise
    (prompt learning, which prepends virtual tokens or a prefix inside PeftModel's
    forward; heads that cap logits) through the model's forward with `logits_to_keep`
    at every position some row needs, counted from the end, so virtual tokens do not
    shift them. A model without `logits_to_keep` computes them all."""
    parts = _backbone(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return head(hidden.last_hidden_state[:, :-1][keep])
    length = batch["input_ids"].shape[1]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if not _keeps_logits(model):
        return model(**inputs).logits[:, -length:][:, :-1][keep]
    columns = keep.any(dim=0).nonzero()[:, 0]
    logits = model(**inputs, logits_to_keep=columns - length).logits
    return logits[keep[:, columns]]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens.

    With `response_logits`, the LM head runs only at the positions that predict
    a labelled token instead of at every position (`response_logits_of`): on
    Alpaca-style data about half of the tokens are prompt, SmolLM2's head
    (576 x 49,152) is a fifth of a token's FLOPs and Gemma 3's (640 x 262,144)
    more than the rest of the model, while the full fp32 logits of a batch of
    4 x 256 tokens take 200 MB (SmolLM2). The result equals the model's own loss.
    """
    if not response_logits:
        return model(**batch, use_cache=False).loss
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(response_logits_of(model, batch, keep).float(), targets[keep])


def _labelled_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p of every labelled token, flattened row by row, fp32; the mask of labelled
    positions, rows x (length - 1)); logits divided by `temperature` first."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    if response_logits:
        logits = response_logits_of(model, batch, keep)
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, -batch["input_ids"].shape[1] :][:, :-1][keep]
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    return -F.cross_entropy(logits, targets[keep], reduction="none"), keep


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each row's labelled tokens, summed, in fp32; how many there are).

    With `response_logits` the head runs at the labelled positions alone, as for
    `lm_loss`; otherwise the model's logits at every position are computed, their
    last `input_ids` positions taken (prompt learning puts its virtual tokens first)."""
    per_token, keep = _labelled_logps(model, batch, response_logits)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
    return sums, keep.sum(dim=1)


def token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log p of each labelled token, rows x the most labelled tokens of a row, fp32, packed
    to the left; the mask of which are tokens): per-token log-probabilities of each row's
    response (task=grpo), its labelled tokens being contiguous."""
    per_token, keep = _labelled_logps(model, batch, response_logits, temperature)
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)
    out = per_token.new_zeros(mask.shape)
    out[mask] = per_token  # row-major order on both sides
    return out, mask


def record_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True) -> torch.Tensor:
    """Each row's own `lm_loss` (its mean next-token cross-entropy over its labelled
    tokens; 0 for a row with none), fp32: the per-record losses of privacy=dp_sgd's
    zeroth-order steps."""
    sums, counts = sequence_logps(model, batch, response_logits)
    return -sums / counts.clamp(min=1)


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many labelled (response) tokens a prompt-masked LM batch predicts: the
    count `lm_loss` averages over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
