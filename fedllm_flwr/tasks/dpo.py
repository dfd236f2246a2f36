"""Direct preference optimisation (task=dpo, `DpoTask`): the policy is the base model with the
adapter, the reference the same model with the adapter switched off (peft's
`disable_adapter`), so no second model is held. No Flower here.

Every loss is a function of the log-ratio gap of a pair,

    h = (log pi(y_c | x) - log ref(y_c | x)) - (log pi(y_r | x) - log ref(y_r | x)),

log-probabilities summed over the response tokens (the prompt is masked as in SFT);
the implicit reward of a response is beta (log pi - log ref). As in TRL's
DPOTrainer, every response ends with EOS (`fedllm_flwr.data.pairs`) and the policy
runs without dropout (`dropout_off`). Definitions follow TRL's DPOTrainer
(tests/test_dpo.py checks ours against it on a hand batch):

| dpo_loss | loss | reference |
|---|---|---|
| sigmoid | -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h) | DPO; e > 0: conservative DPO |
| hinge | max(0, 1 - beta h) | SLiC |
| ipo | (h_avg - 1 / (2 beta))^2, h_avg with per-token means | IPO |
| robust | (-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e) | rDPO |
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedllm_flwr.config import DpoLossConfig
from fedllm_flwr.data.pairs import PairSet, collate_pairs
from fedllm_flwr.lm_loss import sequence_logps
from fedllm_flwr.model import adapter_off
from fedllm_flwr.tasks.base import LossFn, PairTask

if TYPE_CHECKING:
    from fedllm_flwr.config import Config
    from fedllm_flwr.model import ModelBundle


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, cfg: DpoLossConfig
) -> torch.Tensor:  # fmt: skip
    """Per-pair losses from the 2B summed log-probs of a `collate_pairs` batch (the
    B chosen, then the B rejected) under the policy and the reference, and the
    2B response token counts."""
    ratios = policy - reference
    chosen, rejected = ratios.chunk(2)
    beta, e = cfg.beta, cfg.label_smoothing
    h = chosen - rejected
    if cfg.name == "sigmoid":
        return -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    if cfg.name == "hinge":
        return torch.relu(1 - beta * h)
    if cfg.name == "ipo":
        n_chosen, n_rejected = tokens.clamp(min=1).chunk(2)
        return (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    if cfg.name == "robust":
        return (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    raise ValueError(f"unknown dpo loss {cfg.name!r}")


@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Every dropout layer of `model` at p = 0 while the block runs, as TRL's DPOTrainer
    trains (`DPOConfig.disable_dropout`, default True), and as it was afterwards. The
    reference is the same model with its adapter off, which skips LoRA's dropout: a
    policy that kept it would compare a dropped-out forward with a clean one, so h would
    carry dropout noise even while pi = ref. (For the whole of training, not per forward:
    gradient checkpointing reruns the forward during backward and must see the same p.
    Put back afterwards: the model is cached per process, and a later job of another task
    in a warm process trains with the dropout it configured.)"""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    before = [m.p for m in layers]
    for module in layers:
        module.p = 0.0
    try:
        yield
    finally:
        for module, p in zip(layers, before, strict=True):
            module.p = p


def policy_and_reference(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], response_logits: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(policy log-probs, reference log-probs, response token counts) of a pair batch;
    the reference is the model with its adapter off, without gradients. Training runs
    with dropout off (`DpoTask.training`), so both compare like with like."""
    policy, tokens = sequence_logps(model, batch, response_logits)
    with torch.no_grad(), adapter_off(model):
        reference, _ = sequence_logps(model, batch, response_logits)
    return policy, reference, tokens


def dpo_loss_fn(cfg: DpoLossConfig, response_logits: bool = True):
    """The training loss for `train_steps`: `cfg`'s loss, averaged over a batch's pairs."""

    def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return dpo_loss(*policy_and_reference(model, batch, response_logits), cfg).mean()

    return loss


@torch.no_grad()
def evaluate_dpo(
    model: torch.nn.Module, data: PairSet, pad_id: int, cfg: DpoLossConfig, batch_size: int = 16
) -> dict[str, float]:  # fmt: skip
    """Implicit-reward accuracy (the chosen response's reward above the rejected's),
    mean implicit margin beta h, and the configured loss, over `data`."""
    if len(data) == 0:
        return {"preference-accuracy": math.nan, "margin": math.nan, "eval-loss": math.nan, "pairs": 0}
    device = next(model.parameters()).device
    model.eval()
    gaps, losses = [], []
    for start in range(0, len(data), batch_size):
        batch = collate_pairs(data.pairs[start : start + batch_size], pad_id)
        policy, reference, tokens = policy_and_reference(model, {k: v.to(device) for k, v in batch.items()})
        chosen, rejected = (policy - reference).chunk(2)
        gaps.append((chosen - rejected).cpu())
        losses.append(dpo_loss(policy, reference, tokens, cfg).cpu())
    h = torch.cat(gaps)
    return {
        "preference-accuracy": float((h > 0).float().mean()),
        "margin": float(cfg.beta * h.mean()),
        "eval-loss": float(torch.cat(losses).mean()),
        "pairs": len(h),
    }


def closer_to_chosen(predictions: list[str], records: list[dict[str, str]]) -> dict[str, float]:
    """How often a generated answer is closer to the chosen than to the rejected
    response, by ROUGE-L F1 (offline, `rouge-score`): `closer-to-chosen` (strictly
    closer), `closer-ties` (equally close), over the records."""
    from rouge_score import rouge_scorer

    if not records:
        return {"closer-to-chosen": math.nan, "closer-ties": math.nan}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    closer = ties = 0
    for prediction, record in zip(predictions, records, strict=True):
        chosen = scorer.score(record["chosen"], prediction)["rougeL"].fmeasure
        rejected = scorer.score(record["rejected"], prediction)["rougeL"].fmeasure
        closer += chosen > rejected
        ties += chosen == rejected
    return {"closer-to-chosen": closer / len(records), "closer-ties": ties / len(records)}


class DpoTask(PairTask):
    """The language model itself, trained with `dpo_loss` against itself with the adapter
    off; scored by implicit-reward accuracy and margin (`evaluate_dpo`), and before
    training and after the last round by how often greedy answers to the test prompts
    are closer to the chosen response (`closer_to_chosen`)."""

    peft_task_type = "CAUSAL_LM"

    def loss_fn(self, cfg: Config, bundle: ModelBundle) -> LossFn:
        return dpo_loss_fn(cfg.dpo_loss, cfg.train.response_logits)

    def training(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return dropout_off(model)

    def score(self, cfg: Config, model: torch.nn.Module, data: PairSet, pad_id: int) -> dict[str, float]:
        return evaluate_dpo(model, data, pad_id, cfg.dpo_loss, cfg.eval.batch_size)

    def generation_records(self, cfg: Config, test: list[dict[str, str]]) -> list[dict]:
        """The test pairs: their prompts are answered, their responses compared with the answers."""
        return test

    def server_evaluate(
        self, cfg: Config, bundle: ModelBundle, test_set: PairSet, records: list[dict], generate_answers: bool
    ) -> dict[str, float]:  # fmt: skip
        scores = self.score(cfg, bundle.model, test_set, bundle.tokenizer.pad_token_id)
        if generate_answers:
            scores.update(closeness(cfg, bundle, records))
        return {k: v for k, v in scores.items() if k != "pairs"}


def closeness(cfg: Config, bundle: ModelBundle, records: list[dict[str, str]]) -> dict[str, float]:
    """Greedy answers to the pairs' prompts, scored by `closer_to_chosen`."""
    from fedllm_flwr.data.prompts import format_prompt
    from fedllm_flwr.evaluate.benchmarks import DEFAULT_MAX_NEW_TOKENS
    from fedllm_flwr.evaluate.generation import generate

    prompts = [format_prompt(r["instruction"], r.get("input", "")) for r in records]
    length = cfg.eval.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(cfg.dataset.metric, 64)
    answers = generate(bundle.model, bundle.tokenizer, prompts, batch_size=cfg.eval.batch_size,
                       max_new_tokens=length)  # fmt: skip
    return closer_to_chosen([a[0].strip() for a in answers], records)
