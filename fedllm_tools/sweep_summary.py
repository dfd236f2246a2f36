"""A sweep folder read back and summarised: one row per job, the best configuration per
method, how well eval loss ranks the jobs, the screening audit, and the plot.

`fedllm-flwr sweep` writes it at the end of a sweep; `fedllm-flwr sweep-summary DIR`
rewrites it for any sweep folder. Tables are built as `report` builds its own
(`fedllm_tools.tables`).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics
from fedllm_tools.tables import cell, markdown_table, write_csv

JOB_FILE = "job.json"
"""In each job folder: the job's name, overrides, stage, status and error."""


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
    """The server's test-set loss after the last round."""
    held_out_loss: float | None
    """The clients' mean loss on their held-out (validation) splits after the last
    round: what a federation that keeps no test set of its own could tune by."""
    seconds: float | None
    bytes_per_client_round: float | None
    rounds: int | None
    rounds_logged: int
    """The last round in metrics.jsonl (0: none trained), also for a job that failed."""
    per_round: dict[int, tuple[float, float]]
    """Round -> (task metric, -eval loss): the screening key, higher is better."""
    error: str


def job_record(folder: Path) -> JobRecord | None:
    import yaml

    from fedllm_flwr.evaluate.benchmarks import PRIMARY

    job_file = folder / JOB_FILE
    if not job_file.is_file():
        return None
    job = json.loads(job_file.read_text())
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    rows = []
    if (folder / "metrics.jsonl").is_file():
        rows = read_metrics(folder)
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
        held_out_loss=rows[-1].get("client-eval-loss") if rows and job["status"] == "completed" else None,
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
    records = [r for p in sorted(sweep_dir.iterdir(), key=_natural) if p.is_dir() and (r := job_record(p))]
    if not records:
        raise UserError(f"{sweep_dir}: no sweep jobs (folders with {JOB_FILE})")
    return records


def _natural(path: Path) -> tuple:
    stem, _, num = path.name.rpartition("_")
    return (stem, int(num)) if num.isdigit() else (path.name, -1)


# -- statistics ---------------------------------------------------------------------


def ranks(values: list[float]) -> list[float]:
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
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else None


def keep_best(candidates: list[JobRecord], score: dict[str, tuple[float, float]], keep: float) -> list[JobRecord]:
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
            kept = keep_best(group, {r.name: r.per_round[rnd] for r in group}, keep)
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
            "held-out loss": r.held_out_loss,
            "metric": r.metric,
            "score": r.score,
            "rounds": r.rounds,
            "seconds": r.seconds,
            "bytes per client per round": r.bytes_per_client_round,
            "error": r.error,
        }
        for r in records
    ]
    write_csv(sweep_dir / "summary.csv", table)
    full = [r for r in records if r.stage == "full" and r.status == "completed" and r.score is not None]
    scored = [r for r in full if r.eval_loss is not None]
    rho = spearman([r.eval_loss for r in scored], [r.score for r in scored])
    validated = [r for r in full if r.held_out_loss is not None]
    rho_held_out = spearman([r.held_out_loss for r in validated], [r.score for r in validated])
    best = best_per_method(records)
    audit = screening_audit(records, keep)
    plot = _plot(records, sweep_dir / "lr.png")
    summary = {
        "jobs": len(records),
        "completed": sum(r.status == "completed" for r in records),
        "failed": [r.name for r in records if r.status == "failed"],
        "best": {m: {"job": r.name, "lr": r.lr, "score": r.score, "overrides": r.overrides} for m, r in best.items()},
        "spearman-eval-loss-vs-score": rho,
        "spearman-held-out-loss-vs-score": rho_held_out,
        "screening-audit": audit,
        "plot": str(plot) if plot else None,
        "screening": screening,
    }
    (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (sweep_dir / "summary.md").write_text(_markdown(table, summary))
    return summary


def _markdown(table: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    metric = next((row["metric"] for row in table if row["metric"]), "score")
    header = ["job", "stage", "status", "method", "lr", "eval loss", metric, "rounds", "seconds",
              "bytes/client/round (down + up)"]  # fmt: skip
    lines = markdown_table(
        header,
        [
            [row["job"], row["stage"], row["status"] if row["status"] != "failed" else f"failed: {row['error'][:80]}",
             row["method"], cell(row["lr"], "g"), cell(row["eval loss"], ".4f"), cell(row["score"], ".3f"),
             cell(row["rounds"]), cell(row["seconds"], ".0f"), cell(row["bytes per client per round"], ",.0f")]
            for row in table
        ],
    )  # fmt: skip
    lines += ["", "Best configuration per method (by the task metric after the last round):", ""]
    for method, best in sorted(summary["best"].items()):
        lines.append(f"- {method}: {best['job']} (lr {best['lr']:g}), {metric} {best['score']:.3f}")
    lines.append("")
    losses = {
        "spearman-eval-loss-vs-score": "eval loss (test set)",
        "spearman-held-out-loss-vs-score": "held-out loss (the clients' validation splits)",
    }
    for key, loss in losses.items():
        rho = summary.get(key)
        verdict = (
            f"{rho:.3f} (-1: lower loss always meant a better {metric})"
            if rho is not None
            else "n/a (fewer than 3 jobs, or one column is constant)"
        )
        lines.append(f"Spearman rank correlation of final {loss} and {metric} across completed jobs: {verdict}")
    if summary["screening-audit"]:
        lines += ["", "Screening audit (would keeping the top share after round R have kept the best job?):", ""]
        columns = ["method", "screen round", "jobs", "kept", "best at full budget", "kept the best"]
        lines += markdown_table(columns, [[a[c] for c in columns] for a in summary["screening-audit"]])
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
