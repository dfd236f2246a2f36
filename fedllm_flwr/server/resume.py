"""Reopening an interrupted run at its last checkpoint."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.logger import log

from fedllm_flwr.config import Config, cfg_to_yaml
from fedllm_flwr.files import write_text_atomically
from fedllm_flwr.run_dir import RunDir

INFO = logging.INFO


def resume_run(cfg: Config) -> tuple[RunDir, int, ArrayRecord, dict[str, np.ndarray]]:
    """Reopen `cfg.resume` at its last checkpoint: check that the config is the same
    (but for `run` and `resume`), drop whatever was written after that round, and record
    this start's config. Returns (run folder, rounds done, global adapter, the strategy's
    state: the caller builds the strategy knowing the rounds done, then `load_state`s it)."""
    run_dir, done = RunDir.reopen(cfg)
    _, adapter, state = run_dir.read_checkpoint()
    run_dir.rewind(done)
    # The config differs at most in `run` and `resume`: record them as this start has them
    # (a run first stopped by `run.stop_after` goes on with its own).
    write_text_atomically(run_dir.path / "config.yaml", cfg_to_yaml(cfg))
    log(INFO, "[fedllm-flwr] resuming %s after round %s of %s", run_dir.path, done, cfg.rounds_to_run)
    return run_dir, done, ArrayRecord({k: Array(v) for k, v in adapter.items()}), state
