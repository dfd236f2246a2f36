"""Group-relative policy optimisation (task=grpo, `GrpoTask`): each site samples answers
to its prompts, rewards them with its own reward functions, and trains the adapter
toward the answers that beat their group. No Flower here.

A training batch holds `train.batch_size` prompts; the loss (`GrpoLoss`) samples
`grpo.group_size` answers to each from the current policy, scores them (`rewards`),
computes the group-relative advantages and the clipped loss with its KL term to the
reference, the base model with the adapter off (peft's `disable_adapter`, as task=dpo
does: no second model held), and keeps the round's figures for the reply. One optimizer
step per sampled batch: the sampling policy is the policy (TRL's `num_iterations` = 1).
As in task=dpo, dropout is off while a client trains (`training`), so the policy and the
reference compare like with like. The adapter is scored as task=lm scores it (held-out
loss; the dataset's metric on the server's test set).

With `train.grad_accum` > 1, each micro-batch's loss is weighted by its share of the
step's prompts (`items`); `dapo` then divides by each micro-batch's own tokens, where
TRL divides by the whole step's (the step's answers are not known until sampled).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from fedllm_flwr.lm_loss import token_logps
from fedllm_flwr.model import adapter_off
from fedllm_flwr.tasks.dpo import dropout_off
from fedllm_flwr.tasks.grpo.losses import group_advantages, grpo_loss, mean_kl
from fedllm_flwr.tasks.grpo.rewards import RewardFn, score_answers
from fedllm_flwr.tasks.grpo.sampling import answer_batch, left_pad, sample_groups
from fedllm_flwr.tasks.lm import LmTask

if TYPE_CHECKING:
    from fedllm_flwr.config import Config, GrpoConfig
    from fedllm_flwr.model import ModelBundle

log = logging.getLogger(__name__)


class GrpoLoss:
    """The GRPO loss of a batch of prompts (`train_steps`' loss_fn), and the figures of
    every batch it has seen (`metrics`)."""

    def __init__(self, cfg: GrpoConfig, tokenizer, fns: list[RewardFn], response_logits: bool = True) -> None:
        self.cfg, self.tokenizer, self.fns, self.response_logits = cfg, tokenizer, fns, response_logits
        self.sums: dict[str, float] = defaultdict(float)
        self.reasons: dict[str, int] = defaultdict(int)

    def __call__(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        cfg, tok = self.cfg, self.tokenizer
        group = sample_groups(
            model, batch["prompts"], group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        )  # fmt: skip
        texts = tok.batch_decode(group.answers, skip_special_tokens=True)
        prompts = [text for text in tok.batch_decode(batch["prompts"], skip_special_tokens=True)
                   for _ in range(cfg.group_size)]  # fmt: skip
        records = [record for record in batch["records"] for _ in range(cfg.group_size)]
        scores = score_answers(self.fns, cfg.reward_weights, prompts, texts, group.answers, records, group.ended,
                               cfg.max_new_tokens)  # fmt: skip
        device = next(model.parameters()).device
        rewards = torch.tensor(scores.rewards, dtype=torch.float32, device=device)
        keep = torch.tensor(scores.keep, dtype=torch.bool, device=device)
        advantages, no_signal = group_advantages(rewards, cfg.group_size, cfg.scale_rewards, keep)
        seqs = {k: v.to(device) for k, v in answer_batch(group, tok.pad_token_id).items()}
        policy, mask = token_logps(model, seqs, self.response_logits, cfg.temperature)
        mask = mask & keep.unsqueeze(1)
        reference = None
        if cfg.beta:
            with torch.no_grad(), adapter_off(model):
                reference, _ = token_logps(model, seqs, self.response_logits, cfg.temperature)
        loss = grpo_loss(
            policy, policy.detach(), reference, advantages, mask, beta=cfg.beta, eps_low=cfg.epsilon,
            eps_high=cfg.clip_high, loss_type=cfg.loss_type, max_new_tokens=cfg.max_new_tokens,
        )  # fmt: skip
        self._count(scores, keep, no_signal, group, policy.detach(), reference, mask)
        return loss

    def _count(self, scores, keep, no_signal, group, policy, reference, mask) -> None:
        sums, g = self.sums, self.cfg.group_size
        kept = [r for r, k in zip(scores.rewards, scores.keep, strict=True) if k]
        sums["reward"] += sum(kept)
        sums["kept"] += len(kept)
        sums["answers"] += len(scores.rewards)
        sums["dropped"] += scores.dropped
        sums["groups"] += len(scores.rewards) // g
        sums["no-signal"] += float(no_signal.view(-1, g)[:, 0].sum())
        sums["answer-tokens"] += sum(len(a) for a in group.answers)
        sums["ended"] += sum(group.ended)
        for i, row in enumerate(scores.per_function):
            values = [v for v, k in zip(row, scores.keep, strict=True) if k]
            sums[f"fn{i}"] += sum(values)
        if reference is not None:
            tokens = float(mask.sum())
            sums["kl"] += mean_kl(policy, reference, mask) * tokens
            sums["kl-tokens"] += tokens
        for reason, count in scores.reasons.items():
            self.reasons[reason] += count

    def metrics(self, names: list[str]) -> dict[str, float]:
        """The figures of every batch so far: mean reward (and per function, `names`) over
        the answers kept, share of groups with all-equal rewards, KL to the reference,
        mean answer length, answers dropped."""
        s = self.sums
        if not s["answers"]:
            return {}
        kept = max(s["kept"], 1.0)
        out = {
            "grpo-reward": s["reward"] / kept,
            "grpo-no-signal": s["no-signal"] / max(s["groups"], 1.0),
            "grpo-answer-tokens": s["answer-tokens"] / s["answers"],
            "grpo-ended": s["ended"] / s["answers"],
            "grpo-answers": s["answers"],
            "grpo-dropped-answers": s["dropped"],
        }
        if s["kl-tokens"]:
            out["grpo-kl"] = s["kl"] / s["kl-tokens"]
        out.update({f"grpo-reward-{name}": s[f"fn{i}"] / kept for i, name in enumerate(names)})
        if self.reasons:
            log.warning("[fedllm-flwr] grpo: answers dropped: %s", dict(self.reasons))
        return out


class GrpoTask(LmTask):
    """Trained by `GrpoLoss` on prompts alone (`data.prompts.tokenize_question`), scored as task=lm."""

    peft_task_type = "CAUSAL_LM"
    answer_lengths = True  # what a site's reward for brevity changes

    def collate(self, rows: list, pad_id: int) -> dict:
        """Left-padded prompts (for the step's counts), the prompts themselves and their records."""
        ids, mask = left_pad([prompt for prompt, _ in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "prompts": [p for p, _ in rows],
                "records": [record for _, record in rows]}  # fmt: skip

    def loss_fn(self, cfg: Config, bundle: ModelBundle) -> GrpoLoss:
        from fedllm_flwr.tasks.grpo.rewards import resolve_rewards

        return GrpoLoss(cfg.grpo, bundle.tokenizer, resolve_rewards(cfg.grpo.rewards), cfg.train.response_logits)

    def check(self, cfg: Config) -> None:
        """Every reward function named for the run and for each site imports."""
        from fedllm_flwr.tasks.grpo.rewards import resolve_rewards, split_specs

        resolve_rewards(cfg.grpo.rewards)
        for entry in cfg.grpo.client_rewards:
            resolve_rewards(split_specs(entry), "grpo.client_rewards")

    def training(self, model: torch.nn.Module):  # noqa: ANN201 - a context manager
        return dropout_off(model)

    def items(self, batch: dict) -> int:
        return len(batch["prompts"])

    def train_metrics(self, cfg: Config, loss_fn) -> dict[str, float]:
        return loss_fn.metrics([name.rpartition(":")[2].rpartition(".")[2] for name in cfg.grpo.rewards])
