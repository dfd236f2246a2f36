"""Aggregators under client unavailability, and personalization, on the default non-IID task.

    python benchmarks/aggregation.py --out ~/fedllm-flwr/agg [--supernodes 4] [--rounds 6] [-- OVERRIDES]

A. 50% availability (each client answers a round with probability 0.5, seeded):
   FedAvg (on whoever answered), MIFA and FedProx; eval loss and accuracy per round.
B. Per client: FedAvg's final adapter on the client's held-out split (before FT),
   after `personalize.ft_steps` local steps (FT), and partial sharing (LoRA's B
   matrices kept on each client), with the bytes each sends per round.

Every run is `flwr run` of this app on a private SuperLink stopped by PID. Prints
one JSON object and writes OUT/results.md. Not a test: about 15 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]


def rows_of(run: Path) -> list[dict]:
    return read_metrics(run) if run.is_dir() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--supernodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ft-steps", type=int, default=10)
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every run")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    base = [f"num_rounds={args.rounds}", f"train.local_steps={args.steps}", "eval.limit=40",
            f"strategy.min_available_nodes={args.supernodes}",
            *args.extra]  # fmt: skip
    half = ["strategy.availability=uniform", "strategy.available_p=0.5"]
    runs = {
        "fedavg-p0.5": ["strategy=fedavg", *half],
        "mifa-p0.5": ["strategy=mifa", *half],
        "fedprox-p0.5": ["strategy=fedprox", *half],
        "fedavg-ft": ["strategy=fedavg", f"personalize.ft_steps={args.ft_steps}", "eval.client_metric=true"],
        "partial-lora_B": ["strategy=fedavg", "personalize.private=[lora_B]", "eval.client_metric=true"],
    }
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-agg-") as tmp, LocalSimulation(Path(tmp)) as sim:
        if args.only:
            runs = {n: o for n, o in runs.items() if n in args.only.split(",")}
        for name, overrides in runs.items():
            if not (out / name / "summary.json").is_file():
                ov = [*base, *overrides, f"run.output_dir={out}", f"run.name={name}"]
                print(f"$ flwr run . {' '.join(ov)}", file=sys.stderr, flush=True)
                sim.run(ROOT, overrides=" ".join(ov), num_supernodes=args.supernodes, timeout=3600)
            rows = rows_of(out / name)
            results[name] = {
                "per-round": [
                    {k: r.get(k) for k in ("round", "eval-loss", "accuracy", "participants", "bytes-down", "bytes-up")}
                    for r in rows
                ],
                "summary": json.loads((out / name / "summary.json").read_text())
                if (out / name / "summary.json").is_file()
                else {"status": "failed"},
            }
    (out / "results.md").write_text(markdown(out, results, args.supernodes))
    print(json.dumps(results))
    return 0


def markdown(out: Path, results: dict, clients: int) -> str:
    lines = ["## A. 50% availability: server test set per round", ""]
    names = [n for n in results if n.endswith("p0.5")]
    lines.append("| round | " + " | ".join(f"{n} loss | {n} acc | {n} took part" for n in names) + " |")
    lines.append("|---" * (1 + 3 * len(names)) + "|")
    rounds = max((len(results[n]["per-round"]) for n in names), default=0)
    for i in range(rounds):
        cells = []
        for n in names:
            r = results[n]["per-round"][i] if i < len(results[n]["per-round"]) else {}
            loss, acc = r.get("eval-loss"), r.get("accuracy")
            cells += [f"{loss:.3f}" if loss is not None else "", f"{acc:.3f}" if acc is not None else "",
                      str(r.get("participants") or "")]  # fmt: skip
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "## B. Per client, held-out split after the last round", ""]
    lines.append("| client | FedAvg loss | FedAvg acc | FT loss | FT acc | partial loss | partial acc |")
    lines.append("|---|---|---|---|---|---|---|")
    ft_rows = []
    if (out / "fedavg-ft" / "personalization.jsonl").is_file():
        ft_rows = [json.loads(x) for x in (out / "fedavg-ft" / "personalization.jsonl").read_text().splitlines()]
    partial = rows_of(out / "partial-lora_B")
    last = partial[-1] if partial else {}
    for pid in range(clients):
        ft = next((r for r in ft_rows if r["partition-id"] == pid), {})

        def f(x):
            return f"{x:.3f}" if isinstance(x, (int, float)) else ""

        lines.append(
            f"| {pid} | {f(ft.get('before-eval-loss'))} | {f(ft.get('before-accuracy'))} | "
            f"{f(ft.get('after-eval-loss'))} | {f(ft.get('after-accuracy'))} | "
            f"{f(last.get(f'client_{pid}-held-out-loss'))} | {f(last.get(f'client_{pid}-held-out-accuracy'))} |"
        )
    for name in ("fedavg-ft", "partial-lora_B"):
        rows = results.get(name, {}).get("per-round", [])[1:]
        if rows and rows[0].get("bytes-down"):
            lines.append(f"\n{name}: {rows[0]['bytes-down'] / clients:,.0f} bytes down per client per round")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
