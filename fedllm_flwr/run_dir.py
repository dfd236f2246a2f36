"""The run folder: config.yaml, metrics.jsonl, adapter/round_<n>/, adapter/final/.

`adapter/final/` is written last, through a temporary folder and a rename, so
its presence means the run completed. A relative `run.output_dir` is taken
from `$FEDLLM_FLWR_HOME` (default `~/fedllm-flwr`): the SuperLink's working
directory never decides where results land.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from fedllm_flwr.config import Config, cfg_to_yaml
from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import MetricsLog
from fedllm_flwr.model import set_adapter_state


def home_dir() -> Path:
    env = os.environ.get("FEDLLM_FLWR_HOME")
    return Path(env).expanduser() if env else Path.home() / "fedllm-flwr"


def resolve_run_path(cfg: Config) -> Path:
    root = Path(cfg.run.output_dir).expanduser()
    if not root.is_absolute():
        root = home_dir() / root
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    if "/" in name or name in (".", ".."):
        raise UserError(f"run.name={name!r} must be a plain folder name")
    return root / name


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.metrics = MetricsLog(path / "metrics.jsonl")

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        """Make the run folder (refusing to reuse a non-empty one) and write config.yaml."""
        path = resolve_run_path(cfg)
        if path.exists() and any(path.iterdir()):
            if cfg.run.name:
                raise UserError(f"run folder {path} already exists and is not empty; choose another run.name")
            path = path.with_name(f"{path.name}-{os.getpid()}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"run.output_dir: cannot create {path}: {exc.strerror}") from None
        (path / "config.yaml").write_text(cfg_to_yaml(cfg))
        return cls(path)

    def save_adapters(self, model: PeftModel, folder: str, states: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Save adapters in peft's format under adapter/<folder>/ (atomically).

        `states` maps a subfolder name to an adapter state; the name "" saves
        into adapter/<folder>/ itself (one global adapter). Each state is loaded
        into `model` in turn. The folder appears complete or not at all.
        """
        target = self.path / "adapter" / folder
        tmp = target.with_name(f".{folder}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for name, state in states.items():
            set_adapter_state(model, state)
            model.save_pretrained(tmp / name if name else tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
