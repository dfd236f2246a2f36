"""FedHPO: sweeps of federated runs, their summary, plot and low-fidelity screening.

`fedllm-flwr sweep -m train.lr=1e-4,3e-4 peft=lora,prompt_tuning` is a Hydra
multirun (`conf/sweep.yaml`). Each job runs as `flwr run` of this app on one
private simulation SuperLink and one Ray instance kept for the whole sweep, so a
job takes the same code path as `flwr run .` without paying their start-up again.
A job that fails is recorded (`job.json`, with the reason) and the sweep goes on.
At the end, `SweepCallback` writes the summary; `fedllm-flwr sweep-summary DIR`
rewrites it for any sweep folder.

Screening (`sweep.screen_rounds=R`): every job first runs only R rounds
(`run.stop_after`, an exact prefix of the full run); per PEFT method the best
`sweep.keep` share by the task metric then runs to `num_rounds`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm_flwr.errors import UserError

JOB_FILE = "job.json"


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
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = {k: getattr(self, k) for k in ("name", "overrides", "status", "stage", "error", "seconds", "path")}
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
            from fedllm_flwr.simulation import LocalRay, LocalSimulation

            # start() stops what it began if it fails or is interrupted; a later job retries.
            if self._ray is None:
                self._ray = LocalRay().start()
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="fedllm-sweep-")
            env = {"RAY_ADDRESS": self._ray.address}
            self._sim = LocalSimulation(Path(self._tmp.name), env=env, client_cpus=self.client_cpus).start()
        return self._sim

    def run(self, name: str, overrides: list[str], stage: str = "full") -> Job:
        """Run one job into `<sweep dir>/<name>/`; never raises for a failed job."""
        from fedllm_flwr.config import load_cfg
        from fedllm_flwr.report import load_run

        folder = self.sweep_dir / name
        job = Job(name, list(overrides), stage=stage, path=str(folder))
        print(f"[fedllm-flwr sweep] {name}: {' '.join(overrides) or '(defaults)'}", flush=True)
        try:
            load_cfg(list(overrides))  # a bad override fails here, not inside Flower
        except UserError as exc:
            job.status, job.error = "failed", str(exc)
            job.save(folder)
            print(f"[fedllm-flwr sweep] {name}: failed: {exc}", flush=True)
            return job
        full = [*overrides, f"run.output_dir={self.sweep_dir}", f"run.name={name}"]
        t0 = time.perf_counter()
        try:
            result = self._simulation().run(
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
            job.error = first_error(log)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "flwr-run.log").write_text(log)
        job.save(folder)
        print(f"[fedllm-flwr sweep] {name}: {job.status} in {job.seconds:.0f} s", flush=True)
        return job

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


# -- reading a sweep folder -------------------------------------------------------


@dataclass
class JobRecord:
    """A job folder read back: its overrides, config and final figures."""

    name: str
    stage: str
    status: str
    overrides: list[str]
    method: str
    lr: float | None
    metric: str
    score: float | None
    eval_loss: float | None
    seconds: float | None
    bytes_per_client_round: float | None
    rounds: int | None
    rounds_logged: int
    """The last round in metrics.jsonl (0: none trained), also for a job that failed."""
    per_round: dict[int, tuple[float, float]]
    """Round -> (task metric, -eval loss): the screening key, higher is better."""
    error: str


def _job_record(folder: Path) -> JobRecord | None:
    import yaml

    from fedllm_flwr.evaluate.tasks import PRIMARY

    job_file = folder / JOB_FILE
    if not job_file.is_file():
        return None
    job = json.loads(job_file.read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metric = summary.get("metric") or PRIMARY.get(cfg.get("dataset", {}).get("metric", ""), "accuracy")
    per_round = {r["round"]: (r[metric], -(r.get("eval-loss") or 0.0)) for r in rows if r.get(metric) is not None}
    traffic = [(r["bytes-down"] + r["bytes-up"]) / r["clients-ok"] for r in rows[1:] if r.get("clients-ok")]
    overrides = job["overrides"]
    method = cfg.get("peft", {}).get("method") or _override(overrides, "peft") or "lora"
    lr = cfg.get("train", {}).get("lr")
    return JobRecord(
        name=job["name"],
        stage=job.get("stage", "full"),
        status=job["status"],
        overrides=overrides,
        method=method,
        lr=float(lr) if lr is not None else _float(_override(overrides, "train.lr")),
        metric=metric,
        score=summary.get("score-final", summary.get("accuracy-final")) if job["status"] == "completed" else None,
        eval_loss=summary.get("eval-loss-final") if job["status"] == "completed" else None,
        seconds=job.get("seconds"),
        bytes_per_client_round=statistics.fmean(traffic) if traffic else None,
        rounds=summary.get("rounds"),
        rounds_logged=rows[-1]["round"] if rows else 0,
        per_round=per_round,
        error=job.get("error", ""),
    )


def _override(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        if item.split("=", 1)[0].lstrip("+~") == key and "=" in item:
            return item.split("=", 1)[1]
    return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def read_sweep(sweep_dir: Path) -> list[JobRecord]:
    if not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir} is not a folder")
    records = [r for p in sorted(sweep_dir.iterdir(), key=_natural) if p.is_dir() and (r := _job_record(p))]
    if not records:
        raise UserError(f"{sweep_dir}: no sweep jobs (folders with {JOB_FILE})")
    return records


def _natural(path: Path) -> tuple:
    stem, _, num = path.name.rpartition("_")
    return (stem, int(num)) if num.isdigit() else (path.name, -1)


# -- statistics ---------------------------------------------------------------------


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson on tie-averaged ranks); None if undefined."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def _kept(candidates: list[JobRecord], score: dict[str, tuple[float, float]], keep: float) -> list[JobRecord]:
    """The best `keep` share (rounded, at least one) of `candidates` by `score`:
    (task metric, -eval loss), higher is better, so ties go to the lower loss."""
    n_keep = max(1, int(keep * len(candidates) + 0.5))
    ranked = sorted(candidates, key=lambda r: (tuple(-v for v in score[r.name]), r.name))
    return ranked[:n_keep]


def best_per_method(records: list[JobRecord]) -> dict[str, JobRecord]:
    """Per method, the completed full-budget job with the highest task metric
    (ties: lower eval loss)."""
    best: dict[str, JobRecord] = {}
    for r in records:
        if r.stage != "full" or r.status != "completed" or r.score is None:
            continue
        current = best.get(r.method)
        if current is None or (r.score, -(r.eval_loss or 0)) > (current.score, -(current.eval_loss or 0)):
            best[r.method] = r
    return best


def screening_audit(records: list[JobRecord], keep: float) -> list[dict[str, Any]]:
    """Would screening at round R have kept each method's best full-budget job?

    Uses the per-round metrics of full-budget jobs (needs `eval.every=1`): for
    every method and every R before the last round, rank the jobs by their
    metric after round R, keep the top `keep` share, and check that the job
    best after the last round is among them.
    """
    rows = []
    full = [r for r in records if r.stage == "full" and r.status == "completed" and r.score is not None]
    best = best_per_method(records)
    for method, winner in sorted(best.items()):
        group = [r for r in full if r.method == method]
        if len(group) < 2:
            continue
        last = min(r.rounds or 0 for r in group)
        for rnd in range(1, last):
            if not all(rnd in r.per_round for r in group):
                continue
            kept = _kept(group, {r.name: r.per_round[rnd] for r in group}, keep)
            rows.append(
                {
                    "method": method,
                    "screen round": rnd,
                    "jobs": len(group),
                    "kept": len(kept),
                    "best at full budget": winner.name,
                    "kept the best": winner.name in {k.name for k in kept},
                }
            )
    return rows


# -- writing the summary ------------------------------------------------------------


def summarize(sweep_dir: Path, keep: float = 0.34, screening: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write summary.csv, summary.md and lr.png for a sweep folder; returns the summary."""
    import csv

    records = read_sweep(sweep_dir)
    table = [
        {
            "job": r.name,
            "stage": r.stage,
            "status": r.status,
            "method": r.method,
            "lr": r.lr,
            "overrides": " ".join(r.overrides),
            "eval loss": r.eval_loss,
            "metric": r.metric,
            "score": r.score,
            "rounds": r.rounds,
            "seconds": r.seconds,
            "bytes per client per round": r.bytes_per_client_round,
            "error": r.error,
        }
        for r in records
    ]
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    full = [r for r in records if r.stage == "full" and r.status == "completed" and r.score is not None]
    scored = [r for r in full if r.eval_loss is not None]
    rho = spearman([r.eval_loss for r in scored], [r.score for r in scored])
    best = best_per_method(records)
    audit = screening_audit(records, keep)
    plot = _plot(records, sweep_dir / "lr.png")
    summary = {
        "jobs": len(records),
        "completed": sum(r.status == "completed" for r in records),
        "failed": [r.name for r in records if r.status == "failed"],
        "best": {m: {"job": r.name, "lr": r.lr, "score": r.score, "overrides": r.overrides} for m, r in best.items()},
        "spearman-eval-loss-vs-score": rho,
        "screening-audit": audit,
        "plot": str(plot) if plot else None,
        "screening": screening,
    }
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (sweep_dir / "summary.md").write_text(_markdown(table, summary))
    return summary


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return ""
    return format(value, spec) if isinstance(value, float) else str(value)


def _markdown(table: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    metric = next((row["metric"] for row in table if row["metric"]), "score")
    lines = [
        f"| job | stage | status | method | lr | eval loss | {metric} | rounds | seconds | bytes/client/round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        status = row["status"] if row["status"] != "failed" else f"failed: {row['error'][:80]}"
        lines.append(
            f"| {row['job']} | {row['stage']} | {status} | {row['method']} | {_fmt(row['lr'], 'g')} "
            f"| {_fmt(row['eval loss'])} | {_fmt(row['score'], '.3f')} | {_fmt(row['rounds'])} "
            f"| {_fmt(row['seconds'], '.0f')} | {_fmt(row['bytes per client per round'], ',.0f')} |"
        )
    lines += ["", "Best configuration per method (by the task metric after the last round):", ""]
    for method, best in sorted(summary["best"].items()):
        lines.append(f"- {method}: {best['job']} (lr {best['lr']:g}), {metric} {best['score']:.3f}")
    rho = summary["spearman-eval-loss-vs-score"]
    lines.append("")
    lines.append(
        f"Spearman rank correlation of final eval loss and {metric} across completed jobs: "
        + (
            f"{rho:.3f} (-1: lower loss always meant a better {metric})"
            if rho is not None
            else "n/a (fewer than 3 jobs, or one column is constant)"
        )
    )
    if summary["screening-audit"]:
        lines += ["", "Screening audit (would keeping the top share after round R have kept the best job?):", ""]
        lines.append("| method | screen round | jobs | kept | best at full budget | kept the best |")
        lines.append("|---|---|---|---|---|---|")
        for a in summary["screening-audit"]:
            lines.append(
                f"| {a['method']} | {a['screen round']} | {a['jobs']} | {a['kept']} | {a['best at full budget']} "
                f"| {'yes' if a['kept the best'] else 'no'} |"
            )
    if summary.get("screening"):
        s = summary["screening"]
        lines += [
            "",
            f"Screening run: {s['screened']} jobs for {s['rounds']} round(s), {s['promoted']} promoted to the full "
            f"budget; {s['rounds-run']} rounds run instead of {s['rounds-full-grid']} for the full grid.",
        ]
    if summary["plot"]:
        lines += ["", f"![{metric} against learning rate]({Path(summary['plot']).name})"]
    return "\n".join(lines) + "\n"


def _plot(records: list[JobRecord], path: Path) -> Path | None:
    """Task metric against learning rate (log scale), one line per method."""
    points = [r for r in records if r.stage == "full" and r.status == "completed" and r.score is not None and r.lr]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in sorted({r.method for r in points}):
        mine = sorted((r for r in points if r.method == method), key=lambda r: r.lr)
        ax.plot([r.lr for r in mine], [r.score for r in mine], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (train.lr)")
    ax.set_ylabel(points[0].metric)
    ax.set_title("Final test-set score by learning rate")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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
    record = _job_record(job_dir)
    return record.score if record and record.score is not None else float("nan")


def _promote(sweep_dir: Path, cfg) -> dict[str, Any]:
    """Second stage of screening: run the kept configurations to the full budget."""
    records = [r for r in read_sweep(sweep_dir) if r.stage == "screen"]
    done = [r for r in records if r.status == "completed" and r.score is not None]
    promoted = []
    for method in sorted({r.method for r in done}):
        group = [r for r in done if r.method == method]
        promoted += _kept(group, {r.name: (r.score, -(r.eval_loss or 0.0)) for r in group}, cfg.sweep.keep)
    runner = _runner(sweep_dir, cfg)
    for r in promoted:
        overrides = [o for o in r.overrides if not o.startswith("run.stop_after=")]
        runner.run(f"full_{r.name.rpartition('_')[2]}", overrides, "full")
    # Rounds each job really ran (a job that failed before training ran none), against
    # the full budget for every job that screening found runnable.
    rounds_full = cfg.num_rounds
    return {
        "rounds": cfg.sweep.screen_rounds,
        "screened": len(records),
        "promoted": len(promoted),
        "rounds-run": sum(r.rounds_logged for r in records) + len(promoted) * rounds_full,
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
    from fedllm_flwr.simulation import stop_on_sigterm

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
