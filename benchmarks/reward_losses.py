"""Federated reward modeling: the pairwise losses compared in one sweep, fed and local.

    python benchmarks/reward_losses.py --out ~/fedllm-flwr/reward [-- OVERRIDES]

Runs `fedllm-flwr sweep -m task=reward reward_loss=<all> scenario=fed,local` (each
job a `flwr run` on a private SuperLink stopped by the sweep) on the offline
preference pairs: the built-in task families, chosen = the right answer,
rejected = a plausible wrong one, split by family over 2 SuperNodes. Then
tabulates, per loss and scenario, held-out preference accuracy: on the server's
test pairs (families of both clients; for `local`, the mean over the clients'
own adapters) and on each client's held-out pairs, with the mean margin.
Writes OUT/results.md and prints one JSON object. Not a test: ~85 min on 2 CPU cores (~7 min a job).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import stop_on_sigterm
from fedllm_tools.tables import cell

LOSSES = ("logsigmoid", "bce", "hinge", "mse", "smooth_l1", "focal")


def job_row(folder: Path) -> dict | None:
    if not (folder / "summary.json").is_file():
        return None
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    rows = read_metrics(folder)
    first, last = rows[0], rows[-1]
    clients = sorted(int(k.split("_")[1].split("-")[0]) for k in last if k.endswith("-held-out-preference-accuracy"))
    return {
        "loss": cfg["reward_loss"]["name"],
        "scenario": cfg["scenario"]["name"],
        "test-accuracy-round-0": first.get("preference-accuracy"),
        "test-accuracy": last.get("preference-accuracy"),
        "test-margin": last.get("margin"),
        "test-bt-loss": last.get("eval-loss"),
        "held-out-accuracy": last.get("client-eval-preference-accuracy"),
        "held-out-accuracy-per-client": [last[f"client_{c}-held-out-preference-accuracy"] for c in clients],
        "seconds": json.loads((folder / "summary.json").read_text())["seconds"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| loss | scenario | test pairs: accuracy (round 0) | test accuracy | test margin | test BT loss "
        "| clients' held-out accuracy (mean; per client) | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (LOSSES.index(r["loss"]), r["scenario"])):
        num = [
            cell(r[k], ".3f", "-") for k in ("test-accuracy-round-0", "test-accuracy", "test-margin", "test-bt-loss")
        ]
        per = ", ".join(cell(x, ".3f", "-") for x in r["held-out-accuracy-per-client"])
        held = f"{cell(r['held-out-accuracy'], '.3f', '-')} ({per})"
        lines.append(f"| {r['loss']} | {r['scenario']} | {' | '.join(num)} | {held} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    sweep = out / "sweep"
    command = [
        sys.executable, "-m", "fedllm_tools.cli", "sweep", "-m", "task=reward", f"reward_loss={','.join(LOSSES)}",
        "scenario=fed,local", f"hydra.sweep.dir={sweep}", *args.extra,
    ]  # fmt: skip
    if not (sweep / "summary.json").is_file():
        print("$ " + " ".join(command[2:]), file=sys.stderr, flush=True)
        sweep_process = subprocess.Popen(command)
        try:
            returncode = sweep_process.wait()
        except BaseException:  # SIGTERM or Ctrl-C: the sweep stops its own SuperLink and Ray
            sweep_process.terminate()
            sweep_process.wait(timeout=120)
            raise
        if returncode != 0:
            return returncode
    rows = [r for p in sorted(sweep.iterdir()) if p.is_dir() and (r := job_row(p))]
    (out / "results.md").write_text(markdown(rows))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
