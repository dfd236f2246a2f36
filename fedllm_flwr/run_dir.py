"""The run folder: config.yaml, metrics.jsonl, adapter/round_<n>/, adapter/final/.

`adapter/final/` is written last, through a temporary folder and a rename, so
its presence means the run completed. A relative `run.output_dir` is taken
from `$FEDLLM_FLWR_HOME` (default `~/fedllm-flwr`): the SuperLink's working
directory never decides where results land.

Light at import (no torch, peft or transformers): a sweep's driver process and the
CLI read and resume run folders without loading the ML stack; only `save_adapters`
needs it, from the model it is given.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedllm_flwr.config import Config, cfg_to_yaml, config_changes
from fedllm_flwr.errors import UserError
from fedllm_flwr.files import publish, temp_folder, write_atomically, write_text_atomically
from fedllm_flwr.metrics import MetricsLog

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

CHECKPOINT = "checkpoint.safetensors"


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

    @classmethod
    def reopen(cls, cfg: Config) -> tuple[RunDir, int]:
        """The run folder `cfg.resume` names and the round its checkpoint holds, after
        checking it can go on: it is a run folder, its config is this one (but for `run`
        and `resume`) and rounds remain. Changes nothing; raises UserError naming why not."""
        from omegaconf import OmegaConf

        path = Path(cfg.resume).expanduser()
        if not (path / "config.yaml").is_file():
            raise UserError(f"resume={cfg.resume}: not a run folder (no config.yaml)")
        before = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        changed = config_changes(before, OmegaConf.to_container(OmegaConf.create(cfg_to_yaml(cfg))))
        if changed:
            raise UserError(
                f"resume={cfg.resume}: the config differs from the run being resumed in {', '.join(changed)}; "
                "give the same overrides as that run, plus resume=..."
            )
        run_dir = cls(path)
        done = run_dir.checkpoint_round()
        if done >= cfg.rounds_to_run:
            raise UserError(f"resume={cfg.resume}: all {cfg.rounds_to_run} rounds are done already")
        return run_dir, done

    def save_adapters(self, model: PeftModel, folder: str, states: dict[str, dict[str, torch.Tensor]]) -> Path:
        """Save adapters in peft's format under adapter/<folder>/ (atomically).

        `states` maps a subfolder name to an adapter state; the name "" saves
        into adapter/<folder>/ itself (one global adapter). Each state is loaded
        into `model` in turn. The folder appears complete or not at all.
        """
        from fedllm_flwr.model import set_adapter_state

        target = self.path / "adapter" / folder
        with temp_folder(target.parent, folder) as tmp:
            for name, state in states.items():
                set_adapter_state(model, state)
                model.save_pretrained(tmp / name if name else tmp)
            publish(tmp, target, replace=True)
        return target

    def write_checkpoint(
        self, server_round: int, arrays: dict[str, np.ndarray], strategy: dict[str, np.ndarray]
    ) -> None:
        """Everything a resumed run needs after `server_round`: the global adapter as
        exchanged (fp32) and the strategy's state. Only the latest is kept; it is
        replaced atomically, so a crash leaves the previous one intact."""
        from safetensors.numpy import save_file

        tensors = {f"adapter/{k}": np.ascontiguousarray(v) for k, v in arrays.items()}
        tensors.update({f"strategy/{k}": np.ascontiguousarray(v) for k, v in strategy.items()})
        metadata = {"round": str(server_round)}
        write_atomically(self.path / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    def checkpoint_round(self) -> int:
        """The round the last checkpoint was written after (its tensors are not read)."""
        return self.read_checkpoint(tensors=False)[0]

    def read_checkpoint(self, tensors: bool = True) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(round, global adapter, strategy state) of the last checkpoint; with
        `tensors=False`, the round and two empty dicts."""
        from safetensors import safe_open

        path = self.path / CHECKPOINT
        if not path.is_file():
            raise UserError(f"resume: {self.path} has no {CHECKPOINT}; it stopped before its first round ended")
        with safe_open(str(path), framework="numpy") as handle:
            server_round = int(handle.metadata()["round"])
            found = {k: handle.get_tensor(k) for k in (handle.keys() if tensors else [])}
        adapter = {k.removeprefix("adapter/"): v for k, v in found.items() if k.startswith("adapter/")}
        strategy = {k.removeprefix("strategy/"): v for k, v in found.items() if k.startswith("strategy/")}
        return server_round, adapter, strategy

    def rows(self) -> list[dict[str, Any]]:
        path = self.metrics.path
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def rewind(self, server_round: int) -> list[dict[str, Any]]:
        """Drop what was written after `server_round` (metrics rows, round adapters,
        a final adapter) so a resumed run writes each round once; returns the rows kept."""
        kept = [r for r in self.rows() if r["round"] <= server_round]
        write_text_atomically(self.metrics.path, "".join(json.dumps(r) + "\n" for r in kept))
        adapters = self.path / "adapter"
        for folder in adapters.glob("round_*") if adapters.is_dir() else []:
            if int(folder.name.removeprefix("round_")) > server_round:
                shutil.rmtree(folder)
        for leftover in ("final", "personalized"):
            shutil.rmtree(adapters / leftover, ignore_errors=True)
        (self.path / "summary.json").unlink(missing_ok=True)
        return kept

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json; non-finite figures (an epsilon without noise) become null, as in metrics.jsonl."""
        (self.path / "summary.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
