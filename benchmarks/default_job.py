"""The default job, round by round: what `make run` trains, as one results file.

    python benchmarks/default_job.py --out benchmarks/results/default_job

Runs the default config (SmolLM2-135M-Instruct, LoRA r=8, the built-in offline task with
one pair of task families per client over 2 simulated SuperNodes, 3 rounds) with one
`flwr run .` on a private SuperLink stopped by PID at the end, as `make run` does (a run
folder that already holds a summary is read, not run again). Writes OUT/results.json
(each round's eval loss, exact match overall and per task family, seconds; the machine
and the precision the base ran in) and prints it. Not a test: about 3 minutes on 2 CPU
cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell

ROOT = Path(__file__).resolve().parents[1]


def result_of(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    rows = []
    for row in read_metrics(folder):
        families = {k.removeprefix("accuracy-"): v for k, v in row.items() if k.startswith("accuracy-")}
        rows.append({"round": row["round"], "eval_loss": row["eval-loss"], "accuracy": row["accuracy"],
                     "families": families, "train_loss": row.get("train-loss"), "seconds": row["seconds"]})  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "rounds": rows,
        "seconds": summary["seconds"],
        "commit": commit.stdout.strip(),
        "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
    }


def markdown(result: dict) -> str:
    """The round table: eval loss, exact match and each family's exact match."""
    families = list(result["rounds"][0]["families"])
    lines = ["| round | eval loss | exact match | " + " | ".join(families) + " |",
             "|---|---|---|" + "---|" * len(families)]  # fmt: skip
    for r in result["rounds"]:
        label = "0 (before training)" if r["round"] == 0 else str(r["round"])
        cells = " | ".join(cell(r["families"][f], ".2f", "-") for f in families)
        lines.append(f"| {label} | {r['eval_loss']:.4f} | {r['accuracy']:.2f} | {cells} |")
    note = (f"\nCommit {result['commit']}, {result['cores']} CPU cores ({result['cpu_capability']}), torch "
            f"{result['torch']}; the run took {result['seconds']:.0f} s.\n")  # fmt: skip
    return "\n".join(lines) + "\n" + note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedllm-default-") as tmp, LocalSimulation(Path(tmp)) as sim:
        folder = sim.run_once(ROOT, out / "runs", "default", [], num_supernodes=2, timeout=3600)
    result = result_of(folder)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
