"""Zeroth-order federation with seed-only messages against federated LoRA with backprop.

    python benchmarks/zo.py --out ~/fedllm-flwr/zo [--lora-rounds 3] [--zo-rounds 40]
        [--zo-steps 50] [--zo-every 5] [--zo-lr 5e-4] [--zo-eps 1e-2] [--full-rounds 5]
        [--full-steps 20] [--full-lr 1e-5] [--full-eps 1e-3] [-- OVERRIDES]

Three jobs on the default task (SmolLM2-135M-Instruct, the built-in offline task, 2
simulated SuperNodes), each a `flwr run` on a private SuperLink stopped by PID at the
end; a job whose run folder already holds a summary is read, not run again:

- `lora`: the default job (LoRA, AdamW with backprop, `train.local_steps` steps a round);
- `zo`: `algorithm=zo` on the same LoRA adapter, `--zo-steps` MeZO steps a round for
  `--zo-rounds` rounds, evaluated every `--zo-every` rounds (zeroth-order needs many
  more steps: each estimate is along one random direction);
- `zo-full`: `zo.params=full`, every base weight in fp32, `--full-steps` steps a round
  for `--full-rounds` rounds (each step draws z for 135M weights three times).

Reports per job: bytes per client per round each way (training and evaluation
messages), peak memory per client, seconds per round (training: a round's seconds
less the server's evaluation), and accuracy and eval loss where evaluated; then at
equal rounds and at equal training wall time (the first evaluated round at or past
the lora run's). Writes OUT/results.json, OUT/results.md and OUT/curves.png (eval
loss and accuracy by round and by training seconds) and prints the results as one
JSON object. Not a test.
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
from fedllm_tools.tables import cell, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def run_job(sim: LocalSimulation, name: str, overrides: list[str], runs: Path) -> dict:
    folder = sim.run_once(ROOT, runs, name, overrides, num_supernodes=2, timeout=6 * 3600)
    rows = read_metrics(folder)
    trained = rows[1:]
    elapsed, total = [], 0.0
    for r in rows:  # training time: the server's evaluation (every round for lora) is left out
        total += r["seconds"] - (r.get("eval-seconds") or 0.0) if r["round"] else 0.0
        elapsed.append(round(total, 1))
    return {
        "rounds": len(trained),
        "overrides": overrides,
        "steps_per_round": int(
            next(o.split("=")[1] for o in [*overrides, "train.local_steps=10"] if o.startswith("train.local_steps="))
        ),  # fmt: skip
        "accuracy": [r.get("accuracy") for r in rows],
        "eval_loss": [r.get("eval-loss") for r in rows],
        "train_loss": [r.get("train-loss") for r in rows],
        "wall_seconds": elapsed,
        "seconds_per_round": statistics.mean(r["seconds"] - (r.get("eval-seconds") or 0.0) for r in trained),
        "bytes_down": statistics.mean((r["bytes-down"] + r["eval-bytes-down"]) / r["clients-sampled"] for r in trained),
        "bytes_up": statistics.mean(r["bytes-up"] / r["clients-ok"] for r in trained),
        "peak_memory_mb": max(r["peak-memory-mb"] for r in trained),
    }


def evaluated_at_or_after(run: dict, key: str, value: float) -> int:
    """The first evaluated round whose `key` ("rounds" or "wall_seconds") is at or
    past `value`, else the last evaluated round."""
    evaluated = [i for i, loss in enumerate(run["eval_loss"]) if loss is not None]
    position = (lambda i: i) if key == "rounds" else (lambda i: run["wall_seconds"][i])
    return next((i for i in evaluated if position(i) >= value), evaluated[-1])


def first_below(run: dict, loss: float) -> int | None:
    """The first evaluated round whose eval loss is at or below `loss`."""
    return next((i for i, v in enumerate(run["eval_loss"]) if v is not None and v <= loss), None)


def markdown(results: dict) -> str:
    lora = results["lora"]
    header = ["job", "steps / client / round", "bytes down / client / round", "bytes up / client / round",
              "peak memory / client (MB)", "training s / round", f"round {lora['rounds']}: accuracy, eval loss",
              "at lora's training time: round, accuracy, eval loss", "last round: round, accuracy, eval loss",
              "first round at lora round 1's eval loss"]  # fmt: skip
    rows = []
    for name, r in results.items():
        same = evaluated_at_or_after(r, "rounds", lora["rounds"])
        timed = evaluated_at_or_after(r, "wall_seconds", lora["wall_seconds"][-1])
        last = evaluated_at_or_after(r, "rounds", r["rounds"])
        reached = first_below(r, lora["eval_loss"][1])
        rows.append([
            name, str(r["steps_per_round"]), cell(r["bytes_down"], ",.0f"), cell(r["bytes_up"], ",.0f"),
            cell(r["peak_memory_mb"], ".0f"), cell(r["seconds_per_round"], ".1f"),
            f"{same}: {cell(r['accuracy'][same], '.2f')}, {cell(r['eval_loss'][same], '.4f')}",
            f"{timed}: {cell(r['accuracy'][timed], '.2f')}, {cell(r['eval_loss'][timed], '.4f')}",
            f"{last}: {cell(r['accuracy'][last], '.2f')}, {cell(r['eval_loss'][last], '.4f')}",
            "-" if reached is None else f"{reached} ({reached * r['steps_per_round']} steps)",
        ])  # fmt: skip
    return "\n".join(markdown_table(header, rows)) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for name, r in results.items():
        for row, key in enumerate(("eval_loss", "accuracy")):
            points = [(i, v) for i, v in enumerate(r[key]) if v is not None]
            axes[row][0].plot([i for i, _ in points], [v for _, v in points], marker=".", label=name)
            axes[row][1].plot([r["wall_seconds"][i] for i, _ in points], [v for _, v in points], marker=".", label=name)
    for row, label in enumerate(("eval loss", "accuracy")):
        axes[row][0].set_ylabel(label)
        axes[row][1].set_xscale("symlog", linthresh=10)  # round 0 sits at 0 s
    axes[1][0].set_xlabel("round")
    axes[1][1].set_xlabel("training seconds (log above 10)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lora-rounds", type=int, default=3)
    parser.add_argument("--zo-rounds", type=int, default=40)
    parser.add_argument("--zo-steps", type=int, default=50, help="MeZO steps per client per round")
    parser.add_argument("--zo-every", type=int, default=5, help="evaluate the zo job every N rounds")
    parser.add_argument("--full-rounds", type=int, default=5, help="zo.params=full rounds (0: no such job)")
    parser.add_argument("--full-steps", type=int, default=20)
    parser.add_argument("--zo-lr", default="5e-4", help="zo.lr of the zo job (the adapter)")
    parser.add_argument("--zo-eps", default="1e-2")
    parser.add_argument("--full-lr", default="1e-5", help="zo.lr of the zo-full job (every base weight)")
    parser.add_argument("--full-eps", default="1e-3")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    if min(args.lora_rounds, args.zo_rounds, args.zo_steps, args.zo_every, args.full_steps) < 1 or args.full_rounds < 0:
        parser.error("rounds, steps and --zo-every must be >= 1 (--full-rounds >= 0)")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    zo = ["algorithm=zo", f"eval.every={args.zo_every}"]
    jobs = {
        "lora": [f"num_rounds={args.lora_rounds}"],
        "zo": [*zo, f"num_rounds={args.zo_rounds}", f"train.local_steps={args.zo_steps}", f"zo.lr={args.zo_lr}",
               f"zo.eps={args.zo_eps}"],
        "zo-full": [*zo, "zo.params=full", f"num_rounds={args.full_rounds}", f"train.local_steps={args.full_steps}",
                    f"zo.lr={args.full_lr}", f"zo.eps={args.full_eps}", f"zo.store_dir={out / 'weights'}"],
    }  # fmt: skip
    if not args.full_rounds:
        del jobs["zo-full"]
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
