"""FedHPO: sweeps of federated runs, their summary, plot and low-fidelity screening.

`fedllm-flwr sweep -m train.lr=1e-4,3e-4 peft=lora,prompt_tuning` is a Hydra
multirun (`conf/sweep.yaml`). Each job runs as `flwr run` of this app on one
private simulation SuperLink and one Ray instance kept for the whole sweep, so a
job takes the same code path as `flwr run .` without paying their start-up again.
A job that fails is recorded (`job.json`, with the reason) and the sweep goes on.
Run again into its folder, a sweep keeps its completed jobs and resumes the one
that stopped at that job's last checkpoint (`JobRunner.resume_point`).
At the end, `SweepCallback` writes the summary; `fedllm-flwr sweep-summary DIR`
rewrites it for any sweep folder.

Screening (`sweep.screen_rounds=R`): every job first runs only R rounds
(`run.stop_after`, an exact prefix of the full run); per PEFT method the best
`sweep.keep` share by the task metric then goes on from the screen's checkpoint
to `num_rounds` (`continue_screen`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm_flwr.errors import UserError
from fedllm_tools.sweep_summary import JOB_FILE, job_record, keep_best, read_sweep, summarize


@dataclass
class Job:
    """One configuration of a sweep and what became of it."""

    name: str
    overrides: list[str]
    status: str = "pending"
    """`completed`, `failed` or `pending`."""
    stage: str = "full"
    """`full`, or `screen` for a low-fidelity (run.stop_after) job."""
    error: str = ""
    seconds: float | None = None
    """Wall time; for a resumed job, plus what its checkpointed rounds took before."""
    resumed_after: int | None = None
    """The round a resumed job went on from (its last attempt); None if it ran whole."""
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        keys = ("name", "overrides", "status", "stage", "error", "seconds", "resumed_after", "path")
        data = {k: getattr(self, k) for k in keys}
        (folder / JOB_FILE).write_text(json.dumps(data, indent=2) + "\n")


def first_error(log: str) -> str:
    """The first error a failed job's `flwr run` output reports: the message inside
    the CLI's boxed "Error" panel, else the first line naming an error, else the tail."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("╭─ Error"):
            inside = []
            for row in lines[i + 1 :]:
                if not row.lstrip().startswith("│"):
                    break
                inside.append(row.strip().strip("│").strip())
            if any(inside):
                return " ".join(part for part in inside if part)
    errors = [line for line in lines if "ERROR" in line or "Error" in line]
    return (errors[0] if errors else log.strip()[-500:]).strip()


class JobRunner:
    """Runs jobs as `flwr run` on one simulation SuperLink and one Ray instance,
    both owned by the sweep: a job pays neither's start-up again."""

    def __init__(self, sweep_dir: Path, supernodes: int, timeout: float, client_cpus: int = 1) -> None:
        from fedllm_flwr.config import conf_dir

        self.sweep_dir, self.supernodes, self.timeout = sweep_dir, supernodes, timeout
        self.client_cpus = client_cpus
        self.app_dir = conf_dir().parent
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._sim = None
        self._ray = None
        atexit.register(self.close)  # also on SystemExit from SIGTERM (see sweep_main)

    def _simulation(self):
        if self._sim is None:
            from fedllm_tools.simulation import LocalRay, LocalSimulation

            # start() stops what it began if it fails or is interrupted; a later job retries.
            if self._ray is None:
                self._ray = LocalRay().start()
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="fedllm-sweep-")
            env = {"RAY_ADDRESS": self._ray.address}
            self._sim = LocalSimulation(Path(self._tmp.name), env=env, client_cpus=self.client_cpus).start()
        return self._sim

    def _superlink_log_size(self) -> int:
        path = self._sim.log_path if self._sim is not None else None
        return path.stat().st_size if path is not None and path.is_file() else 0

    def _superlink_log(self, start: int) -> str:
        """The SuperLink's log from byte `start` on: what it wrote during one job."""
        path = self._sim.log_path if self._sim is not None else None
        if path is None or not path.is_file():
            return ""
        with open(path, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")

    def run(self, name: str, overrides: list[str], stage: str = "full", go_on_from: Path | None = None) -> Job:
        """Run one job into `<sweep dir>/<name>/`; never raises for a failed job. With
        `go_on_from` (a screen of the same config), a job with no folder of its own
        starts from a copy of that run's checkpoint (`continue_screen`)."""
        from fedllm_flwr.config import load_cfg
        from fedllm_tools.report import load_run

        folder = self.sweep_dir / name
        job = Job(name, list(overrides), stage=stage, path=str(folder))
        done = self.finished(folder, job)
        if done is not None:
            print(f"[fedllm-flwr sweep] {name}: completed before, kept", flush=True)
            return done
        print(f"[fedllm-flwr sweep] {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        try:
            load_cfg(list(overrides))  # a bad override fails here, not inside Flower
        except UserError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            job.status, job.error = "failed", str(exc)
            job.save(folder)
            print(f"[fedllm-flwr sweep] {name}: failed: {exc}", flush=True)
            return job
        full = [*overrides, f"run.output_dir={self.sweep_dir}", f"run.name={name}"]
        if not any(o.split("=", 1)[0].lstrip("+~") == "log.experiment" for o in overrides):
            full.append(f"log.experiment={self.sweep_dir.name}")  # MLflow: one experiment per sweep
        if go_on_from is not None and not folder.exists() and continue_screen(go_on_from, folder, full):
            print(f"[fedllm-flwr sweep] {name}: going on from {go_on_from.name}'s checkpoint", flush=True)
        resumed, carried = self.resume_point(folder, full), 0.0
        if resumed is not None:  # an interrupted or failed attempt of this config left a checkpoint
            (folder / "flwr-run.log").unlink(missing_ok=True)
            full.append(f"resume={folder}")
            job.resumed_after, carried = resumed
            print(f"[fedllm-flwr sweep] {name}: resuming after round {job.resumed_after}", flush=True)
        elif folder.exists():  # an attempt without a checkpoint, or of other overrides: start again
            shutil.rmtree(folder)
        t0 = time.perf_counter() - carried
        superlink_log = 0  # where this job's part of the SuperLink's log begins
        try:
            sim = self._simulation()
            superlink_log = self._superlink_log_size()
            result = sim.run(
                self.app_dir, overrides=shlex.join(full), num_supernodes=self.supernodes, timeout=self.timeout
            )
            log = result.stdout
        except Exception as exc:  # a timeout or a SuperLink that died: record it, keep sweeping
            log = f"{type(exc).__name__}: {exc}"
        job.seconds = round(time.perf_counter() - t0, 1)
        if load_run(folder) is not None:
            job.status = "completed"
        else:
            job.status = "failed"
            # The ServerApp's own failure may reach only the SuperLink's log, not `flwr run`'s stream.
            if superlink := self._superlink_log(superlink_log):
                log += f"\n--- the SuperLink's log during this job ---\n{superlink}"
            job.error = first_error(log)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "flwr-run.log").write_text(log)
        job.save(folder)
        print(f"[fedllm-flwr sweep] {name}: {job.status} in {job.seconds:.0f} s", flush=True)
        return job

    @staticmethod
    def resume_point(folder: Path, overrides: list[str]) -> tuple[int, float] | None:
        """(round, seconds) if `folder` holds an unfinished run of exactly this config
        that can go on from its checkpoint (`RunDir.reopen`'s checks, and the config's
        own: some state cannot be restored); else None. The seconds are those its
        checkpointed rounds took, from their metrics rows, so a resumed job's time counts
        each round once (an earlier attempt's start-up is not in it)."""
        from fedllm_flwr.config import load_cfg
        from fedllm_flwr.run_dir import CHECKPOINT, RunDir

        if not (folder / CHECKPOINT).is_file():
            return None
        try:
            run_dir, done = RunDir.reopen(load_cfg([*overrides, f"resume={folder}"]))
            seconds = sum(row.get("seconds") or 0.0 for row in run_dir.rows() if row["round"] <= done)
        except (UserError, OSError, ValueError, KeyError):
            return None
        return done, seconds

    @staticmethod
    def finished(folder: Path, job: Job) -> Job | None:
        """The job as recorded in `folder` if it completed there with the same
        overrides and stage: a sweep run again into its folder resumes."""
        from fedllm_tools.report import load_run

        try:
            recorded = json.loads((folder / JOB_FILE).read_text())
        except (OSError, ValueError):
            return None
        same = recorded.get("overrides") == job.overrides and recorded.get("stage", "full") == job.stage
        if not same or recorded.get("status") != "completed" or load_run(folder) is None:
            return None
        return Job(**{**{k: recorded.get(k) for k in ("name", "status", "stage", "error", "seconds", "resumed_after")},
                      "overrides": job.overrides, "path": str(folder)})  # fmt: skip

    def close(self) -> None:
        if self._sim is not None:
            self._sim.stop()
            self._sim = None
        if self._ray is not None:
            self._ray.stop()
            self._ray = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class Progress:
    """A line before each job of a planned series that runs (kept ones are counted, not
    announced): '[study] gemma3 grid: job 7 of 36, ~5.9 h left at the pace of the 6
    finished', the pace being the mean seconds of the finished jobs of `stage` in `folder`."""

    def __init__(self, label: str, total: int, folder: Path, stage: str = "full") -> None:
        self.label, self.total, self.folder, self.stage, self.count = label, total, folder, stage, 0

    def next(self, name: str, overrides: list[str]) -> None:
        self.count += 1
        if JobRunner.finished(self.folder / name, Job(name, overrides, stage=self.stage)):
            return
        jobs = [json.loads(p.read_text()) for p in self.folder.glob(f"*/{JOB_FILE}")]
        done = [j for j in jobs if j.get("status") == "completed" and j.get("stage", "full") == self.stage]
        seconds = [j["seconds"] for j in done if j.get("seconds")]
        left = ""
        if seconds:
            rest = (self.total - self.count + 1) * statistics.fmean(seconds)
            rest_text = f"{rest / 3600:.1f} h" if rest >= 3600 else f"{max(1, round(rest / 60))} min"
            left = f", ~{rest_text} left at the pace of the {len(seconds)} finished"
        print(f"{self.label}: job {self.count} of {self.total}{left}", flush=True)


# -- the Hydra entry point ----------------------------------------------------------

_RUNNER: JobRunner | None = None


def _runner(sweep_dir: Path, cfg) -> JobRunner:
    global _RUNNER
    if _RUNNER is None or _RUNNER.sweep_dir != sweep_dir:
        if _RUNNER is not None:
            _RUNNER.close()
        _RUNNER = JobRunner(sweep_dir, cfg.sweep.supernodes, cfg.sweep.timeout, cfg.sweep.client_cpus)
    return _RUNNER


def _close_runner() -> None:
    global _RUNNER
    if _RUNNER is not None:
        _RUNNER.close()
        _RUNNER = None


# What a screen's folder holds that is its own, not the run's state: left behind when a
# promoted job goes on from the screen's checkpoint (its summary would mark it done).
SCREEN_ONLY = {JOB_FILE, "summary.json", "flwr-run.log", "curves.png", "mlflow-run-id", "tensorboard"}


def continue_screen(screen: Path, folder: Path, overrides: list[str]) -> bool:
    """Seed `folder` with the run state of `screen` (checkpoint, metrics rows, config,
    round adapters) so that the job resumes after the screen's last round instead of
    training those rounds again: the screen is an exact prefix of the full run
    (`run.stop_after`), and a resumed run ends where an unbroken one does; the server
    records the job's own `run` section in config.yaml when it resumes. Its trackers
    start records of their own, given the screen's rows first (`open_trackers`).
    Nothing is copied, and False returned, when the screen left no checkpoint of this config."""
    from fedllm_flwr.files import publish, temp_folder

    if JobRunner.resume_point(screen, overrides) is None:
        return False

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory) == screen:
            return SCREEN_ONLY & set(names)
        if Path(directory) == screen / "adapter":
            return {"final", "personalized"} & set(names)
        return set()

    with temp_folder(folder.parent, folder.name) as tmp:  # the job's folder appears whole or not at all
        shutil.copytree(screen, tmp, ignore=ignore, dirs_exist_ok=True)
        publish(tmp, folder)
    return True


def _job(cfg) -> float | None:
    """One Hydra job: run its overrides as a Flower simulation."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    overrides = [o for o in hc.overrides.task if not o.startswith("hydra.")]
    stage = "full"
    if cfg.sweep.screen_rounds and cfg.sweep.screen_rounds < cfg.num_rounds:
        overrides.append(f"run.stop_after={cfg.sweep.screen_rounds}")
        stage = "screen"
    _runner(job_dir.parent, cfg).run(job_dir.name, overrides, stage)
    record = job_record(job_dir)
    return record.score if record and record.score is not None else float("nan")


def _promote(sweep_dir: Path, cfg) -> dict[str, Any]:
    """Second stage of screening: run the kept configurations to the full budget."""
    records = [r for r in read_sweep(sweep_dir) if r.stage == "screen"]
    done = [r for r in records if r.status == "completed" and r.score is not None]
    promoted = []
    for method in sorted({r.method for r in done}):
        group = [r for r in done if r.method == method]
        promoted += keep_best(group, {r.name: (r.score, -(r.eval_loss or 0.0)) for r in group}, cfg.sweep.keep)
    runner = _runner(sweep_dir, cfg)
    rounds_full, rounds_promoted = cfg.num_rounds, 0
    for r in promoted:
        overrides = [o for o in r.overrides if not o.startswith("run.stop_after=")]
        job = runner.run(f"full_{r.name.rpartition('_')[2]}", overrides, "full", go_on_from=sweep_dir / r.name)
        rounds_promoted += rounds_full - (job.resumed_after or 0)  # a job gone on from its screen trains the rest
    # Rounds each job really ran (a job that failed before training ran none), against
    # the full budget for every job that screening found runnable.
    return {
        "rounds": cfg.sweep.screen_rounds,
        "screened": len(records),
        "promoted": len(promoted),
        "rounds-run": sum(r.rounds_logged for r in records) + rounds_promoted,
        "rounds-full-grid": len(done) * rounds_full,
    }


def _register_resolver() -> None:
    from omegaconf import OmegaConf

    from fedllm_flwr.run_dir import home_dir

    if not OmegaConf.has_resolver("fedllm_home"):
        OmegaConf.register_new_resolver("fedllm_home", lambda: str(home_dir()))


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core is a dependency
    _HydraCallback = object


class SweepCallback(_HydraCallback):
    """At the end of the multirun: promote screened jobs, write the summary, stop the SuperLink."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            screening = _promote(sweep_dir, config) if config.sweep.screen_rounds else None
        finally:
            _close_runner()
        with contextlib.suppress(UserError):  # no job folder at all: nothing to summarize
            summarize(sweep_dir, config.sweep.keep, screening)
            print((sweep_dir / "summary.md").read_text(), flush=True)
            print(f"[fedllm-flwr sweep] summary: {sweep_dir / 'summary.md'}, summary.csv, lr.png", flush=True)


def sweep_main(argv: list[str]) -> int:
    """`fedllm-flwr sweep ARGS`: hand ARGS to Hydra's command line."""
    import hydra

    from fedllm_flwr.config import conf_dir
    from fedllm_tools.simulation import stop_on_sigterm

    _register_resolver()
    stop_on_sigterm()  # SIGTERM unwinds like Ctrl-C: the running job's `flwr run`, then the SuperLink
    main = hydra.main(config_path=str(conf_dir()), config_name="sweep", version_base=None)(_job)
    saved = sys.argv
    sys.argv = ["fedllm-flwr sweep", *argv]
    try:
        main()
    finally:
        sys.argv = saved
    return 0
