"""FedOT (algorithm=fedot) on the server: the full model and its emulator, what the
clients are sent, and the run's FedOT figures."""

from __future__ import annotations

import logging

from flwr.app import RecordDict
from flwr.common.logger import log

from fedllm_flwr.config import Config
from fedllm_flwr.model import ModelBundle, count_parameters
from fedllm_flwr.offsite_files import emulator_record
from fedllm_flwr.server.evaluation import View
from fedllm_flwr.strategy import AdapterFedAvg

INFO = logging.INFO


def prepare_fedot(cfg: Config):  # noqa: ANN201 - an offsite.Offsite
    """Build the full model and its emulator (distilled, packaged). Returns (the
    offsite setup, the bundle whose adapter travels, the views the server evaluates
    on, the emulator's files as message records for each node's first message)."""
    from fedllm_flwr.offsite import package, prepare

    offsite = prepare(cfg)
    bundle: ModelBundle = offsite.emulator  # clients train on the emulator; its adapter state travels
    views = [View("", offsite.full, offsite.plan.to_full)]
    if cfg.algorithm.eval_emulator:
        views.append(View("emu-", offsite.emulator))
    log(INFO, "[fedllm-flwr] FedOT: emulator keeps layers %s of %s (%s parameters of %s, %.1f MB): %s",
        list(offsite.plan.emulator_layers), offsite.plan.num_layers,
        f"{count_parameters(offsite.emulator.model)[1]:,}", f"{count_parameters(offsite.full.model)[1]:,}",
        offsite.emulator_bytes / 1e6, offsite.folder)  # fmt: skip
    files: RecordDict = emulator_record(package(offsite.folder))
    return offsite, bundle, views, files


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
