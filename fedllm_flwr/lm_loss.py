"""The language-model loss of a prompt-masked batch: what training minimizes and
held-out evaluation reports (`train.py` and `evaluate/loss.py` both use it), and the
log-probability of each row's response (task=dpo, `dpo.py`)."""

from __future__ import annotations

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


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (response) tokens.

    With `response_logits`, the LM head runs only at the positions that predict
    a labelled token instead of at every position: on Alpaca-style data about
    half of the tokens are prompt, and SmolLM2's head (576 x 49,152) is a fifth
    of a token's FLOPs, while the full fp32 logits of a batch of 4 x 256 tokens
    take 200 MB. The result equals the model's own loss. Prompt-learning
    methods and heads that scale or cap logits use the model's own loss.
    """
    parts = _backbone(model) if response_logits else None
    if parts is None:
        return model(**batch, use_cache=False).loss
    decoder, head = parts
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden.last_hidden_state[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each row's labelled tokens, summed, in fp32; how many there are).

    The head runs at the labelled positions alone where `lm_loss` would. Otherwise
    (prompt learning, capped heads) the model's own logits are used, their last
    `input_ids` positions (prompt learning puts its virtual tokens first)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _backbone(model) if response_logits else None
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logits = logits[:, -batch["input_ids"].shape[1] :][:, :-1][keep]
    else:
        decoder, head = parts
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = head(hidden.last_hidden_state[:, :-1][keep])
    per_token = -F.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(keep.shape[0], dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
    return sums, keep.sum(dim=1)


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many labelled (response) tokens a prompt-masked LM batch predicts: the
    count `lm_loss` averages over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
