"""The method study's findings (`scripts/method_study.py`): FS-LLM's four, checked on
each model's rate sweep and grid, the rounds table, the compute spent, and the plots.
Read from the finished runs alone, so `--report-only` writes them at any time."""

from __future__ import annotations

import json
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.report import effectiveness, efficiency, find_runs
from fedllm_tools.sweep_summary import JOB_FILE, JobRecord, read_sweep, spearman
from fedllm_tools.tables import cell, markdown_table

TASK_METRIC = "accuracy"  # the default task's exact match


def _curve(run: Path) -> dict[int, float]:
    """Round -> the task metric, from a run folder's metrics.jsonl."""
    rows = read_metrics(run)
    return {r["round"]: r[TASK_METRIC] for r in rows if r.get(TASK_METRIC) is not None}


def late_gain(curve: dict[int, float]) -> float:
    """The metric's gain over the last fifth of a run's rounds (from the round scored
    nearest before that fifth began): near zero once a curve has flattened."""
    n = max(curve)
    start = max(r for r in curve if r <= n - max(1, round(n / 5)))
    return curve[n] - curve[start]


def rounds_findings(out: Path, model: str, best: dict[str, float], seed: int) -> list[dict]:
    """Per method, the fed runs (first seed) at its rate on each budget: the sweep's, the
    grid's and the longer check's. Each run's cosine schedule spans its own rounds: a
    longer run is not a continuation of a shorter one."""
    rows = []
    for method, lr in best.items():
        found = [out / model / "lr" / f"full_{method}_{lr:g}", out / model / "grid" / f"fed-{method}-s{seed}",
                 *sorted((out / model / "rounds").glob(f"fed-{method}-s{seed}-r*"))]  # fmt: skip
        runs = [p for p in found if (p / "summary.json").is_file()]
        if len(runs) < 2:
            continue
        curves = sorted((_curve(p) for p in runs), key=max)
        rows.append({"method": method, "budgets": [{"rounds": max(c), "final": c[max(c)], "late gain": late_gain(c)}
                                                   for c in curves],
                     "runs": [str(p.relative_to(out)) for p in runs]})  # fmt: skip
    return rows


#: The losses finding 4 checks as guides to the rate, by the name its tables use.
LOSSES = {"held-out": lambda r: r.held_out_loss, "test": lambda r: r.eval_loss}


def model_findings(out: Path, model: str) -> dict:
    """FS-LLM's four findings, checked on one model's grid and rate sweep."""
    runs, _ = find_runs([out / model / "grid"])
    eff, cost = effectiveness(runs), efficiency(runs)
    methods = sorted({r["method"] for r in eff})
    acc = {(r["scenario"], r["method"]): r["accuracy mean"] for r in eff}
    found: dict = {"model": model}
    # 1. fed beats the mean local client and closes at least half its gap to global.
    rows = []
    for m in methods:
        g, f, loc = acc.get(("global", m)), acc.get(("fed", m)), acc.get(("local", m))
        if None in (g, f, loc):
            continue
        near = f - loc >= 0.5 * (g - loc) if g > loc else None  # None: global is no better than local
        rows.append({"method": m, "global": g, "fed": f, "local": loc, "fed > local": f > loc, "fed near global": near})
    found["fed-vs-local"] = rows
    # 2. LoRA is the strongest method, per scenario.
    found["lora-strongest"] = {  # strictly ahead of every other method (a tie does not count)
        sc: all(acc[(sc, "lora")] > acc.get((sc, m), float("-inf")) for m in methods if m != "lora")
        for sc in ("global", "fed", "local")
        if (sc, "lora") in acc
    }
    # 3. Message size (fed, bytes up per client per round): prompt < prefix < LoRA.
    size = {r["method"]: r["bytes up per client per round"] for r in cost if r["scenario"] == "fed"}
    found["bytes-up"] = size
    if {"prompt_tuning", "prefix_tuning", "lora"} <= set(size):
        found["prompt<prefix<lora"] = size["prompt_tuning"] < size["prefix_tuning"] < size["lora"]
    # 4. Loss as a guide to the rate.
    found["loss-as-guide"] = loss_guide(read_sweep(out / model / "lr"))
    found["compute"] = compute_time(out / model)
    return found


def loss_guide(records: list[JobRecord]) -> dict:
    """FS-LLM's finding 4 on a rate sweep: how each final loss ranks the jobs against the
    task metric (Spearman, per stage), and the rate each loss would pick per method. Two
    losses: the clients' held-out (validation) loss, what a federation without a test set
    of its own would tune by, and the server's test-set loss."""
    sweep = [r for r in records if r.status == "completed" and r.score is not None]
    guide = {}
    for stage in ("screen", "full"):
        for name, loss in LOSSES.items():
            jobs = [r for r in sweep if r.stage == stage and loss(r) is not None]
            guide[f"spearman-{name}-{stage}"] = spearman([loss(r) for r in jobs], [r.score for r in jobs])
    picks = []
    for m in sorted({r.method for r in sweep}):
        jobs = [r for r in sweep if r.stage == "full" and r.method == m]
        if jobs:
            by_metric = max(jobs, key=lambda r: (r.score, -(r.eval_loss or 0.0)))
            rates = [r.lr for r in sweep if r.stage == "screen" and r.method == m]
            edge = by_metric.lr in (min(rates), max(rates)) if rates else None  # the best may lie beyond
            pick = {"method": m, "lr by metric": by_metric.lr, "score": by_metric.score, "at the grid's edge": edge}
            for name, loss in LOSSES.items():
                scored = [r for r in jobs if loss(r) is not None]
                by_loss = min(scored, key=loss) if scored else None
                pick[f"lr by {name} loss"] = by_loss.lr if by_loss else None
                pick[f"score at the {name} pick"] = by_loss.score if by_loss else None
            picks.append(pick)
    guide["picks"] = picks
    return guide


def compute_time(folder: Path) -> dict:
    """Jobs and their summed wall hours per stage, from every job.json under `folder`
    (the study may have run over several invocations and machines), and the rounds in
    which some client failed (none, for a fair comparison: every job trained with all)."""
    out = {}
    for stage in ("lr", "grid", "rounds"):
        jobs = {p.parent: json.loads(p.read_text()) for p in sorted((folder / stage).glob(f"*/{JOB_FILE}"))}
        finished = {run: j for run, j in jobs.items() if j.get("status") == "completed"}
        done = list(finished.values())
        failing = [f"{run.name} round {row['round']}" for run in finished for row in read_metrics(run)
                   if row.get("clients-failed")]  # fmt: skip
        out[stage] = {"jobs": len(done), "failed": len(jobs) - len(done),
                      "hours": round(sum(j.get("seconds") or 0.0 for j in done) / 3600, 2),
                      "rounds with a failed client": failing}  # fmt: skip
    return out


def plot_rounds(out: Path, rows: list[dict], path: Path) -> None:
    """One colour per method, one line style per budget (solid: the longest)."""
    from fedllm_flwr.plot import plot_runs

    paths, names, styles = [], [], []
    for i, row in enumerate(rows):
        runs = sorted((json.loads((out / p / "summary.json").read_text())["rounds"], out / p) for p in row["runs"])
        for j, (rounds, run) in enumerate(reversed(runs)):
            paths.append(run)
            names.append(f"{row['method']}, {rounds} rounds")
            styles.append((f"C{i % 10}", ["-", "--", ":", "-."][j % 4]))
    if paths:
        plot_runs(paths, path, names, styles)


def write_findings(out: Path, results: dict, seed: int) -> str:
    found = {m: model_findings(out, m) for m in results}
    for model, f in found.items():
        f["rounds"] = rounds_findings(out, model, results[model]["best-lr"], seed)
        plot_rounds(out, f["rounds"], out / model / "rounds.png")
    (out / "findings.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    lines = []
    for model, f in found.items():
        best = ", ".join(f"{m} {lr:g}" for m, lr in results[model]["best-lr"].items())
        lines += [f"## {model} (best rates: {best})", ""]
        lines += markdown_table(
            ["method", "global", "fed", "local (mean client)", "fed > local", "fed closes half the gap"],
            [[r["method"], cell(r["global"], ".3f"), cell(r["fed"], ".3f"), cell(r["local"], ".3f"),
              r["fed > local"], r["fed near global"]] for r in f["fed-vs-local"]],
        )  # fmt: skip
        lines += ["", f"LoRA strongest, per scenario: {f['lora-strongest']}", ""]
        c = f["compute"]
        lr, grid, check = c["lr"], c["grid"], c["rounds"]
        lines += [f"Compute: rate sweep {lr['jobs']} jobs, {lr['hours']:.1f} h; grid {grid['jobs']} jobs, "
                  f"{grid['hours']:.1f} h; rounds check {check['jobs']} jobs, {check['hours']:.1f} h "
                  "(jobs' wall time, one at a time)", ""]  # fmt: skip
        failing = [r for stage in c.values() for r in stage["rounds with a failed client"]]
        lines += [f"Rounds in which a client failed: {', '.join(failing) or 'none'}", ""]
        sizes = ", ".join(f"{m} {b:,.0f}" for m, b in sorted(f["bytes-up"].items(), key=lambda kv: kv[1] or 0))
        lines += [f"Bytes up per client per round (fed): {sizes}; prompt < prefix < LoRA: "
                  f"{f.get('prompt<prefix<lora')}", ""]  # fmt: skip
        g = f["loss-as-guide"]
        for name in LOSSES:
            lines += [f"Spearman (final {name} loss, {TASK_METRIC}) over the rate sweep: screen "
                      f"{cell(g[f'spearman-{name}-screen'], '.3f')}, full {cell(g[f'spearman-{name}-full'], '.3f')}",
                      ""]  # fmt: skip
        lines += markdown_table(
            ["method", "rate by metric", TASK_METRIC, "at the grid's edge", "rate by lowest held-out loss",
             f"{TASK_METRIC} there", "rate by lowest test loss", f"{TASK_METRIC} there"],
            [[p["method"], cell(p["lr by metric"], "g"), cell(p["score"], ".3f"), p["at the grid's edge"],
              *(x for name in LOSSES for x in (cell(p[f"lr by {name} loss"], "g"),
                                               cell(p[f"score at the {name} pick"], ".3f")))]
             for p in g["picks"]],
        )  # fmt: skip
        if f["rounds"]:
            budgets = sorted({b["rounds"] for r in f["rounds"] for b in r["budgets"]})
            lines += ["", f"Rounds: {TASK_METRIC} after the last round (gain over the last fifth of the rounds), "
                      f"fed, seed {seed}, each method at its rate:", ""]  # fmt: skip
            lines += markdown_table(
                ["method", *(f"{n} rounds" for n in budgets)],
                [[r["method"], *(next((f"{cell(b['final'], '.3f')} ({cell(b['late gain'], '+.3f')})"
                                       for b in r["budgets"] if b["rounds"] == n), "") for n in budgets)]
                 for r in f["rounds"]],
            )  # fmt: skip
        lines.append("")
    markdown = "\n".join(lines)
    (out / "findings.md").write_text(markdown)
    return markdown


def plot_lr_curves(out: Path, models: list[str], path: Path) -> None:
    """Per model: the task metric and test-set eval loss against the rate, one line per method
    (every rate after the screen; the kept rates after the last round as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), dpi=110, squeeze=False)
    for row, model in zip(axes, models, strict=True):
        records = [r for r in read_sweep(out / model / "lr") if r.status == "completed" and r.score is not None]
        for i, method in enumerate(sorted({r.method for r in records})):
            color = f"C{i}"
            for stage, style in (("screen", "-"), ("full", "")):
                mine = sorted((r for r in records if r.method == method and r.stage == stage), key=lambda r: r.lr)
                label = f"{method} ({'after the screen' if stage == 'screen' else 'after the last round'})"
                for ax, values in ((row[0], [r.score for r in mine]), (row[1], [r.eval_loss for r in mine])):
                    ax.plot([r.lr for r in mine], values, style, marker="o" if style else "*", color=color,
                            markersize=5 if style else 11, label=label)  # fmt: skip
        for ax, ylabel in zip(row, (TASK_METRIC, "eval loss (test set)"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model}: {ylabel} by rate (fed)")
            ax.grid(True, which="both", alpha=0.3)
        row[1].set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()  # the same methods and colours on every row
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.1 / len(models), 1, 1))
    fig.savefig(path)
    plt.close(fig)
