"""The run folder and sweeps: `run.*`, `sweep.*`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    name: str = ""
    """Run folder name; empty means a timestamp (YYYYmmdd-HHMMSS)."""
    output_dir: str = "outputs"
    """Parent of the run folder. A relative path is taken from
    `$FEDLLM_FLWR_HOME` (default `~/fedllm-flwr`), never from the SuperLink's
    working directory."""
    save_every_round: bool = True
    """Keep `adapter/round_<n>/` for every round (each is one adapter, ~1 MB)."""
    warm_up: bool = True
    """Before loading anything itself, the server sends a warm-up message so the
    nodes import the stack, load the base model and read their data while it starts
    (the first round no longer waits for both in turn): simulation's workers, and a
    deployed SuperNode's site worker (a SuperNode without one answers at once)."""
    poll_seconds: float = 0.2
    """Deployment: how often the server asks the SuperLink for replies while it waits
    for a round's (Flower's deployed grid asks every 3 s, simulation's every 0.1 s;
    0 keeps Flower's)."""
    stop_after: int = 0
    """Stop after this many rounds (0 = `num_rounds`). The learning-rate schedule
    still spans `num_rounds`, so the run is an exact prefix of the full one: a
    low-fidelity evaluation for screening."""
    max_rounds_without_reply: int = 3
    """Stop the run after this many rounds in a row in which clients were sampled and
    no reply was aggregated (each failed, timed out or was dropped): its clients are
    gone. summary.json says `stopped`, adapter/final is not written, and the checkpoint
    holds the last round that trained, so `resume=<run folder>` goes on once they are
    back. Rounds that sampled nobody (`strategy.availability`) neither count nor break
    the run of rounds. 0: never stop, run every round."""

    def __post_init__(self) -> None:
        if self.poll_seconds < 0:
            raise ValueError(f"run.poll_seconds must be >= 0 (0: Flower's own wait), got {self.poll_seconds}")
        if self.max_rounds_without_reply < 0:
            raise ValueError(
                f"run.max_rounds_without_reply must be >= 0 (0: never stop), got {self.max_rounds_without_reply}"
            )


@dataclass
class LogConfig:
    """Where a run's rows go besides metrics.jsonl (fedllm_flwr/tracking.py), and its plot."""

    tensorboard: bool = False
    """Every round's row as TensorBoard scalars in `<run>/tensorboard/` (needs the
    `tracking` extra): `tensorboard --logdir ~/fedllm-flwr/outputs`."""
    mlflow: bool = False
    """Params (the resolved config), per-round metrics and the final adapter to MLflow
    (needs the `tracking` extra): `$MLFLOW_TRACKING_URI` when set, else a local SQLite
    store `mlflow.db` beside the run folders (in `run.output_dir`)."""
    experiment: str = ""
    """MLflow experiment; empty: `fedllm-flwr`, or the sweep folder's name for a sweep's jobs."""
    curves: bool = True
    """Write `curves.png` (eval loss, task metric, bytes, per-client held-out metrics per
    round) into the run folder when the run completes; `fedllm-flwr plot` draws any runs."""


@dataclass
class SweepConfig:
    """Settings of `fedllm-flwr sweep` (ignored by a single `flwr run`)."""

    supernodes: int = 2
    """Simulated SuperNodes per job."""
    client_cpus: int = 1
    """Whole CPUs each simulated client claims: the sweep's Ray instance offers all of this
    machine's, so a job starts (CPUs / client_cpus) ClientApp workers, each importing
    the ML stack and loading the base model once per job."""
    timeout: float = 3600.0
    """Seconds a job may run before it is recorded as failed."""
    screen_rounds: int = 0
    """Low-fidelity screening: first run every job for this many rounds
    (`run.stop_after`), then only the best `keep` share per method on to
    `num_rounds`, from the screen's checkpoint. 0 runs every job to the full budget."""
    keep: float = 0.34
    """Share of each method's configurations that survives the screen (at least one)."""

    def __post_init__(self) -> None:
        if self.supernodes < 1:
            raise ValueError("sweep.supernodes must be >= 1")
        if self.client_cpus <= 0:
            raise ValueError("sweep.client_cpus must be > 0")
        if self.screen_rounds < 0 or not 0.0 < self.keep <= 1.0:
            raise ValueError("sweep.screen_rounds must be >= 0 and sweep.keep in (0, 1]")
