"""The server's side of a run: validate everything, then federate, evaluate, save.

`run_server` does all checks that can fail on user input (model, data, adapter
targets) before the run folder exists or any message is sent, so a bad run
stops early and leaves nothing that looks complete.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.config import Config, cfg_to_yaml
from fedllm_flwr.data import records, test_records, tokenize_set
from fedllm_flwr.errors import UserError
from fedllm_flwr.evaluate.loss import evaluate_loss
from fedllm_flwr.evaluate.tasks import PRIMARY, run_generation_task
from fedllm_flwr.keys import EMULATOR_ID_KEY
from fedllm_flwr.model import ModelBundle, build_model, count_parameters, get_adapter_state, set_adapter_state
from fedllm_flwr.offsite_files import emulator_record
from fedllm_flwr.privacy.runner import privacy_summary, private_runner, private_strategy
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.strategy import AdapterFedAvg, LocalAdapters
from fedllm_flwr.transport import arrays_to_state, state_to_arrays
from fedllm_flwr.worker_start import await_warm_up, is_simulation

INFO, WARNING = logging.INFO, logging.WARNING

#: Keys present in every metrics.jsonl row (null where a round has no value), so
#: the file loads into one table.
ROW_KEYS = (
    "round", "train-loss", "eval-loss", "eval-ppl", "accuracy", "bytes-down", "bytes-up",
    "seconds", "clients-ok", "clients-failed",
)  # fmt: skip


def generation_records(cfg: Config, test: list[dict[str, str]]) -> list[dict]:
    """What the server generates for: the test records, or HumanEval's problems."""
    if cfg.dataset.metric == "humaneval":
        from fedllm_flwr.evaluate.humaneval import load_problems

        return load_problems(limit=cfg.eval.limit)
    return test


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
    ) -> None:
        self.cfg, self.bundle, self.run_dir, self.strategy = cfg, bundle, run_dir, strategy
        self.views = views or [View("", bundle)]
        self.test_records = test
        self.reward = cfg.task.name == "reward"
        self.metric = cfg.dataset.metric
        self.primary = "preference-accuracy" if self.reward else PRIMARY.get(self.metric)
        self.gen_records = [] if self.reward else generation_records(cfg, self.test_records)
        self.last = time.perf_counter()
        self.rows: list[dict[str, Any]] = []

    @functools.cached_property
    def test_set(self):
        """The test records tokenized (pairs for task=reward), when first evaluated
        (never, with eval.every=0)."""
        return tokenize_set(self.cfg, self.test_records, self.bundle.tokenizer)

    def adapters(self, arrays: ArrayRecord) -> dict[str, ArrayRecord]:
        """The adapter(s) a round produced, by folder name ("" for the global one)."""
        if isinstance(self.strategy, LocalAdapters) and self.strategy.adapters:
            return {f"client_{pid}": a for pid, a in self.strategy.client_adapters().items()}
        return {"": arrays}

    def evaluate(self, bundle: ModelBundle) -> dict[str, float]:
        model, tok = bundle.model, bundle.tokenizer
        if self.reward:  # preference accuracy, mean margin, Bradley-Terry loss on the test pairs
            from fedllm_flwr.reward import evaluate_preferences

            scores = evaluate_preferences(model, self.test_set, tok.pad_token_id, self.cfg.eval.batch_size)
            return {k: v for k, v in scores.items() if k != "pairs"}
        loss = evaluate_loss(model, self.test_set, tok.pad_token_id, self.cfg.eval.batch_size)
        results = {"eval-loss": loss["loss"], "eval-ppl": loss["ppl"]}
        if self.primary:
            scores, _ = run_generation_task(
                self.metric, model, tok, self.gen_records, self.cfg.eval, seed=self.cfg.seed
            )
            results.update({k: v for k, v in scores.items() if k not in ("num-examples", "samples-per-problem")})
        return results

    def save(self, folder: str, adapters: dict[str, ArrayRecord]) -> Path:
        main = self.views[0]
        states = {name: main.convert(self.bundle.complete(arrays_to_state(a))) for name, a in adapters.items()}
        return self.run_dir.save_adapters(main.bundle.model, folder, states)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        last_round = server_round == self.cfg.rounds_to_run
        every = self.cfg.eval.every
        due = every > 0 and (server_round == 0 or last_round or server_round % every == 0)
        adapters = self.adapters(arrays)
        t0 = time.perf_counter()
        results: dict[str, float] = {}
        if due:
            per_adapter = {}
            for name, own in adapters.items():
                state = self.bundle.complete(arrays_to_state(own))
                per_adapter[name] = {}
                for view in self.views:
                    set_adapter_state(view.bundle.model, view.convert(state))
                    per_adapter[name].update({view.prefix + k: v for k, v in self.evaluate(view.bundle).items()})
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
        if server_round > 0 and (self.cfg.run.save_every_round or last_round):
            self.save(f"round_{server_round}", adapters)
        now = time.perf_counter()
        row["seconds"] = now - self.last
        row["time"] = time.time()  # when the row was written (Unix time), to line runs up with other logs
        self.last = now
        self.run_dir.metrics.write(row)
        self.rows.append(row)
        if server_round > 0:  # after the row: a crash in between only repeats this round
            self.run_dir.write_checkpoint(
                server_round, {k: v.numpy() for k, v in arrays.items()}, self.strategy.state()
            )
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
        return MetricRecord({k: float(v) for k, v in results.items()}) if results else None


def connected_nodes(grid: Grid, cfg: Config) -> list[int]:
    """The connected nodes, once `strategy.min_available_nodes` are (or the round timeout passed)."""
    deadline = time.monotonic() + cfg.strategy.round_timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < cfg.strategy.min_available_nodes and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def discover_nodes(grid: Grid, cfg: Config) -> dict[int, dict[str, Any]]:
    """Ask every connected node for its partition and main data category (a QUERY
    message each), once `strategy.min_available_nodes` are connected."""
    nodes = connected_nodes(grid, cfg)
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    info = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            log(WARNING, "[fedllm-flwr] node %s did not describe itself: %s", reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip
            continue
        info[reply.metadata.src_node_id] = dict(reply.content["info"].items())
    log(INFO, "[fedllm-flwr] nodes: %s", {n: (i["partition-id"], i["category"]) for n, i in sorted(info.items())})
    return info


def example_limits(cfg: Config, nodes: dict[int, dict[str, Any]]) -> dict[int, int]:
    """Node id -> the most training examples it holds, from the server's own copy
    of the data (simulation; a deployed site's data is its own, see the README).
    Under scenario=global the one training node holds every record."""
    from fedllm_flwr.data import train_set, train_size

    if cfg.scenario.name == "global":
        return {node: len(train_set(cfg)) for node in nodes}
    return {node: train_size(cfg, int(i["partition-id"]), int(i["num-partitions"])) for node, i in nodes.items()}


def personalize_clients(
    grid: Grid, cfg: Config, arrays: ArrayRecord, run_dir: RunDir, evaluator: ServerEvaluator, config: ConfigRecord
) -> dict:
    """FedAvg + FT: every node tunes the final adapter on its own data and reports
    held-out scores before and after; the personalized adapters are saved under
    adapter/personalized/client_<partition>/ and the rows in personalization.jsonl."""
    from fedllm_flwr.compression import codecs
    from fedllm_flwr.keys import PERSONALIZE_KEY
    from fedllm_flwr.transport import pack, unpack

    packed = pack(arrays, codecs(cfg.compression)[0])
    config = ConfigRecord({**dict(config.items()), "server-round": cfg.num_rounds, PERSONALIZE_KEY: 1})
    messages = []
    for node in grid.get_node_ids():
        content = RecordDict(dict(packed.items()))
        content["config"] = config
        messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
    log(INFO, "[fedllm-flwr] personalizing: %s clients tune %s steps each", len(messages), cfg.personalize.ft_steps)
    rows, states = [], {}
    for reply in grid.send_and_receive(messages, timeout=cfg.strategy.round_timeout):
        if reply.has_error():
            log(
                WARNING,
                "[fedllm-flwr] node %s failed to personalize: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        metrics = dict(next(iter(reply.content.metric_records.values())).items())
        pid = int(metrics["partition-id"])
        # The whole personalized adapter: the shared tensors and, under partial
        # sharing, the node's private ones (saved here, at the end of the run).
        try:
            state = unpack(reply.content)
        except ValueError as exc:
            log(WARNING, "[fedllm-flwr] node %s: personalized adapter dropped: %s", reply.metadata.src_node_id, exc)
            continue
        states[f"client_{pid}"] = state_to_arrays({k: torch.from_numpy(v.copy()) for k, v in state.items()})
        rows.append({"partition-id": pid, **{k: v for k, v in metrics.items() if k != "partition-id"}})
    rows.sort(key=lambda r: r["partition-id"])
    if states:
        evaluator.save("personalized", states)
    with open(run_dir.path / "personalization.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    means = (
        {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith(("before-", "after-"))}
        if rows
        else {}
    )
    for row in rows:
        log(INFO, "[fedllm-flwr] client %s: %s", row["partition-id"],
            "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("before-", "after-"))))  # fmt: skip
    return {"clients": len(rows), **means}


def offsite_summary(offsite, strategy: AdapterFedAvg, first: dict, last: dict, primary: str | None) -> dict:
    """FedOT's figures for summary.json: the split, sizes, and both evaluation modes."""
    plan = offsite.plan
    return {
        "full-layers": plan.num_layers,
        "emulator-layers": len(plan.emulator_layers),
        "kept-middle-layers": list(plan.middle),
        "dropped-layers": list(plan.dropped),
        "full-parameters": count_parameters(offsite.full.model)[1],
        "emulator-parameters": count_parameters(offsite.emulator.model)[1],
        "emulator-file-bytes": offsite.emulator_bytes,
        "broadcast-message-bytes": strategy.broadcast_bytes,
        "nodes-sent-emulator": len(strategy.delivered),
        "distill-loss-first": offsite.distill_losses[0] if offsite.distill_losses else None,
        "distill-loss-last": offsite.distill_losses[-1] if offsite.distill_losses else None,
        "emu-eval-loss-round-0": first.get("emu-eval-loss"),
        "emu-eval-loss-final": last.get("emu-eval-loss"),
        "emu-score-round-0": first.get(f"emu-{primary}") if primary else None,
        "emu-score-final": last.get(f"emu-{primary}") if primary else None,
    }


def resume_run(cfg: Config, strategy: AdapterFedAvg) -> tuple[RunDir, int, ArrayRecord]:
    """Reopen `cfg.resume` at its last checkpoint: check that the config is the same
    (but for `run` and `resume`), drop whatever was written after that round, and
    restore the strategy. Returns (run folder, rounds done, global adapter)."""
    from omegaconf import OmegaConf

    path = Path(cfg.resume).expanduser()
    if not (path / "config.yaml").is_file():
        raise UserError(f"resume={cfg.resume}: not a run folder (no config.yaml)")
    before = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    now = OmegaConf.to_container(OmegaConf.create(cfg_to_yaml(cfg)))
    changed = sorted(
        f"{group}.{key}" if isinstance(now.get(group), dict) else group
        for group in set(before) | set(now)
        if group not in ("run", "resume") and before.get(group) != now.get(group)
        for key in (
            [k for k in set(before.get(group) or {}) | set(now.get(group) or {})
             if (before.get(group) or {}).get(k) != (now.get(group) or {}).get(k)]
            if isinstance(now.get(group), dict) else [None]
        )
    )  # fmt: skip
    if changed:
        raise UserError(
            f"resume={cfg.resume}: the config differs from the run being resumed in {', '.join(changed)}; "
            "give the same overrides as that run, plus resume=..."
        )
    run_dir = RunDir(path)
    done, adapter, state = run_dir.read_checkpoint()
    if done >= cfg.rounds_to_run:
        raise UserError(f"resume={cfg.resume}: all {cfg.rounds_to_run} rounds are done already")
    run_dir.rewind(done)
    strategy.load_state(state)
    log(INFO, "[fedllm-flwr] resuming %s after round %s of %s", path, done, cfg.rounds_to_run)
    return run_dir, done, ArrayRecord({k: Array(v) for k, v in adapter.items()})


def run_server(grid: Grid, cfg: Config, warm_ups: Sequence[str] = ()) -> RunDir:
    """Run the configured federated job to the end; returns the finished run folder.
    `warm_ups`: ids of warm-up messages in flight, answered before the first round."""
    t_start = time.perf_counter()
    records(cfg)  # read and check the whole data set before the (slower) model
    log(INFO, "[fedllm-flwr] loading base model %s (a GGUF is converted once, ~20 s)", cfg.model.name)
    offsite, views = None, None
    client_config = ConfigRecord()  # sent with every message
    if cfg.algorithm.name == "fedot":
        from fedllm_flwr.offsite import package, prepare

        offsite = prepare(cfg)
        bundle = offsite.emulator  # clients train on the emulator; its adapter state travels
        views = [View("", offsite.full, offsite.plan.to_full)]
        if cfg.algorithm.eval_emulator:
            views.append(View("emu-", offsite.emulator))
        client_config[EMULATOR_ID_KEY] = offsite.fingerprint
        log(INFO, "[fedllm-flwr] FedOT: emulator keeps layers %s of %s (%s parameters of %s, %.1f MB): %s",
            list(offsite.plan.emulator_layers), offsite.plan.num_layers,
            f"{count_parameters(offsite.emulator.model)[1]:,}", f"{count_parameters(offsite.full.model)[1]:,}",
            offsite.emulator_bytes / 1e6, offsite.folder)  # fmt: skip
    else:
        bundle = build_model(cfg.model, cfg.peft, cfg.train.precision, cfg.seed, task=cfg.task.name)
    trainable, total = count_parameters(bundle.model)
    initial = get_adapter_state(bundle.model)
    if cfg.personalize.private:
        shared = {k: v for k, v in initial.items() if not cfg.personalize.is_private(k)}
        if len(shared) in (0, len(initial)):
            example = next(iter(initial))
            raise UserError(
                f"personalize.private={list(cfg.personalize.private)} must match some but not all adapter tensors "
                f"(it matches {len(initial) - len(shared)} of {len(initial)}; names look like {example})"
            )
        log(INFO, "[fedllm-flwr] partial sharing: %s of %s adapter tensors stay on the clients",
            len(initial) - len(shared), len(initial))  # fmt: skip
        initial = shared
    test = test_records(cfg)
    if cfg.task.name == "lm":
        generation_records(cfg, test)  # HumanEval's problems load (or fail) before the run folder exists
    strategy = private_strategy(cfg)
    done = 0  # rounds completed before this start (a resumed run)
    if cfg.resume:
        run_dir, done, initial_arrays = resume_run(cfg, strategy)
    else:
        run_dir, initial_arrays = RunDir.create(cfg), state_to_arrays(initial)
    evaluator = ServerEvaluator(cfg, bundle, test, run_dir, strategy, views)
    if done:
        evaluator.rows = run_dir.rows()
        strategy.round_offset = done
    if offsite is not None:
        strategy.set_broadcast(emulator_record(package(offsite.folder)))
    log(INFO, "[fedllm-flwr] run folder: %s", run_dir.path)
    if cfg.strategy.availability != "always" or (done and cfg.scenario.name == "local"):
        strategy.nodes = discover_nodes(grid, cfg)
    if is_simulation(grid) and cfg.dataset.source != "sites":  # the server holds every partition's data
        strategy.nodes = strategy.nodes or discover_nodes(grid, cfg)
        strategy.max_examples = example_limits(cfg, strategy.nodes)
    log(
        INFO,
        "[fedllm-flwr] scenario %s, base %s (%s), adapter %s: %s trainable of %s parameters",
        cfg.scenario.name,
        bundle.base_path,
        str(bundle.dtype).replace("torch.", ""),
        cfg.peft.method,
        f"{trainable:,}",
        f"{total:,}",
    )

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if done and server_round == 0:
            return None  # a resumed run: round `done` was evaluated and logged already
        return evaluator(server_round + done, arrays)

    runner = private_runner(cfg, strategy, len(connected_nodes(grid, cfg)) if cfg.privacy.name == "dp" else 0)
    if warm_ups:
        await_warm_up(grid, list(warm_ups), cfg.strategy.round_timeout)
    result = runner.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=cfg.rounds_to_run - done,
        timeout=cfg.strategy.round_timeout,
        train_config=ConfigRecord({"num-rounds": cfg.num_rounds, **dict(client_config.items())}),
        evaluate_config=client_config,
        evaluate_fn=evaluate_fn,
    )
    if result.arrays is None or len(result.arrays) == 0:  # no round after a resume aggregated anything
        result.arrays = initial_arrays
    if not evaluator.rows or evaluator.rows[-1]["round"] != cfg.rounds_to_run:
        raise RuntimeError("the strategy stopped before the last round; adapter/final was not written")
    if not any(r["clients-ok"] for r in evaluator.rows[1:]):
        raise RuntimeError("no client reply was aggregated in any round; adapter/final was not written")
    final = evaluator.save("final", evaluator.adapters(result.arrays))
    personalization = (
        personalize_clients(grid, cfg, result.arrays, run_dir, evaluator, client_config)
        if cfg.personalize.ft_steps
        else None
    )
    first, last = evaluator.rows[0], evaluator.rows[-1]
    run_dir.write_summary(
        {
            "status": "completed",
            "scenario": cfg.scenario.name,
            "method": cfg.peft.method,
            "seed": cfg.seed,
            "rounds": cfg.rounds_to_run,
            "num-rounds": cfg.num_rounds,
            "trainable-parameters": trainable,
            "seconds": round(time.perf_counter() - t_start, 2),
            "metric": evaluator.primary,
            "accuracy-round-0": first.get("accuracy"),
            "accuracy-final": last.get("accuracy"),
            "score-round-0": first.get(evaluator.primary) if evaluator.primary else None,
            "score-final": last.get(evaluator.primary) if evaluator.primary else None,
            "eval-loss-round-0": first.get("eval-loss"),
            "eval-loss-final": last.get("eval-loss"),
            "adapter": str(final),
            "base-model": bundle.base_path,
            "personalization": personalization,
            "fedot": offsite_summary(offsite, strategy, first, last, evaluator.primary) if offsite else None,
            "privacy": privacy_summary(cfg, runner),
        }
    )
    log(INFO, "[fedllm-flwr] done in %.1f s; adapter saved to %s", time.perf_counter() - t_start, final)
    return run_dir
