"""Live curves in the trackers ML engineers already run: TensorBoard and MLflow.

Every row the run writes to metrics.jsonl (one per round: the server's test
metrics, the clients' means and per-client values, bytes, seconds, memory,
privacy spent) also goes, as it is written, to each tracker switched on with
`log.tensorboard` / `log.mlflow`. Both libraries are optional (the `tracking`
extra); a switch that is on without its library fails before the run starts.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol

from fedllm_flwr.config import Config, cfg_to_yaml, flatten
from fedllm_flwr.errors import UserError

EXTRA = "pip install -e '.[tracking]'"
#: Row keys that are not curves: the step itself and its wall-clock time.
NOT_SCALARS = ("round", "time")
_CLIENT_KEY = re.compile(r"^client_(\d+)-(.+)$")


def check_installed(cfg: Config) -> None:
    """One line naming the extra when a switch is on and its library is missing."""
    for switch, module, package in (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")):
        if getattr(cfg.log, switch) and importlib.util.find_spec(module) is None:
            raise UserError(f"log.{switch}=true needs the {package} package: {EXTRA}")


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A row's curves by tag: `client_<n>/<metric>` for per-client values (TensorBoard
    and MLflow group tags by what precedes the slash), `round/<metric>` for the rest."""
    out = {}
    for key, value in row.items():
        if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            continue
        match = _CLIENT_KEY.match(key)
        out[f"client_{match[1]}/{match[2]}" if match else f"round/{key}"] = float(value)
    return out


def flat_config(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys (MLflow params)."""
    import yaml

    return flatten(yaml.safe_load(cfg_to_yaml(cfg)))


class Tracker(Protocol):
    def log_row(self, row: dict[str, Any]) -> None: ...

    def finish(self, completed: bool, adapter: Path | None) -> None: ...


class TensorBoardTracker:
    """Event files under `<run>/tensorboard/` (torch's SummaryWriter, from the
    tensorboard package): `tensorboard --logdir ~/fedllm-flwr/outputs` shows every run."""

    def __init__(self, cfg: Config, run_path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        self.writer.add_text("config", "```\n" + cfg_to_yaml(cfg) + "```", 0)

    def log_row(self, row: dict[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["round"], walltime=row.get("time"))
        self.writer.flush()

    def finish(self, completed: bool, adapter: Path | None) -> None:
        self.writer.close()


def mlflow_store(cfg: Config, run_path: Path) -> tuple[str, Path | None]:
    """(tracking URI, local artifact folder or None): `$MLFLOW_TRACKING_URI` when set
    (the user's server decides where artifacts go), else MLflow's default local
    backend, a SQLite file, beside the run folders (`run.output_dir`), artifacts next
    to it. MLflow 3 refuses its older folder store unless told otherwise."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    parent = run_path.parent.resolve()
    return f"sqlite:///{parent / 'mlflow.db'}", parent / "mlartifacts"


class MlflowTracker:
    """One MLflow run per federated run: the flattened config as params, every row as
    metrics at step = round, the final adapter as an artifact. A resumed run continues
    the same MLflow run (its id is kept in `<run>/mlflow-run-id`)."""

    def __init__(self, cfg: Config, run_path: Path) -> None:
        from mlflow import MlflowClient

        uri, artifacts = mlflow_store(cfg, run_path)
        self.client = MlflowClient(tracking_uri=uri)
        name = cfg.log.experiment or "fedllm-flwr"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = (artifacts / name).as_uri() if artifacts else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        id_file = run_path / "mlflow-run-id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=run_path.name, tags={"run-folder": str(run_path)})
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id + "\n")
            params = sorted(flat_config(cfg).items())
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                from mlflow.entities import Param

                self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in params[start : start + 100]])

    def log_row(self, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * row.get("time", 0))
        metrics = [Metric(tag, value, stamp, row["round"]) for tag, value in scalars(row).items()]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def finish(self, completed: bool, adapter: Path | None) -> None:
        if completed and adapter is not None and (adapter / "adapter_config.json").is_file():
            self.client.log_artifacts(self.run_id, str(adapter), artifact_path="adapter")
        self.client.set_terminated(self.run_id, status="FINISHED" if completed else "FAILED")


def open_trackers(cfg: Config, run_path: Path, earlier: list[dict[str, Any]] = ()) -> list[Tracker]:
    """The trackers switched on. `earlier` holds the rows a resumed run wrote before:
    a tracker that starts a record of its own (the run folder keeps no TensorBoard
    folder or MLflow run id, as when a sweep's job goes on from its screen's
    checkpoint) gets them first, so its curves start at round 0, not at the resume."""
    check_installed(cfg)
    trackers: list[Tracker] = []
    for switch, kind, record in (("tensorboard", TensorBoardTracker, "tensorboard"),
                                 ("mlflow", MlflowTracker, "mlflow-run-id")):  # fmt: skip
        if getattr(cfg.log, switch):
            fresh = not (run_path / record).exists()
            tracker = kind(cfg, run_path)
            for row in earlier if fresh else ():
                tracker.log_row(row)
            trackers.append(tracker)
    return trackers
