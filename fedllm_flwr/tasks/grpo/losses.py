"""GRPO's arithmetic: group-relative advantages, the clipped policy-ratio loss with a KL
term, and its four normalisations. Plain tensors, no model and no Flower.

Definitions follow TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions` for the
advantages, `_compute_loss` for the loss); `tests/test_grpo.py` checks each against
TRL's own code on a hand batch. For completion i of a group of G answers to one prompt,
with reward r_i,

    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4)       (scale `group`)

the std with Bessel's correction as torch's `std`; `batch` divides by the std of every
reward of the batch, `none` does not divide (Dr. GRPO). Per completion token t,

    ratio = exp(log pi(t) - log pi_old(t))
    loss_t = -min(ratio A_i, clip(ratio, 1 - eps, 1 + eps_high) A_i) + beta KL_t
    KL_t = exp(log ref(t) - log pi(t)) - (log ref(t) - log pi(t)) - 1     (k3)

With one optimizer step per batch of samples, pi_old is pi detached (ratio 1, the
gradient of ratio A is that of log pi times A). What differs between the loss types is
how the token losses are averaged:

| loss_type | loss |
|---|---|
| grpo | mean over completions of each one's mean over its tokens (DeepSeekMath) |
| bnpo | sum over every token of the batch / tokens of the batch |
| dr_grpo | sum over every token / (completions x max new tokens) (Dr. GRPO) |
| dapo | sum over every token / tokens of the whole optimizer step (DAPO) |

An answer whose reward could not be computed (`rewards.Scores.keep` False) takes no part
in its group's mean and std and adds nothing to the loss or to its normaliser.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4
"""Added to the std before dividing, as TRL does."""


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(advantages, whether each answer's group had all-equal rewards) of `rewards`, one
    per answer, answers of one prompt next to each other (B x G). Answers with `keep`
    False are left out of every mean and std and get advantage 0."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    keep = torch.ones_like(rewards, dtype=torch.bool) if keep is None else keep
    grouped, kept = rewards.view(-1, group_size), keep.view(-1, group_size)
    counts = kept.sum(dim=1, keepdim=True)
    values = torch.where(kept, grouped, torch.zeros_like(grouped))
    mean = values.sum(dim=1, keepdim=True) / counts.clamp(min=1)
    centred = torch.where(kept, grouped - mean, torch.zeros_like(grouped))
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (counts - 1).clamp(min=1)).sqrt()

    def flat(t: torch.Tensor) -> torch.Tensor:  # one value per group -> one per answer
        return t.expand_as(grouped).reshape(-1)

    no_signal = flat(torch.isclose(std, torch.zeros_like(std)))
    advantages = centred.reshape(-1)
    if scale == "group":
        advantages = advantages / (flat(std) + STD_EPS)
    elif scale == "batch":
        batch_std = rewards[keep].std() if int(keep.sum()) > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std + STD_EPS)
    return advantages, no_signal


def per_token_kl(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) at each token: exp(d) - d - 1, d = ref - pi
    (log-probabilities); never negative, zero where they agree."""
    gap = reference - policy
    return torch.exp(gap) - gap - 1


def clipped_surrogate(
    policy: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:  # fmt: skip
    """-min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) per token, ratio = pi / pi_old;
    `advantages` one per row."""
    ratio = torch.exp(policy - old)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    a = advantages.unsqueeze(1)
    return -torch.min(ratio * a, clipped * a)


def aggregate(
    token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int, step_tokens: float | None = None
) -> torch.Tensor:  # fmt: skip
    """The loss of a batch from its per-token losses (rows x tokens) and the mask of
    completion tokens that count. `step_tokens`: dapo's normaliser, the completion tokens
    of the whole optimizer step (default: this batch's)."""
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return masked.sum() / (token_loss.shape[0] * max_new_tokens)
    if loss_type == "dapo":
        return masked.sum() / max(float(step_tokens if step_tokens is not None else mask.sum()), 1.0)
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def grpo_loss(
    policy: torch.Tensor,
    old: torch.Tensor,
    reference: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    eps_low: float,
    eps_high: float,
    loss_type: str,
    max_new_tokens: int,
    step_tokens: float | None = None,
) -> torch.Tensor:
    """The GRPO loss of a batch of completions (rows x tokens of per-token log-probs under
    the policy, the sampling policy and the reference; `reference` may be None when
    beta is 0). `mask`: the completion tokens that count (the dropped answers' rows all
    False)."""
    token_loss = clipped_surrogate(policy, old, advantages, eps_low, eps_high)
    if beta:
        token_loss = token_loss + beta * per_token_kl(policy, reference)
    return aggregate(token_loss, mask, loss_type, max_new_tokens, step_tokens)


def mean_kl(policy: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    """The mean k3 KL over the completion tokens that count (0 when none does)."""
    mask = mask.to(policy.dtype)
    return float((per_token_kl(policy, reference) * mask).sum() / mask.sum().clamp(min=1.0))
