"""Each round's evaluation on the server: metrics row, saved adapters, checkpoint."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedllm_flwr.config import Config
from fedllm_flwr.data import tokenize_set
from fedllm_flwr.errors import UserError
from fedllm_flwr.lora_merge import save_merged, set_merged, stacked
from fedllm_flwr.model import ModelBundle, set_adapter_state
from fedllm_flwr.run_dir import CHECKPOINT, RunDir
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg
from fedllm_flwr.strategy.scenarios import LocalAdapters
from fedllm_flwr.tasks.registry import task_of
from fedllm_flwr.transport import arrays_to_state

INFO = logging.INFO
WARNING = logging.WARNING

#: Keys present in every metrics.jsonl row (null where a round has no value), so
#: the file loads into one table.
ROW_KEYS = (
    "round", "train-loss", "eval-loss", "eval-ppl", "accuracy", "bytes-down", "bytes-up",
    "seconds", "clients-ok", "clients-failed",
)  # fmt: skip


class RunStopped(UserError):
    """The run stops before its last round, for the reason in the message (its clients
    are gone). Not bad input, but it ends as bad input does: one line, a failed run;
    `run_server` records it in summary.json first."""


@dataclass
class View:
    """A model the server evaluates the adapter on: `convert` maps the exchanged
    adapter state onto `bundle`, and its metrics get `prefix`."""

    prefix: str
    bundle: ModelBundle
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda state: state


class ServerEvaluator:
    """`evaluate_fn` for Strategy.start: evaluate, save the adapter(s), log the round.

    Flower calls it after round 0 (before training) and after every round; it is
    the last step of each round, so it writes that round's metrics row. In the
    local scenario it evaluates every client's own adapter: the row holds the
    mean over clients, `-std` spreads and `client_<id>-` values. With several
    `views` (FedOT: the full model, then the emulator as `emu-`), each adapter is
    evaluated on each; the first view is the one adapters are saved for.
    """

    def __init__(
        self,
        cfg: Config,
        bundle: ModelBundle,
        test: list[dict[str, str]],
        run_dir: RunDir,
        strategy: AdapterFedAvg,
        views: list[View] | None = None,
        model_saver: Callable[[ModelBundle, Path], Path] | None = None,
    ) -> None:
        self.cfg, self.bundle, self.run_dir, self.strategy = cfg, bundle, run_dir, strategy
        self.views = views or [View("", bundle)]
        self.test_records = test
        self.task = task_of(cfg)
        self.primary = self.task.primary(cfg)
        self.gen_records = self.task.generation_records(cfg, self.test_records)
        self.model_saver = model_saver
        """The algorithm's, when the tuned model is the whole model (zo.params=full: the
        base weights): saved with it as model/final only (each round's would be the base's
        size; the checkpoint's seed lists rebuild any)."""
        self.full = model_saver is not None
        self.last = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.unanswered: list[int] = []
        """The latest rounds in a row that sampled clients and aggregated no reply."""

    @functools.cached_property
    def test_set(self):
        """The test records tokenized (pairs for task=reward), when first evaluated
        (never, with eval.every=0; round 0 not with eval.initial=false)."""
        return tokenize_set(self.cfg, self.test_records, self.bundle.tokenizer)

    def adapters(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The adapter(s) a round produced, by folder name ("" for the global one)."""
        if isinstance(self.strategy, LocalAdapters) and self.strategy.adapters:
            return {f"client_{pid}": a for pid, a in self.strategy.client_adapters().items()}
        return {"": arrays}

    def evaluate(self, bundle: ModelBundle, generate_answers: bool = False) -> dict[str, float]:
        """The task's metrics of the adapter in `bundle` on the test set (`Task.server_evaluate`)."""
        return self.task.server_evaluate(self.cfg, bundle, self.test_set, self.gen_records, generate_answers)

    def merged(self):
        """strategy=stacking: the delta merged under the global adapter, per LoRA module (else None)."""
        parts = self.strategy.merged_parts()
        return stacked(parts) if parts else None

    def save(self, folder: str, adapters: dict[str, ArrayRecord]) -> Path:
        main = self.views[0]
        if self.model_saver is not None:
            return self.model_saver(main.bundle, self.run_dir.path / "model" / folder)
        merged = self.merged()
        if merged is not None:  # stacking: the merged delta is the model (the fresh adapter adds B = 0)
            return save_merged(main.bundle.model, self.run_dir.path / "adapter" / folder, merged)
        states = {name: main.convert(self.bundle.complete(arrays_to_state(a))) for name, a in adapters.items()}
        return self.run_dir.save_adapters(main.bundle.model, folder, states)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        last_round = server_round == self.cfg.rounds_to_run
        due = self.cfg.eval.due(server_round, self.cfg.rounds_to_run)
        adapters = self.adapters(arrays)
        merged = self.merged()
        for view in self.views:
            set_merged(view.bundle.model, merged)
        t0 = time.perf_counter()
        results: dict[str, float] = {}
        if due:
            per_adapter = {}
            for name, own in adapters.items():
                state = self.bundle.complete(arrays_to_state(own))
                per_adapter[name] = {}
                for view in self.views:
                    set_adapter_state(view.bundle.model, view.convert(state))
                    scores = self.evaluate(view.bundle, generate_answers=server_round == 0 or last_round)
                    per_adapter[name].update({view.prefix + k: v for k, v in scores.items()})
            keys = next(iter(per_adapter.values()))
            results = {k: float(np.mean([r[k] for r in per_adapter.values()])) for k in keys}
            if len(per_adapter) > 1:
                spread = [v.prefix + k for v in self.views for k in (self.primary, "eval-loss") if k]
                for key in spread:
                    results[f"{key}-std"] = float(np.std([r[key] for r in per_adapter.values()]))
                for name, r in per_adapter.items():
                    results.update({f"{name}-{k}": r[k] for k in spread})
        row: dict[str, Any] = dict.fromkeys(ROW_KEYS)
        row.update({"round": server_round, **self.strategy.ledger.pop(server_round), **results})
        if due:
            row["eval-seconds"] = time.perf_counter() - t0
        if server_round > 0 and (self.cfg.run.save_every_round or last_round) and not self.full:
            self.save(f"round_{server_round}", adapters)
        now = time.perf_counter()
        row["seconds"] = now - self.last
        row["time"] = time.time()  # when the row was written (Unix time), to line runs up with other logs
        self.last = now
        self.run_dir.metrics.write(row)
        self.rows.append(row)
        # After the row: a crash in between only repeats this round. A round in which
        # every sampled client failed (as when the machine stops under a run) trained
        # nothing new; the checkpoint stays at the round before, so a resumed run
        # trains that round again instead of counting it as done.
        trained_nothing = bool(row.get("clients-sampled")) and not row["clients-ok"]
        if trained_nothing:
            log(WARNING, "Round %s: no client reply was aggregated; the checkpoint stays at the round before",
                server_round)  # fmt: skip
            self.unanswered.append(server_round)
        elif server_round > 0:
            self.run_dir.write_checkpoint(
                server_round, {k: v.numpy() for k, v in arrays.items()}, self.strategy.state()
            )
            if row["clients-ok"]:  # a round that sampled nobody expected no reply: it leaves the count as it is
                self.unanswered = []
        parts = [f"round {server_round}/{self.cfg.rounds_to_run}"]
        if row["train-loss"] is not None:
            parts.append(f"train-loss {row['train-loss']:.4f}")
        if due:
            text = f"eval-loss {results['eval-loss']:.4f}"
            if self.primary:
                spread = f" (std {results[self.primary + '-std']:.3f})" if f"{self.primary}-std" in results else ""
                text += f"  {self.primary} {results[self.primary]:.3f}{spread}"
            for view in self.views[1:]:
                text += f"  {view.prefix}eval-loss {results[view.prefix + 'eval-loss']:.4f}"
                if self.primary:
                    text += f"  {view.prefix}{self.primary} {results[view.prefix + self.primary]:.3f}"
            parts.append(text)
        if server_round > 0:
            parts.append(f"clients ok {row['clients-ok'] or 0} failed {row['clients-failed'] or 0}")
        parts.append(f"{row['seconds']:.1f} s")
        log(INFO, "[fedllm-flwr] %s", "  |  ".join(parts))
        limit = self.cfg.run.max_rounds_without_reply
        if limit and len(self.unanswered) >= limit:
            raise RunStopped(self.clients_gone(server_round))
        return MetricRecord({k: float(v) for k, v in results.items()}) if results else None

    def checkpoint_round(self) -> int:
        """The round the run folder's checkpoint holds (0: none written yet)."""
        return self.run_dir.checkpoint_round() if (self.run_dir.path / CHECKPOINT).is_file() else 0

    def clients_gone(self, server_round: int) -> str:
        """Why the run stops after `server_round`, and how it goes on."""
        kept = self.checkpoint_round()
        then = (f"the checkpoint holds round {kept}: once the clients are back, resume={self.run_dir.path} goes on "
                "from there" if kept else "no round trained, so there is no checkpoint: start the run again once the "
                "clients are back")  # fmt: skip
        return (
            f"stopped after round {server_round} of {self.cfg.rounds_to_run}: no client reply since round "
            f"{self.unanswered[0]} ({len(self.unanswered)} rounds sampled clients and aggregated nothing; "
            f"run.max_rounds_without_reply={self.cfg.run.max_rounds_without_reply}). adapter/final was not "
            f"written; {then}"
        )
