"""What a task (`cfg.task`) is to the rest of the code: the `Task` interface, and
`PairTask`, what the two preference tasks share. No Flower here.

The client loop, the node and the server ask the configured task
(`fedllm_flwr.tasks.registry.task_of`) for its collate, loss, micro-batch weight,
evaluations and primary metric, and never test its name. Which records a task reads
(instruction records or preference pairs) is declared with its name in `compat`
(`TASK_RECORDS`), which the config and the data layer read without loading this code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fedllm_flwr.data.pairs import PairSet, collate_pairs, pair_count

if TYPE_CHECKING:
    from fedllm_flwr.config import Config
    from fedllm_flwr.data import ClientData
    from fedllm_flwr.model import ModelBundle

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class Task:
    """One task: how a batch is made and scored, and how the adapter is evaluated.

    Subclasses set `peft_task_type` (peft's task type, which `build_model` builds: a
    causal LM or a sequence scorer) and implement the methods below; their name is the
    one `compat.TASKS` gives them.
    """

    peft_task_type: str = "CAUSAL_LM"

    def collate(self, rows: list, pad_id: int) -> Batch:
        """A training batch from the rows `LazyExamples` yields (`iter_batches`' collate_fn)."""
        raise NotImplementedError

    def loss_fn(self, cfg: Config, bundle: ModelBundle) -> LossFn:
        """The training loss of a batch (`train_steps`' loss_fn) of the model in `bundle`."""
        raise NotImplementedError

    def training(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """What the task changes in `model` while a client trains it, undone afterwards
        (the model is cached per process); nothing by default."""
        return contextlib.nullcontext()

    def train_metrics(self, cfg: Config, loss_fn: LossFn) -> dict[str, float]:
        """Figures of a round's training that only the task knows, for the reply (none by default)."""
        return {}

    def items(self, batch: Batch) -> int:
        """How many items the loss of `batch` averages over: a micro-batch's weight in an
        accumulated step (`train_steps`' items_fn)."""
        raise NotImplementedError

    def primary(self, cfg: Config) -> str | None:
        """The metric a round is judged by (logged, summarized, spread over clients), if any."""
        raise NotImplementedError

    def local_evaluate(self, cfg: Config, bundle: ModelBundle, data: ClientData) -> dict[str, float]:
        """A client's `eval-*` metrics of the adapter in `bundle` on its non-empty held-out split,
        and their weight, `num-examples` (the split's size)."""
        raise NotImplementedError

    def check(self, cfg: Config) -> None:
        """What the server checks of the task's own settings before the run folder exists
        or a message is sent (UserError in one line); nothing by default."""

    def generation_records(self, cfg: Config, test: list[dict[str, str]]) -> list[dict]:
        """What the server generates answers for (from the test records); loaded before
        the run folder exists, so a missing file stops the run early."""
        return []

    def server_evaluate(
        self, cfg: Config, bundle: ModelBundle, test_set: Any, records: list[dict], generate_answers: bool
    ) -> dict[str, float]:  # fmt: skip
        """The server's metrics of the adapter in `bundle` on the tokenized `test_set`;
        `records`: `generation_records`' answer, `generate_answers`: before training and
        after the last round."""
        raise NotImplementedError


class PairTask(Task):
    """A task trained and scored on preference pairs (`fedllm_flwr.data.pairs`): batches
    of B chosen then B rejected sequences, a loss averaged over pairs, and preference
    accuracy as the primary metric."""

    def collate(self, rows: list, pad_id: int) -> Batch:
        return collate_pairs(rows, pad_id)

    def items(self, batch: Batch) -> int:
        return pair_count(batch)

    def primary(self, cfg: Config) -> str | None:
        return "preference-accuracy"

    def score(self, cfg: Config, model: torch.nn.Module, data: PairSet, pad_id: int) -> dict[str, float]:
        """`preference-accuracy`, `margin`, `eval-loss` and `pairs` of `model` on `data`."""
        raise NotImplementedError

    def local_evaluate(self, cfg: Config, bundle: ModelBundle, data: ClientData) -> dict[str, float]:
        scores = self.score(cfg, bundle.model, data.holdout, bundle.tokenizer.pad_token_id)
        return {
            "eval-loss": scores["eval-loss"],
            "eval-preference-accuracy": scores["preference-accuracy"],
            "eval-margin": scores["margin"],
            "num-examples": len(data.holdout),
        }

    def server_evaluate(
        self, cfg: Config, bundle: ModelBundle, test_set: PairSet, records: list[dict], generate_answers: bool
    ) -> dict[str, float]:  # fmt: skip
        scores = self.score(cfg, bundle.model, test_set, bundle.tokenizer.pad_token_id)
        return {k: v for k, v in scores.items() if k != "pairs"}
