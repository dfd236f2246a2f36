"""The story of a run on the server: validate everything, then federate, evaluate, save.

`run_server` does all checks that can fail on user input (what the run uses outside
its process: folders, the tracking server, data files; then the model, data and
adapter targets) before the run folder exists or any message is sent, so a bad run
stops early and leaves nothing that looks complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedllm_flwr.algorithms.registry import algorithm_for
from fedllm_flwr.config import Config
from fedllm_flwr.data import records, test_records
from fedllm_flwr.errors import UserError
from fedllm_flwr.init_adapter import read_adapter
from fedllm_flwr.model import count_parameters
from fedllm_flwr.plot import write_curves
from fedllm_flwr.preflight import check_external
from fedllm_flwr.privacy.runner import privacy_summary, private_runner, private_strategy
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.server.evaluation import RunStopped, ServerEvaluator
from fedllm_flwr.server.grid import polled
from fedllm_flwr.server.nodes import discover_nodes, example_limits
from fedllm_flwr.server.personalize import personalize_clients
from fedllm_flwr.server.ranks import RankQuery, node_ranks
from fedllm_flwr.server.resume import resume_run
from fedllm_flwr.strategy.registry import strategy_class
from fedllm_flwr.strategy.round_setup import RoundSetup
from fedllm_flwr.tasks.registry import task_of
from fedllm_flwr.tracking import check_installed, open_trackers
from fedllm_flwr.transport import state_to_arrays
from fedllm_flwr.worker_start import await_warm_up, is_simulation

INFO = logging.INFO


def run_server(grid: Grid, cfg: Config, warm_ups: Sequence[str] = ()) -> RunDir:
    """Run the configured federated job to the end; returns the finished run folder.
    `warm_ups`: ids of warm-up messages in flight, answered before the first round.
    A run whose clients are gone (`run.max_rounds_without_reply`) stops with RunStopped,
    its summary.json saying `stopped` and why."""
    t_start = time.perf_counter()
    grid = polled(grid, cfg.run.poll_seconds)
    check_installed(cfg)  # a tracker switched on without its library: before any work
    check_external(cfg)  # folders, the tracking server and data files (server_app checks both before its warm-up)
    records(cfg)  # read and check the whole data set before the (slower) model
    log(INFO, "[fedllm-flwr] loading base model %s (a GGUF is converted once, ~20 s)", cfg.model.name)
    kind = strategy_class(cfg)
    nodes, ranks, ask_ranks = {}, {}, None
    if kind.learns_ranks:  # the global adapter takes the largest site's rank
        cfg, nodes, ranks = node_ranks(grid, cfg)
        ask_ranks = RankQuery(grid, cfg)  # privacy=none: the config refuses privacy with these strategies
    algorithm = algorithm_for(cfg)
    served = algorithm.server_model()
    bundle = served.bundle
    client_config = ConfigRecord(served.client_config)  # sent with every message
    trainable, total = count_parameters(bundle.model)
    # The seeded initial adapter, not what the model holds now: a process that ran a job
    # before (a test, a sweep's warm server) left that job's last adapter in it.
    initial = dict(bundle.initial)
    if cfg.init.adapter:  # a saved adapter instead (checked against the configured one)
        initial = read_adapter(bundle.model, cfg.init.adapter)
        log(INFO, "[fedllm-flwr] the global adapter starts from %s", cfg.init.adapter)
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
    task_of(cfg).check(cfg)  # the task's own settings (GRPO's reward functions import)
    task_of(cfg).generation_records(cfg, test)  # HumanEval's problems load (or fail) before the run folder exists
    done, state = 0, None  # rounds completed before this start, the strategy's state then (a resumed run)
    if cfg.resume:
        run_dir, done, initial_arrays, state = resume_run(cfg)
    else:
        run_dir, initial_arrays = RunDir.create(cfg), state_to_arrays(initial)
    run_dir.metrics.trackers = open_trackers(cfg, run_dir.path, run_dir.rows() if done else [])
    completed, final = False, None
    try:
        log(INFO, "[fedllm-flwr] run folder: %s", run_dir.path)
        if not nodes and (cfg.strategy.availability != "always" or (done and kind.finds_nodes_by_partition)):
            nodes = discover_nodes(grid, cfg)
        max_examples = {}
        if is_simulation(grid) and cfg.dataset.source != "sites":  # the server holds every partition's data
            nodes = nodes or discover_nodes(grid, cfg)
            max_examples = example_limits(cfg, nodes, kind.holds_all_data)
        setup = RoundSetup(nodes, max_examples, round_offset=done, ranks=ranks, ask_ranks=ask_ranks)
        # An algorithm that aggregates something else than adapters brings its strategy (zo: seed lists).
        strategy = private_strategy(cfg, setup=setup, **algorithm.strategy(bundle.model))
        if state is not None:
            strategy.load_state(state)
        evaluator = ServerEvaluator(cfg, bundle, test, run_dir, strategy, served.views, algorithm.model_saver)
        if done:
            evaluator.rows = run_dir.rows()
        if served.broadcast is not None:
            strategy.set_broadcast(served.broadcast)
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

        runner = private_runner(cfg, strategy)
        if warm_ups:
            await_warm_up(grid, list(warm_ups), cfg.strategy.round_timeout)
        about = {"scenario": cfg.scenario.name, "method": cfg.peft.method, "seed": cfg.seed,
                 "rounds": cfg.rounds_to_run, "num-rounds": cfg.num_rounds}  # fmt: skip
        try:
            result = runner.start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=cfg.rounds_to_run - done,
                timeout=cfg.strategy.round_timeout,
                train_config=ConfigRecord({"num-rounds": cfg.num_rounds, **dict(client_config.items())}),
                evaluate_config=client_config,
                evaluate_fn=evaluate_fn,
            )
        except RunStopped as stop:
            run_dir.write_summary({"status": "stopped", "reason": str(stop), **about,
                                   "last-round": evaluator.rows[-1]["round"],
                                   "checkpoint-round": evaluator.checkpoint_round(),
                                   "seconds": round(time.perf_counter() - t_start, 2)})  # fmt: skip
            raise
        if result.arrays is None or len(result.arrays) == 0:  # no round after a resume aggregated anything
            result.arrays = initial_arrays
        if not evaluator.rows or evaluator.rows[-1]["round"] != cfg.rounds_to_run:
            raise RuntimeError("the strategy stopped before the last round; adapter/final was not written")
        if not any(r["clients-ok"] for r in evaluator.rows[1:]):
            raise RuntimeError("no client reply was aggregated in any round; adapter/final was not written")
        final = evaluator.save("final", evaluator.adapters(result.arrays))
        personalization = (
            personalize_clients(grid, cfg, result.arrays, run_dir, evaluator, client_config, strategy.arrays_for)
            if cfg.personalize.ft_steps
            else None
        )
        first, last = evaluator.rows[0], evaluator.rows[-1]
        run_dir.write_summary(
            {
                "status": "completed",
                **about,
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
                "fedot": algorithm.summary(strategy, first, last, evaluator.primary),
                "privacy": privacy_summary(cfg, runner, evaluator.rows),
            }
        )
        completed = True
    finally:
        run_dir.metrics.close(completed, final)
    if cfg.log.curves:
        write_curves(run_dir.path)
    log(INFO, "[fedllm-flwr] done in %.1f s; %s saved to %s", time.perf_counter() - t_start,
        "model" if evaluator.full else "adapter", final)  # fmt: skip
    return run_dir
