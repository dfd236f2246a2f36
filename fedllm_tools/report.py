"""Compare finished runs: effectiveness and efficiency tables, as markdown and CSV.

Runs are grouped by (scenario, PEFT method); each group's figures are the mean
and standard deviation over its runs (seeds). Effectiveness is the server's
test-set evaluation after the last round; for `local`, each run's figure is
already the mean over clients' own adapters, and `client spread` is the std
across clients. Efficiency: trainable parameters, message bytes per client per
round, peak memory of a client, seconds per round (without the server's test-set
evaluation, whose cost depends on how often a run evaluates, not on the method).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics
from fedllm_tools.tables import cell, markdown_table, mean_std, write_csv

SCENARIO_ORDER = {"global": 0, "fed": 1, "local": 2}
#: metrics.jsonl key -> column label in the effectiveness table.
QUALITY = {"accuracy": "accuracy", "eval-loss": "eval loss", "client-eval-loss": "client eval loss"}


@dataclass
class RunResult:
    path: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def key(self) -> tuple[str, str]:
        return self.summary["scenario"], self.summary["method"]


def load_run(path: Path) -> RunResult | None:
    """A completed run folder, or None if it did not complete."""
    summary_file, metrics_file = path / "summary.json", path / "metrics.jsonl"
    if not summary_file.is_file() or not metrics_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    if summary.get("status") != "completed" or "scenario" not in summary:
        return None
    rows = read_metrics(path)
    return RunResult(path, summary, rows)


def find_runs(paths: list[Path]) -> tuple[list[RunResult], list[Path]]:
    """Completed runs under `paths` (run folders or folders of them), and the others."""
    done, failed = [], []
    for root in paths:
        if not root.is_dir():
            raise UserError(f"{root} is not a folder")
        candidates = [root] if (root / "config.yaml").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
        for path in candidates:
            if not (path / "config.yaml").is_file():
                continue
            run = load_run(path)
            (done.append(run) if run else failed.append(path))
    if not done:
        raise UserError(f"no completed runs (with summary.json) under {', '.join(map(str, paths))}")
    return done, failed


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def effectiveness(runs: list[RunResult]) -> list[dict[str, Any]]:
    table = []
    for (scenario, method), group in _groups(runs):
        last = [r.rows[-1] for r in group]
        first = [r.rows[0] for r in group]
        row = {"scenario": scenario, "method": method, "seeds": len(group)}
        for key, label in (
            ("accuracy", "accuracy"),
            ("eval-loss", "eval loss"),
            ("client-eval-loss", "client eval loss"),
        ):
            mean, std = _mean_std([x.get(key) for x in last])
            row[f"{label} mean"], row[f"{label} std"] = mean, std
        row["accuracy round 0"] = _mean_std([x.get("accuracy") for x in first])[0]
        row["client spread"] = _mean_std([x.get("accuracy-std") for x in last])[0] if scenario == "local" else None
        table.append(row)
    return table


def efficiency(runs: list[RunResult]) -> list[dict[str, Any]]:
    table = []
    for (scenario, method), group in _groups(runs):
        rounds = [row for r in group for row in r.rows[1:]]
        down = [row["bytes-down"] / row["clients-sampled"] for row in rounds if row.get("clients-sampled")]
        up = [row["bytes-up"] / row["clients-ok"] for row in rounds if row.get("clients-ok")]
        table.append(
            {
                "scenario": scenario,
                "method": method,
                "trainable parameters": group[0].summary.get("trainable-parameters"),
                "bytes down per client per round": statistics.fmean(down) if down else None,
                "bytes up per client per round": statistics.fmean(up) if up else None,
                "peak memory MB": max((row.get("peak-memory-mb") or 0) for row in rounds) or None,
                "seconds per round": statistics.fmean(
                    row["seconds"] - (row.get("eval-seconds") or 0.0) for row in rounds
                ),
            }
        )
    return table


def _groups(runs: list[RunResult]):
    keys = sorted({r.key for r in runs}, key=lambda k: (k[1], SCENARIO_ORDER.get(k[0], 9), k[0]))
    return [(key, [r for r in runs if r.key == key]) for key in keys]


def to_markdown(eff: list[dict[str, Any]], cost: list[dict[str, Any]]) -> str:
    lines = ["## Effectiveness (server test set after the last round; mean ± std over seeds)", ""]
    lines += markdown_table(
        ["method", "scenario", "seeds", "accuracy", "round 0", "eval loss", "client held-out loss", "client spread"],
        [
            [r["method"], r["scenario"], r["seeds"], mean_std(r["accuracy mean"], r["accuracy std"]),
             cell(r["accuracy round 0"], ".3f"), mean_std(r["eval loss mean"], r["eval loss std"]),
             mean_std(r["client eval loss mean"], r["client eval loss std"]), cell(r["client spread"], ".3f")]
            for r in eff
        ],
    )  # fmt: skip
    lines += ["", "## Efficiency (per client per round)", ""]
    lines += markdown_table(
        ["method", "scenario", "trainable params", "bytes down", "bytes up", "peak memory (MB)", "seconds/round"],
        [
            [r["method"], r["scenario"], cell(r["trainable parameters"], ","),
             cell(r["bytes down per client per round"], ",.0f"), cell(r["bytes up per client per round"], ",.0f"),
             cell(r["peak memory MB"], ".0f"), cell(r["seconds per round"], ".1f")]
            for r in cost
        ],
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def write_report(paths: list[Path], out: Path) -> tuple[str, list[Path]]:
    """Build both tables from the runs under `paths`; write them under `out`."""
    runs, failed = find_runs(paths)
    eff, cost = effectiveness(runs), efficiency(runs)
    markdown = to_markdown(eff, cost)
    if failed:
        markdown += "\nIncomplete runs (left out): " + ", ".join(str(p) for p in failed) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown)
    write_csv(out / "effectiveness.csv", eff)
    write_csv(out / "efficiency.csv", cost)
    return markdown, failed
