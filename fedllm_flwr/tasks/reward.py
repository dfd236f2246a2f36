"""Reward models (task=reward): pairwise losses, preference accuracy and the task itself
(`RewardTask`; the pairs themselves are data: `fedllm_flwr.data.pairs`).

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedllm_flwr.config import RewardLossConfig
from fedllm_flwr.data.pairs import PairSet, collate_pairs
from fedllm_flwr.tasks.base import LossFn, PairTask

if TYPE_CHECKING:
    from fedllm_flwr.config import Config
    from fedllm_flwr.model import ModelBundle


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


class RewardTask(PairTask):
    """A scalar head on the base model (peft's SEQ_CLS: the head trains and travels with
    the adapter), trained with `reward_loss` and scored by `evaluate_preferences`."""

    peft_task_type = "SEQ_CLS"

    def loss_fn(self, cfg: Config, bundle: ModelBundle) -> LossFn:
        return reward_loss_fn(cfg.reward_loss)

    def score(self, cfg: Config, model: torch.nn.Module, data: PairSet, pad_id: int) -> dict[str, float]:
        return evaluate_preferences(model, data, pad_id, cfg.eval.batch_size)
