"""Reward models (task=reward): preference pairs, pairwise losses, preference accuracy.

No Flower here. A pair is (prompt, chosen, rejected); both responses are scored
as prompt + response by a sequence-classification head with one output (the
last non-padding token's hidden state, projected to a scalar), and every loss
is a function of d = r_chosen - r_rejected (`RewardLossConfig`):

| loss | of d | gradient on d when chosen trails (d < 0) |
|---|---|---|
| logsigmoid | -log sigmoid(d) (Bradley-Terry) | -sigmoid(-d), toward 1 |
| bce | BCE(d, target 1 - s) | the same, but stops where sigmoid(d) = 1 - s |
| hinge | max(0, m - d) | -1 until d reaches m, then 0 |
| mse | (d - m)^2 | -2 (m - d): also pulls an overshooting d back to m |
| smooth_l1 | Huber(d - m) | -(m - d) near m, -1 far from it |
| focal | -(1 - p)^g log p, p = sigmoid(d) | logsigmoid's, scaled down as p nears 1 |

Left out: a cosine loss (the cosine of two scalars is only their sign product,
with no gradient toward a larger gap), and a separate KL loss (KL to a smoothed
target is `bce` with `label_smoothing`, up to a constant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedllm_flwr.config import RewardLossConfig
from fedllm_flwr.data.prompts import format_prompt

Pair = tuple[list[int], list[int]]
"""Token ids of prompt + chosen and of prompt + rejected."""


def tokenize_pair(record: dict[str, str], tokenizer, max_seq_len: int, bos: list[int]) -> Pair | None:
    """Both sides of a pair as prompt + response, cut to `max_seq_len`; None when
    the cut leaves the two identical (nothing tells them apart)."""
    prompt = record.get("instruction", "")
    head = bos + (tokenizer.encode(format_prompt(prompt, record.get("input", "")), add_special_tokens=False)
                  if prompt else [])  # fmt: skip
    sides = [(head + tokenizer.encode(record[key], add_special_tokens=False))[:max_seq_len]
             for key in ("chosen", "rejected")]  # fmt: skip
    return None if sides[0] == sides[1] else (sides[0], sides[1])


class PairSet:
    """Tokenized pairs (held-out and test sets), with the count that truncation dropped."""

    def __init__(self, records: list[dict[str, str]], tokenizer, max_seq_len: int) -> None:
        from fedllm_flwr.data.prompts import _bos

        bos = _bos(tokenizer)
        tokenized = [tokenize_pair(r, tokenizer, max_seq_len, bos) for r in records]
        self.pairs = [p for p in tokenized if p is not None]
        self.dropped = len(tokenized) - len(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)


def collate_pairs(rows: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs as one right-padded batch of 2B sequences: the B chosen, then the B rejected."""
    sequences = [chosen for chosen, _ in rows] + [rejected for _, rejected in rows]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def margins(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """d = r_chosen - r_rejected for every pair of a `collate_pairs` batch (fp32)."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().squeeze(-1)
    half = rewards.shape[0] // 2
    return rewards[:half] - rewards[half:]


def pairwise_loss(d: torch.Tensor, cfg: RewardLossConfig) -> torch.Tensor:
    """The mean `cfg.name` loss over the pairs' reward gaps `d`."""
    if cfg.name == "logsigmoid":
        return -F.logsigmoid(d).mean()
    if cfg.name == "bce":
        return F.binary_cross_entropy_with_logits(d, torch.full_like(d, 1.0 - cfg.label_smoothing))
    if cfg.name == "hinge":
        return F.relu(cfg.margin - d).mean()
    if cfg.name == "mse":
        return ((d - cfg.margin) ** 2).mean()
    if cfg.name == "smooth_l1":
        return F.smooth_l1_loss(d, torch.full_like(d, cfg.margin))
    if cfg.name == "focal":
        log_p = F.logsigmoid(d)
        return (-((1.0 - log_p.exp()) ** cfg.gamma) * log_p).mean()
    raise ValueError(f"unknown reward loss {cfg.name!r}")


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    """How many pairs a `collate_pairs` batch holds: the items a pairwise loss averages over."""
    return batch["input_ids"].shape[0] // 2


def reward_loss_fn(cfg: RewardLossConfig):
    """The training loss for `train_steps`: `cfg`'s loss on a batch of pairs."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return pairwise_loss(margins(model, batch), cfg)

    return loss


@torch.no_grad()
def evaluate_preferences(model: torch.nn.Module, data: PairSet, pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Preference accuracy (share of pairs with r_chosen > r_rejected), mean margin,
    and Bradley-Terry loss (-log sigmoid(d), comparable whatever loss trained the model)."""
    if len(data) == 0:
        return {"preference-accuracy": math.nan, "margin": math.nan, "eval-loss": math.nan, "pairs": 0}
    device = next(model.parameters()).device
    model.eval()
    gaps = []
    for start in range(0, len(data), batch_size):
        batch = collate_pairs(data.pairs[start : start + batch_size], pad_id)
        gaps.append(margins(model, {k: v.to(device) for k, v in batch.items()}).cpu())
    d = torch.cat(gaps)
    return {
        "preference-accuracy": float((d > 0).float().mean()),
        "margin": float(d.mean()),
        "eval-loss": float(-F.logsigmoid(d).mean()),
        "pairs": len(d),
    }
