"""Reopening an interrupted run at its last checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Array, ArrayRecord
from flwr.common.logger import log

from fedllm_flwr.config import Config, cfg_to_yaml
from fedllm_flwr.errors import UserError
from fedllm_flwr.run_dir import RunDir
from fedllm_flwr.strategy import AdapterFedAvg

INFO = logging.INFO


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
