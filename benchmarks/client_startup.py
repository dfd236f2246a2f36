"""What a round costs a deployed SuperNode before any training: ClientApp start-up.

    python benchmarks/client_startup.py [--nodes 2] [--rounds 2] [--site-worker auto|off] [-- OVERRIDES]

On the deployment runtime every message starts a fresh ClientApp process. Without a
site worker (`--site-worker off`) that process imports the stack and loads the base
model (from the converted cache; a GGUF is converted once per machine, not per
process); with one (the default), it forwards the message to the SuperNode's warm
worker, which did so once. Results: benchmarks/results/site_worker/ (one JSON per
model, runtime and mode, written from this script's output); the docs' tables are
written from them by `table()` each time the site is built (docs/results/deployment.md).
This runs the default job on a SuperLink and N SuperNodes on 127.0.0.1 (TLS and
SuperNode authentication on, threads split between the co-located nodes), stops them by
PID, and prints JSON: per round, the largest process start-up time (process creation to
the train handler: interpreter and imports), the largest model-load time, the clients'
training time, and the round's wall time; with site workers, each message's start-up
from the workers' logs, Flower's own parts of it measured alone, and the workers'
memory. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.deploy import LocalDeployment, make_credentials
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "site_worker"
DEFAULT_MODEL = "smollm2-135m-instruct"


def table(results: Path = RESULTS) -> str:
    """The docs' tables, from the JSON files this benchmark wrote into `results`: per
    run, each round's wall time, the slowest client's process start-up and model load;
    then, per run through site workers, a warm message's start-up and a worker's memory."""
    lines = ["| model | runtime | site worker | round | round seconds | process start-up s | model load s | train s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    runs = [json.loads(path.read_text()) for path in results.glob("*.json")]
    runs.sort(key=lambda run: (run["model"] != DEFAULT_MODEL, run["model"], run["runtime"], run["site-worker"]))
    for run in runs:
        for r in run["per-round"]:
            figures = [r[k] for k in ("round-seconds", "process-start-seconds", "model-load-seconds", "train-seconds")]
            cells = ["" if v is None else f"{v:.1f}" for v in figures]
            if run["runtime"] == "simulation":
                cells[1] = "-"  # a Ray actor lives for the run: its age is no per-message start-up
            lines.append(f"| {run['model']} | {run['runtime']} | {run['site-worker']} | {r['round']} | "
                         f"{' | '.join(cells)} |")  # fmt: skip
    lines += ["", "| model | warm message start-up s | before our app loaded s | Flower's ClientApp import s | "
              "FAB install s | worker RSS MB | worker PSS MB |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        ages, memory = run.get("warm-start-up-median-seconds"), run.get("site-worker-memory-mb") or [{}]
        if ages:
            flower = run.get("flower-parts") or {}
            parts = [flower.get("flower-clientapp-import-seconds"), flower.get("fab-install-seconds")]
            cells = [f"{ages['handler']:.2f}", f"{ages['app']:.2f}", *("" if v is None else f"{v:.2f}" for v in parts)]
            cells += [str(max((m.get(k, 0) for m in memory), default=0)) for k in ("rss", "pss")]
            lines.append(f"| {run['model']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def flower_parts(work: Path, repeat: int = 3) -> dict:
    """Two parts of a deployed ClientApp process's start-up that are Flower's, each
    measured alone (median of `repeat`): a fresh interpreter importing Flower's
    ClientApp runtime (`flwr-clientapp`), and installing this app's FAB, which
    `flwr-clientapp` does for every message. The rest of the time before the app is
    loaded goes to the Runtime API's exchanges with the SuperNode."""
    code = "import time; t = time.perf_counter(); import flwr.supernode.runtime.run_clientapp as m; "
    code += "print(time.perf_counter() - t)"
    imports = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
               for _ in range(repeat)]  # fmt: skip
    flwr = Path(sys.executable).parent / "flwr"
    subprocess.run([str(flwr), "build", "--app", str(ROOT)], cwd=work, capture_output=True, check=True)
    fab = next(work.glob("*.fab")).read_bytes()
    from flwr.cli.install import install_from_fab

    installs = []
    for i in range(repeat):
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # its "Successfully installed" line
            install_from_fab(fab, work / f"flwr-home-{i}", skip_prompt=True)
        installs.append(time.perf_counter() - t)
    return {"flower-clientapp-import-seconds": round(statistics.median(imports), 2),
            "fab-install-seconds": round(statistics.median(installs), 2), "fab-bytes": len(fab)}  # fmt: skip


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


def worker_memory(directory: Path) -> list[dict]:
    """Each live site worker's memory in MB once the run is over (it still holds the
    stack, the base model and the site's data): resident, proportional (PSS: shared
    pages split between the processes that map them) and its peak resident size."""
    import psutil

    sizes = []
    for status in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        pid = json.loads(status.read_text()).get("pid")
        try:
            info = psutil.Process(pid).memory_full_info()
            peak = peak_resident_mb(pid)
        except (psutil.Error, OSError, TypeError, ValueError):
            continue
        sizes.append({"rss": round(info.rss / 2**20), "pss": round(info.pss / 2**20), "last-message-peak-rss": peak})
    return sizes


def peak_resident_mb(pid: int) -> int | None:
    """VmHWM of `pid` (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return None


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
        memory = []
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
                memory = worker_memory(work / "workers")  # before the nodes, and their workers, stop
        if "[fedllm-flwr] done in" not in result.stdout:
            print(result.stdout[-3000:], file=sys.stderr)
            return 1
        rows = read_metrics(out / "s")
        messages = worker_timelines(work / "workers")
        parts = flower_parts(work) if messages else None
    report = {
        "model": next((o.split("=", 1)[1] for o in args.extra if o.startswith("model.name=")), DEFAULT_MODEL),
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
    if memory:
        report["site-worker-memory-mb"] = memory
    if messages:
        report["site-worker-messages"] = messages
        warm = [m for m in messages if not m["first"]]
        report["warm-start-up-median-seconds"] = (
            {part: round(statistics.median(m[part] for m in warm), 2) for part in PARTS} if warm else None
        )
        report["flower-parts"] = parts
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
