"""What a round costs a deployed SuperNode before any training: ClientApp start-up.

    python benchmarks/client_startup.py [--nodes 2] [--rounds 2] [--site-worker auto|off] [-- OVERRIDES]

On the deployment runtime every message starts a fresh ClientApp process. Without a
site worker (`--site-worker off`) that process imports the stack and loads the base
model (from the converted cache; a GGUF is converted once per machine, not per
process); with one (the default), it forwards the message to the SuperNode's warm
worker, which did so once. Results: benchmarks/results/site_worker/ (one JSON per
runtime and mode, written from this script's output); the docs' tables are written from
them by `table()` each time the site is built (docs/results/deployment.md). This runs the default job on a
SuperLink and N SuperNodes on 127.0.0.1 (TLS and SuperNode authentication on,
threads split between the co-located nodes), stops them by PID, and prints JSON:
per round, the largest process start-up time (process creation to the train
handler: interpreter and imports), the largest model-load time, the clients'
training time, and the round's wall time. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.deploy import LocalDeployment, make_credentials
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "site_worker"


def table(results: Path = RESULTS) -> str:
    """The docs' table, from the JSON files this benchmark wrote into `results`: per
    run, each round's wall time, the slowest client's process start-up and model load."""
    lines = ["| runtime | site worker | round | round seconds | process start-up s | model load s | train s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in sorted(results.glob("*.json")):
        run = json.loads(path.read_text())
        for r in run["per-round"]:
            figures = [r[k] for k in ("round-seconds", "process-start-seconds", "model-load-seconds", "train-seconds")]
            cells = ["" if v is None else f"{v:.1f}" for v in figures]
            if run["runtime"] == "simulation":
                cells[1] = "-"  # a Ray actor lives for the run: its age is no per-message start-up
            lines.append(f"| {run['runtime']} | {run['site-worker']} | {r['round']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


LINE = re.compile(
    r"served (\w+) for pid \d+ in [\d.]+ s \(start-up: app ([\d.]+) s, sent ([\d.]+) s, handler ([\d.]+) s\)"
)
PARTS = ("app", "sent", "handler")


def worker_timelines(directory: Path) -> list[dict]:
    """Each message a site worker served, from its log: the proxy process's age (s)
    when Flower had loaded the app, when the proxy sent the message, when the handler
    started; `first`: the worker's first message (it waited for the worker's start)."""
    messages = []
    for log_file in sorted(directory.glob("*.log")) if directory.is_dir() else []:
        found = [LINE.search(line) for line in log_file.read_text().splitlines()]
        for i, m in enumerate(f for f in found if f):
            ages = dict(zip(PARTS, map(float, m.groups()[1:]), strict=True))
            messages.append({"worker": log_file.stem, "kind": m[1], "first": i == 0, **ages})
    return messages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--site-worker", choices=("auto", "off"), default="auto", help="FEDLLM_SITE_WORKER")
    parser.add_argument("--simulation", action="store_true", help="the same job in simulation, for comparison")
    parser.add_argument("extra", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.nodes)
    with tempfile.TemporaryDirectory(prefix="fedllm-startup-") as tmp:
        work = Path(tmp)
        out = work / "runs"
        env = {"OMP_NUM_THREADS": str(threads), "FEDLLM_SITE_WORKER": args.site_worker,
               "FEDLLM_SITE_WORKER_DIR": str(work / "workers")}  # fmt: skip
        overrides = [f"num_rounds={args.rounds}", f"strategy.min_available_nodes={args.nodes}",
                     f"train.threads={threads}", f"run.output_dir={out}", "run.name=s", *args.extra]  # fmt: skip
        t0 = time.perf_counter()
        if args.simulation:
            with LocalSimulation(work / "sim", env=env, client_cpus=threads) as sim:
                t_run = time.perf_counter()
                result = sim.run(ROOT, " ".join(overrides), num_supernodes=args.nodes, timeout=3600)
                run_seconds = time.perf_counter() - t_run
        else:
            with LocalDeployment(work / "fed", make_credentials(work / "creds", args.nodes), env=env) as dep:
                for i in range(args.nodes):
                    dep.register(i)
                    dep.start_node(i, {"partition-id": i, "num-partitions": args.nodes})
                t_run = time.perf_counter()
                result = dep.run(ROOT, " ".join(overrides), timeout=3600)
                run_seconds = time.perf_counter() - t_run
        if "[fedllm-flwr] done in" not in result.stdout:
            print(result.stdout[-3000:], file=sys.stderr)
            return 1
        rows = read_metrics(out / "s")
        messages = worker_timelines(work / "workers")
    report = {
        "runtime": "simulation" if args.simulation else "deployment",
        "site-worker": "n/a" if args.simulation else args.site_worker,
        "nodes": args.nodes,
        "rounds": args.rounds,
        "threads-per-node": threads,
        "run-seconds": round(run_seconds, 1),
        "seconds-with-startup-of-superlink-and-nodes": round(time.perf_counter() - t0, 1),
        "per-round": [
            {
                "round": r["round"],
                "process-start-seconds": r.get("process-start-seconds"),
                "model-load-seconds": r.get("model-load-seconds"),
                "train-seconds": r.get("train-seconds"),
                "round-seconds": r.get("seconds"),
            }
            for r in rows[1:]
        ],
    }
    if messages:
        report["site-worker-messages"] = messages
        warm = [m for m in messages if not m["first"]]
        report["warm-start-up-median-seconds"] = (
            {part: round(statistics.median(m[part] for m in warm), 2) for part in PARTS} if warm else None
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
