"""What every job of a sweep pays again under Flower 1.42's simulation, and what a
pool of warm ClientApp workers could take off it.

    python benchmarks/sweep_floor.py [--repeat 3] [-- OVERRIDES]

Flower's simulation starts each run in a new `flwr-simulation` process (the ServerApp
and the Ray driver: `flwr/simulation/app.py`), builds new Ray actors for it and ends
them with it (`flwr/server/superlink/fleet/vce/vce_api.py`: `backend.terminate()` at the
run's end, which ends every actor and calls `ray.shutdown()`, `raybackend.py`). A
sweep keeps its SuperLink and its Ray head between jobs (`fedllm_tools/sweep.py`), but
no process that imported the ML stack or loaded the model survives a job.

This measures, each in a fresh process on an otherwise idle machine (median of
`--repeat`), wall and CPU seconds of:
- `server`: the ServerApp's part before its first round: the stack's import, the
  run's data and test set, the base model with its adapter (as `run_server` does);
- `client`: a ClientApp worker's warm-up: the stack's import, the model and its data
  (`fedllm_flwr.client.warm_up`), what each actor pays per job today;
- `actor-with-pool`: what an actor would still pay if its node's work ran in a
  warm worker kept across jobs: Ray, Flower's actor and our light ClientApp.

It prints JSON (kept in benchmarks/results/sweep_floor.json; the docs' table is written
from that file by `table()` each time the site is built: docs/results/efficiency.md).
Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sweep_floor.json"

PRELUDE = """
import json, os, sys, time
import psutil
born = psutil.Process().create_time()
def mark(name, marks={}):
    cpu = os.times()
    marks[name] = {"wall": round(time.time() - born, 3), "cpu": round(cpu.user + cpu.system, 3)}
    return marks
overrides = sys.argv[1:]
"""

PARTS = {
    "server": """
import server_app
from fedllm_flwr.server.run import run_server
mark("import")
from fedllm_flwr.config import load_cfg
from fedllm_flwr.data import records, test_records
cfg = load_cfg(overrides)
records(cfg); test_records(cfg)
mark("data")
from fedllm_flwr.algorithms.registry import algorithm_for
algorithm_for(cfg).server_model()
print(json.dumps(mark("model")))
""",
    "client": """
import client_app
import fedllm_flwr.client
mark("import")
from fedllm_flwr.config import load_cfg
from fedllm_flwr.client import warm_up
info = warm_up(load_cfg(overrides), {"partition-id": 0, "num-partitions": 2})
assert "error" not in info, info
print(json.dumps(mark("model")))
""",
    "actor-with-pool": """
import flwr.simulation.ray_transport.ray_actor
import client_app
assert "torch" not in sys.modules
print(json.dumps(mark("import")))
""",
}


def measure(part: str, overrides: list[str]) -> dict:
    """One fresh process's marks: process age (wall) and CPU seconds at each step."""
    code = PRELUDE + PARTS[part]
    out = subprocess.run([sys.executable, "-c", code, *overrides], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=None)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: Path = RESULTS) -> str:
    """The docs' table: each process's steps, as process age and CPU seconds."""
    report = json.loads(results.read_text())
    lines = ["| fresh process | up to | wall s | CPU s |", "|---|---|---|---|"]
    for part in PARTS:
        for step, figures in report[part].items():
            lines.append(f"| {part} | {step} | {figures['wall']:.2f} | {figures['cpu']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    report: dict = {"repeat": args.repeat, "overrides": args.extra}
    for part in PARTS:
        runs = [measure(part, args.extra) for _ in range(args.repeat)]
        report[part] = {
            step: {kind: round(statistics.median(r[step][kind] for r in runs), 2) for kind in ("wall", "cpu")}
            for step in runs[0]
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
