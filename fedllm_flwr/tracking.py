"""Live curves in the trackers ML engineers already run: TensorBoard and MLflow.

Every row the run writes to metrics.jsonl (one per round: the server's test
metrics, the clients' means and per-client values, bytes, seconds, memory,
privacy spent) also goes, as it is written, to each tracker switched on with
`log.tensorboard` / `log.mlflow`. Both libraries are optional (the `tracking`
extra); a switch that is on without its library fails before the run starts.

A resumed run trains again the rounds after its checkpoint (RunDir.rewind drops
their rows from metrics.jsonl): each tracker is opened with the rows kept, so that
every round shows once in its curves, as it is in metrics.jsonl.
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


def next_round(earlier: list[dict[str, Any]]) -> int:
    """The first round a run logs after the rows it kept: 0 for a new run."""
    return earlier[-1]["round"] + 1 if earlier else 0


class Tracker(Protocol):
    def log_row(self, row: dict[str, Any]) -> None: ...

    def finish(self, completed: bool, adapter: Path | None) -> None: ...


class TensorBoardTracker:
    """Event files under `<run>/tensorboard/` (torch's SummaryWriter, from the
    tensorboard package): `tensorboard --logdir ~/fedllm-flwr/outputs` shows every run.

    `earlier`: the rows a resumed run kept. Where the folder exists, the new writer
    purges every event from the first round trained again on (`purge_step`: TensorBoard
    hides what an earlier start logged at or after that step); a new folder gets the
    rows first, so its curves start at round 0."""

    def __init__(self, cfg: Config, run_path: Path, earlier: list[dict[str, Any]] = ()) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = run_path / "tensorboard"
        resumed = folder.is_dir()
        start = next_round(earlier) if resumed else 0
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start if resumed else None)
        self.writer.add_text("config", "```\n" + cfg_to_yaml(cfg) + "```", start)  # each start's config
        for row in () if resumed else earlier:
            self.log_row(row)

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
    metrics at step = round, the final adapter as an artifact; its id is kept in
    `<run>/mlflow-run-id`.

    `earlier`: the rows a resumed run kept. An MLflow run whose last step is the last
    row kept goes on. One that logged rounds the resume trains again (or missed some,
    having been dropped) cannot be edited: the run goes on in a new MLflow run that gets
    the kept rows first and the tag `fedllm.resumed-from`; the interrupted one is ended
    as failed (if it was still running) with the tag `fedllm.resumed-in` and a note."""

    def __init__(self, cfg: Config, run_path: Path, earlier: list[dict[str, Any]] = ()) -> None:
        from mlflow import MlflowClient

        uri, artifacts = mlflow_store(cfg, run_path)
        self.client = MlflowClient(tracking_uri=uri)
        id_file = run_path / "mlflow-run-id"
        before = id_file.read_text().strip() if id_file.is_file() else None
        start = next_round(earlier)
        if before is not None and self.last_step(before) == start - 1:
            self.run_id = before
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = cfg.log.experiment or "fedllm-flwr"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = (artifacts / name).as_uri() if artifacts else None
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {"run-folder": str(run_path)}
        if before is not None:
            tags.update({"fedllm.resumed-from": before, "fedllm.resumed-after-round": str(start - 1)})
        self.run_id = self.client.create_run(experiment_id, run_name=run_path.name, tags=tags).info.run_id
        self.log_params(cfg)
        for row in earlier:
            self.log_row(row)
        id_file.write_text(self.run_id + "\n")
        if before is not None:
            self.supersede(before, start - 1)

    def last_step(self, run_id: str) -> int:
        """The last round `run_id` logged a metric for (-1: none)."""
        keys = self.client.get_run(run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(run_id, key)), default=-1)

    def supersede(self, run_id: str, resumed_after: int) -> None:
        """Mark interrupted run `run_id` as continued in this one, after round `resumed_after`."""
        self.client.set_tag(run_id, "fedllm.resumed-in", self.run_id)
        note = (f"Interrupted. The run went on after round {resumed_after} in MLflow run {self.run_id}, which "
                "holds every round once; the rounds logged here after that one were trained again there.")  # fmt: skip
        self.client.set_tag(run_id, "mlflow.note.content", note)
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status="FAILED")

    def log_params(self, cfg: Config) -> None:
        from mlflow.entities import Param

        params = sorted(flat_config(cfg).items())
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
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
    """The trackers switched on. `earlier` holds the rows a resumed run kept (RunDir.rewind):
    each tracker continues its record from there or starts one that holds them, as when
    a sweep's job goes on from its screen's checkpoint without the screen's records."""
    check_installed(cfg)
    switched_on = [kind for switch, kind in (("tensorboard", TensorBoardTracker), ("mlflow", MlflowTracker))
                   if getattr(cfg.log, switch)]  # fmt: skip
    return [kind(cfg, run_path, list(earlier)) for kind in switched_on]
