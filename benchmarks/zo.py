"""Zeroth-order federation with seed-only messages against federated LoRA with backprop.

    python benchmarks/zo.py --out ~/fedllm-flwr/zo [--lora-rounds 3] [--zo-rounds 30]
        [--zo-steps 10] [-- OVERRIDES]

Two jobs on the default task (SmolLM2-135M-Instruct, the built-in offline task, 2
simulated SuperNodes), each a `flwr run` on a private SuperLink stopped by PID at the
end; a job whose run folder already holds a summary is read, not run again:

- `lora`: the default job (LoRA, AdamW with backprop, `train.local_steps` steps a round);
- `zo`: `algorithm=zo` on the same LoRA adapter, `--zo-steps` MeZO steps a round, for
  `--zo-rounds` rounds (zeroth-order needs many more steps: the estimate is a single
  random direction's).

Reports per job: bytes per client per round each way (training and evaluation
messages), peak memory per client, seconds per round, and accuracy and eval loss per
round; then both at equal rounds and at equal wall time (the zo run's first round at
or past the lora run's total time). Writes OUT/results.json, OUT/results.md and
OUT/curves.png (eval loss and accuracy by round and by wall seconds) and prints the
results as one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedllm_flwr.simulation import LocalSimulation, stop_on_sigterm
from fedllm_flwr.tables import cell, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def run_job(sim: LocalSimulation, name: str, overrides: list[str], runs: Path) -> dict:
    folder = sim.run_once(ROOT, runs, name, overrides, num_supernodes=2, timeout=6 * 3600)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    trained = rows[1:]
    elapsed, total = [], 0.0
    for r in rows:
        total += r["seconds"]
        elapsed.append(round(total, 1))
    return {
        "rounds": len(trained),
        "accuracy": [r.get("accuracy") for r in rows],
        "eval_loss": [r.get("eval-loss") for r in rows],
        "wall_seconds": elapsed,
        "seconds_per_round": statistics.mean(r["seconds"] for r in trained),
        "bytes_down": statistics.mean((r["bytes-down"] + r["eval-bytes-down"]) / r["clients-sampled"] for r in trained),
        "bytes_up": statistics.mean(r["bytes-up"] / r["clients-ok"] for r in trained),
        "peak_memory_mb": max(r["peak-memory-mb"] for r in trained),
    }


def at_time(run: dict, seconds: float) -> int:
    """The first round whose row was written at or after `seconds` (else the last)."""
    return next((i for i, t in enumerate(run["wall_seconds"]) if t >= seconds), len(run["wall_seconds"]) - 1)


def markdown(results: dict) -> str:
    lora, zo = results["lora"], results["zo"]
    same = min(lora["rounds"], zo["rounds"])
    timed = at_time(zo, lora["wall_seconds"][-1])
    header = ["job", "bytes down / client / round", "bytes up / client / round", "peak memory / client (MB)",
              "s / round", f"round {same}: accuracy, eval loss", "at the lora run's time: round, accuracy, eval loss",
              "last round: accuracy, eval loss"]  # fmt: skip
    rows = []
    for name, r in results.items():
        t = timed if name == "zo" else r["rounds"]
        rows.append([
            name, cell(r["bytes_down"], ",.0f"), cell(r["bytes_up"], ",.0f"), cell(r["peak_memory_mb"], ".0f"),
            cell(r["seconds_per_round"], ".1f"),
            f"{cell(r['accuracy'][same], '.2f')}, {cell(r['eval_loss'][same], '.4f')}",
            f"{t}, {cell(r['accuracy'][t], '.2f')}, {cell(r['eval_loss'][t], '.4f')}",
            f"{cell(r['accuracy'][-1], '.2f')}, {cell(r['eval_loss'][-1], '.4f')}",
        ])  # fmt: skip
    return "\n".join(markdown_table(header, rows)) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for name, r in results.items():
        rounds = range(len(r["eval_loss"]))
        for row, key in enumerate(("eval_loss", "accuracy")):
            axes[row][0].plot(rounds, r[key], label=name)
            axes[row][1].plot(r["wall_seconds"], r[key], label=name)
    for row, label in enumerate(("eval loss", "accuracy")):
        axes[row][0].set_ylabel(label)
    axes[1][0].set_xlabel("round")
    axes[1][1].set_xlabel("wall seconds")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lora-rounds", type=int, default=3)
    parser.add_argument("--zo-rounds", type=int, default=30)
    parser.add_argument("--zo-steps", type=int, default=10, help="MeZO steps per client per round")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to both jobs")
    args = parser.parse_args()
    if min(args.lora_rounds, args.zo_rounds, args.zo_steps) < 1:
        parser.error("--lora-rounds, --zo-rounds and --zo-steps must be >= 1")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = {
        "lora": [f"num_rounds={args.lora_rounds}"],
        "zo": ["algorithm=zo", f"num_rounds={args.zo_rounds}", f"train.local_steps={args.zo_steps}"],
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-zo-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name, overrides in jobs.items():
            results[name] = run_job(sim, name, ["train.threads=1", *overrides, *args.extra], out / "runs")
            (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "curves.png")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
