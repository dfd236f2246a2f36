"""The curves of finished runs on one figure: `fedllm-flwr plot`, and `curves.png`
in every run folder when the run completes.

Panels: eval loss and the task metric on the server's test set per round, bytes
per client per round (down and up), and the clients' held-out metrics per round
where the rows have them (local evaluation, personalization). Several runs are
labelled by their name and the config values that differ between them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fedllm_flwr.config import flatten
from fedllm_flwr.errors import UserError
from fedllm_flwr.metrics import read_metrics

log = logging.getLogger(__name__)

#: Config keys that differ between any two runs and say nothing about them.
IGNORED_KEYS = ("run.name", "run.output_dir", "resume", "run.stop_after", "log.experiment")


def read_run(path: Path) -> tuple[str, list[dict[str, Any]], dict[str, str]]:
    """(metric, rows, flattened config) of a run folder; a clear error for anything else."""
    import yaml

    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        raise UserError(f"plot: {path} is not a folder")
    if not metrics.is_file():
        raise UserError(f"plot: {path} has no metrics.jsonl (not a run folder, or it never finished a round)")
    rows = read_metrics(path)
    config = yaml.safe_load((path / "config.yaml").read_text()) if (path / "config.yaml").is_file() else {}
    flat = flatten(config or {})
    metric = _metric(path, rows, flat)
    return metric, rows, flat


def _metric(path: Path, rows: list[dict[str, Any]], flat: dict[str, str]) -> str:
    from fedllm_flwr.evaluate.benchmarks import PRIMARY

    summary = path / "summary.json"
    if summary.is_file():
        metric = json.loads(summary.read_text()).get("metric")
        if metric:
            return metric
    metric = PRIMARY.get(flat.get("dataset.metric", ""), "")
    if metric and any(metric in row for row in rows):
        return metric
    for candidate in ("accuracy", "preference-accuracy", "rougeL", "pass@1"):
        if any(row.get(candidate) is not None for row in rows):
            return candidate
    return ""


def labels(paths: list[Path], configs: list[dict[str, str]]) -> list[str]:
    """Each run's folder name, plus the config values that differ between the runs."""
    keys = sorted(
        key for key in set().union(*configs) if key not in IGNORED_KEYS and len({c.get(key) for c in configs}) > 1
    )
    out = []
    for path, config in zip(paths, configs, strict=True):
        diff = " ".join(f"{k}={config.get(k, '-')}" for k in keys[:4])
        out.append(f"{path.name} ({diff})" if diff else path.name)
    return out


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(
    paths: list[Path], out: Path, names: list[str] | None = None, styles: list[tuple[str, str]] | None = None
) -> Path:
    """Draw the runs' curves into `out` (PNG); returns it. `names` and `styles` (a
    colour and a line style per run) replace the default legend and colours."""
    import matplotlib.pyplot as plt

    fig = figure(paths, names, styles)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def figure(paths: list[Path], names: list[str] | None = None, styles: list[tuple[str, str]] | None = None):
    """The matplotlib figure of the runs' curves (by default one colour per run, named
    by what differs between them; the legend below the panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    runs = [read_run(p) for p in paths]
    names = names or labels(paths, [flat for _, _, flat in runs])
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    styles = styles or [(palette(i % 20), "-") for i in range(len(runs))]
    clients = any(any(k.endswith("-held-out-loss") for k in row) for _, rows, _ in runs for row in rows)
    columns = 1 if len(runs) < 4 else 2
    legend_rows = -(-len(runs) // columns)
    height = 3.8 + 0.2 * legend_rows  # the panels keep their height however many runs the legend names
    fig, axes = plt.subplots(1, 4 if clients else 3, figsize=(16 if clients else 12.5, height), dpi=100)
    metric_names = sorted({m for m, _, _ in runs if m})
    for (metric, rows, _), name, (color, line) in zip(runs, names, styles, strict=True):
        axes[0].plot(*_series(rows, "eval-loss"), line, marker="o", color=color, label=name)
        if metric:
            axes[1].plot(*_series(rows, metric), line, marker="o", color=color, label=name)
        traffic = [(r["round"], r.get("bytes-down"), r.get("bytes-up"), r.get("clients-ok") or 0) for r in rows]
        traffic = [(rnd, d / n, u / n) for rnd, d, u, n in traffic if n and d is not None and u is not None]
        if traffic:
            axes[2].plot([t[0] for t in traffic], [t[1] for t in traffic], "--", marker=".", color=color)
            axes[2].plot([t[0] for t in traffic], [t[2] for t in traffic], "-", marker="o", color=color)
        if clients:
            keys = sorted({k for row in rows for k in row if k.endswith("-held-out-loss")})
            for key in keys:
                axes[3].plot(*_series(rows, key), marker=".", color=color, alpha=0.7)
            axes[3].plot(*_series(rows, "client-eval-loss"), marker="o", color=color, linewidth=2)
    titles = (
        ("eval loss (server test set)", "eval loss"),
        (f"{' / '.join(metric_names) or 'task metric'} (server test set)", " / ".join(metric_names)),
        ("bytes per client (solid: up, dashed: down)", "bytes per round"),
        ("held-out loss per client (thick: mean)", "held-out loss"),
    )
    for ax, (title, ylabel) in zip(axes, titles, strict=False):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_ylim(0, max(axes[2].get_ylim()[1], 1) * 1.15)
    axes[2].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} MB" if v >= 1e6 else f"{v / 1e3:g} KB"))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=columns, fontsize=7)
    fig.tight_layout(rect=(0, (0.2 * legend_rows + 0.1) / height, 1, 1))
    return fig


def write_curves(run_path: Path) -> Path | None:
    """`curves.png` of a finished run; a failure to draw is logged, never fatal."""
    try:
        return plot_runs([run_path], run_path / "curves.png")
    except Exception as exc:  # the run itself completed; the picture is a convenience
        log.warning("curves.png not written: %s", exc)
        return None
