"""FedOT on the server: the full model and its emulator, what the clients are sent,
and the run's FedOT figures."""

from __future__ import annotations

import logging

from flwr.common.logger import log

from fedllm_flwr.algorithms.fedot.emulator import FedotSetup, package, prepare
from fedllm_flwr.algorithms.fedot.emulator_files import emulator_record
from fedllm_flwr.config import Config
from fedllm_flwr.model import count_parameters
from fedllm_flwr.server.evaluation import View
from fedllm_flwr.strategy.adapter_fedavg import AdapterFedAvg

INFO = logging.INFO


def prepare_server(cfg: Config) -> tuple[FedotSetup, list[View]]:
    """Build the full model and its emulator (distilled, packaged). Returns the setup
    (its `emulator` is the bundle whose adapter travels) and the views the server
    evaluates on."""
    setup = prepare(cfg)
    views = [View("", setup.full, setup.plan.to_full)]
    if cfg.algorithm.eval_emulator:
        views.append(View("emu-", setup.emulator))
    log(INFO, "[fedllm-flwr] FedOT: emulator keeps layers %s of %s (%s parameters of %s, %.1f MB): %s",
        list(setup.plan.emulator_layers), setup.plan.num_layers,
        f"{count_parameters(setup.emulator.model)[1]:,}", f"{count_parameters(setup.full.model)[1]:,}",
        setup.emulator_bytes / 1e6, setup.folder)  # fmt: skip
    return setup, views


def emulator_message(setup: FedotSetup):  # noqa: ANN201 - a RecordDict
    """The emulator's files as message records, for each node's first message."""
    return emulator_record(package(setup.folder))


def summary(setup: FedotSetup, strategy: AdapterFedAvg, first: dict, last: dict, primary: str | None) -> dict:
    """FedOT's figures for summary.json: the split, sizes, and both evaluation modes."""
    plan = setup.plan
    return {
        "full-layers": plan.num_layers,
        "emulator-layers": len(plan.emulator_layers),
        "kept-middle-layers": list(plan.middle),
        "dropped-layers": list(plan.dropped),
        "full-parameters": count_parameters(setup.full.model)[1],
        "emulator-parameters": count_parameters(setup.emulator.model)[1],
        "emulator-file-bytes": setup.emulator_bytes,
        "broadcast-message-bytes": strategy.broadcast_bytes,
        "nodes-sent-emulator": len(strategy.delivered),
        "distill-loss-first": setup.distill_losses[0] if setup.distill_losses else None,
        "distill-loss-last": setup.distill_losses[-1] if setup.distill_losses else None,
        "emu-eval-loss-round-0": first.get("emu-eval-loss"),
        "emu-eval-loss-final": last.get("emu-eval-loss"),
        "emu-score-round-0": first.get(f"emu-{primary}") if primary else None,
        "emu-score-final": last.get(f"emu-{primary}") if primary else None,
    }
