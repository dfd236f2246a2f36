"""The language-model task (task=lm): the adapter learns to write responses. No Flower here.

Trained on prompt-masked instruction examples with the causal LM loss on the response
tokens (`fedllm_flwr.lm_loss`); scored by held-out loss and perplexity and, when the
dataset has one (`dataset.metric`), its generation benchmark (`evaluate/benchmarks.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedllm_flwr.data.prompts import TokenizedSet, collate_examples
from fedllm_flwr.evaluate.benchmarks import PRIMARY, run_benchmark
from fedllm_flwr.evaluate.loss import evaluate_loss
from fedllm_flwr.lm_loss import lm_loss, response_tokens
from fedllm_flwr.tasks.base import Batch, LossFn, Task

if TYPE_CHECKING:
    from fedllm_flwr.config import Config
    from fedllm_flwr.data import ClientData
    from fedllm_flwr.model import ModelBundle


def holdout_scores(cfg: Config, bundle: ModelBundle, data: ClientData, lengths: bool = False) -> dict[str, float]:
    """Held-out loss and, when the dataset has one, its generation metric; with `lengths`,
    also the mean length in tokens of the answers it scored (`answer-tokens`)."""
    loss = evaluate_loss(bundle.model, data.holdout, bundle.tokenizer.pad_token_id, cfg.eval.batch_size)
    scores = {"eval-loss": loss["loss"]}
    metric = cfg.dataset.metric
    if metric in PRIMARY and metric != "humaneval" and data.holdout_records:
        values, samples = run_benchmark(metric, bundle.model, bundle.tokenizer, data.holdout_records, cfg.eval)
        scores[PRIMARY[metric]] = values[PRIMARY[metric]]
        if lengths:
            answers = [s.get("prediction", s.get("completion", "")) for s in samples]
            tokens = [len(bundle.tokenizer.encode(a, add_special_tokens=False)) for a in answers]
            scores["answer-tokens"] = sum(tokens) / max(len(tokens), 1)
    return scores


class LmTask(Task):
    peft_task_type = "CAUSAL_LM"
    answer_lengths = False
    """Whether clients asked for the generation metric also report their answers' mean length."""

    def collate(self, rows: list, pad_id: int) -> Batch:
        return collate_examples(rows, pad_id)

    def loss_fn(self, cfg: Config, bundle: ModelBundle) -> LossFn:
        return lambda model, batch: lm_loss(model, batch, cfg.train.response_logits)

    def items(self, batch: Batch) -> int:
        return response_tokens(batch)

    def primary(self, cfg: Config) -> str | None:
        return PRIMARY.get(cfg.dataset.metric)

    def local_evaluate(self, cfg: Config, bundle: ModelBundle, data: ClientData) -> dict[str, float]:
        """Loss and perplexity; with `eval.client_metric`, the dataset's generation metric too."""
        result = evaluate_loss(bundle.model, data.holdout, bundle.tokenizer.pad_token_id, cfg.eval.batch_size)
        metrics = {"eval-loss": result["loss"], "eval-ppl": result["ppl"], "num-examples": len(data.holdout)}
        if cfg.eval.client_metric:
            scores = holdout_scores(cfg, bundle, data, self.answer_lengths)
            metrics.update({f"eval-{k}": v for k, v in scores.items() if k != "eval-loss"})
        return metrics

    def generation_records(self, cfg: Config, test: list[dict[str, str]]) -> list[dict]:
        """The test records, or HumanEval's problems."""
        if cfg.dataset.metric == "humaneval":
            from fedllm_flwr.evaluate.humaneval import load_problems

            return load_problems(limit=cfg.eval.limit)
        return test

    def server_evaluate(
        self, cfg: Config, bundle: ModelBundle, test_set: TokenizedSet, records: list[dict], generate_answers: bool
    ) -> dict[str, float]:  # fmt: skip
        """Loss and perplexity on the test set; the dataset's benchmark on `records`."""
        model, tok = bundle.model, bundle.tokenizer
        loss = evaluate_loss(model, test_set, tok.pad_token_id, cfg.eval.batch_size)
        results = {"eval-loss": loss["loss"], "eval-ppl": loss["ppl"]}
        if self.primary(cfg):
            scores, _ = run_benchmark(cfg.dataset.metric, model, tok, records, cfg.eval, seed=cfg.seed)
            results.update({k: v for k, v in scores.items() if k not in ("num-examples", "samples-per-problem")})
        return results
