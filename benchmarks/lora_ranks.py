"""LoRA for unequal sites: ranks {2,4,8,16} under zero-padding, stacking and SVD,
against homogeneous rank-8 LoRA, FFA-LoRA and DoRA, and FFA-LoRA against LoRA
under differential privacy at the same noise.

    python benchmarks/lora_ranks.py --out ~/fedllm-flwr/lora-ranks [--seeds 0,1,2]
        [--methods lora,ffa_lora,...] [--noise 0.01] [-- OVERRIDES]

Every job is the default task (SmolLM2-135M-Instruct, the built-in offline task, one
task family per client: non-IID) on 4 simulated SuperNodes, 3 rounds, one `flwr run`
each on a private SuperLink stopped by PID at the end. A job whose run folder already
holds a summary is read, not run again, so an interrupted benchmark resumes.

Reports per method (mean and std over seeds): final exact-match accuracy and eval
loss on the server's test set, bytes per client per round each way (training and
evaluation messages down: stacking sends a round's stack with whichever comes next), the server's
aggregation seconds per round, and the per-round `lora-aggregation-error`. Writes
OUT/results.json, OUT/results.md, OUT/aggregation_error.png and prints the results
as one JSON object. Not a test: ~4 min a job on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell, markdown_table, mean_std

ROOT = Path(__file__).resolve().parents[1]
RANKS = "peft.client_ranks=[2,4,8,16]"


def methods(noise: float) -> dict[str, list[str]]:
    """Method name -> its overrides."""
    return {
        "lora": [],
        "ffa_lora": ["peft=ffa_lora"],
        "dora": ["peft=dora"],
        "zero_padding": ["strategy=zero_padding", RANKS],
        "stacking": ["strategy=stacking", RANKS],
        "svd": ["strategy=svd", RANKS],
        f"lora-dp{noise:g}": ["privacy=dp", f"privacy.noise_multiplier={noise}"],
        f"ffa_lora-dp{noise:g}": ["peft=ffa_lora", "privacy=dp", f"privacy.noise_multiplier={noise}"],
    }


def run_job(sim: LocalSimulation, name: str, overrides: list[str], runs: Path) -> dict:
    folder = sim.run_once(ROOT, runs, name, overrides, num_supernodes=4, timeout=3600)
    rows = read_metrics(folder)
    trained = rows[1:]
    return {
        "accuracy": rows[-1].get("accuracy"),
        "eval_loss": rows[-1].get("eval-loss"),
        "bytes_down": statistics.mean(r["bytes-down"] / r["clients-sampled"] for r in trained),
        "bytes_up": statistics.mean(r["bytes-up"] / r["clients-ok"] for r in trained),
        # Evaluation messages carry the adapter again (and, under stacking, the round's stack).
        "eval_bytes_down": statistics.mean(r["eval-bytes-down"] / r["clients-sampled"] for r in trained),
        "aggregate_seconds": statistics.mean(r.get("aggregate-seconds", float("nan")) for r in trained),
        "aggregation_error": [r.get("lora-aggregation-error") for r in trained],
    }


def summarise(per_seed: list[dict]) -> dict:
    def stats(key):
        values = [r[key] for r in per_seed if r[key] is not None]
        if not values:
            return None, None
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    keys = ("accuracy", "eval_loss", "bytes_down", "eval_bytes_down", "bytes_up", "aggregate_seconds")
    out = {key: stats(key) for key in keys}
    curves = [r["aggregation_error"] for r in per_seed]
    out["aggregation_error"] = [
        statistics.mean(c[i] for c in curves) if all(c[i] is not None for c in curves) else None
        for i in range(len(curves[0]))
    ]
    out["seeds"] = len(per_seed)
    return out


def markdown(summary: dict) -> str:
    header = ["method", "accuracy", "eval loss", "bytes down / client / round: train + eval message",
              "bytes up / client / round", "aggregation s / round", "lora-aggregation-error by round"]  # fmt: skip
    rows = []
    for name, s in summary.items():
        rows.append([
            name,
            mean_std(*s["accuracy"]),
            mean_std(*s["eval_loss"], digits=4),
            f"{cell(s['bytes_down'][0], ',.0f')} + {cell(s['eval_bytes_down'][0], ',.0f')}",
            cell(s["bytes_up"][0], ",.0f"),
            cell(s["aggregate_seconds"][0], ".3f"),
            " / ".join(cell(e, ".3f", "-") for e in s["aggregation_error"]),
        ])  # fmt: skip
    return "\n".join(markdown_table(header, rows)) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, s in summary.items():
        curve = s["aggregation_error"]
        if any(e is not None for e in curve):
            ax.plot(range(1, len(curve) + 1), [e if e is not None else float("nan") for e in curve], marker="o",
                    label=name)  # fmt: skip
    ax.set_xticks(range(1, max(len(s["aggregation_error"]) for s in summary.values()) + 1))
    ax.set_xlabel("round")
    ax.set_ylabel("lora-aggregation-error")
    ax.set_title("||sum p_k B_k A_k - aggregate||_F / ||sum p_k B_k A_k||_F")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--noise", type=float, default=0.01, help="DP noise multiplier of the -dp<z> methods")
    parser.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    table = methods(args.noise)
    chosen = [m for m in args.methods.split(",") if m] or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(table)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give integers separated by commas")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-lora-ranks-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name in chosen:
            for seed in seeds:
                overrides = ["train.threads=1", f"seed={seed}", *table[name], *args.extra]
                results.setdefault(name, []).append(run_job(sim, f"{name}-seed{seed}", overrides, out / "runs"))
                (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = {name: summarise(per_seed) for name, per_seed in results.items()}
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "aggregation_error.png")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
