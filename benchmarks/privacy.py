"""What privacy costs: plain FedAvg, SecAgg+ and differential privacy on the same job.

    python benchmarks/privacy.py --out ~/fedllm-flwr/privacy [--noise 0.01,0.1,1.0] [-- OVERRIDES]

Runs the default job (SmolLM2-135M-Instruct, LoRA, the built-in offline task over
2 simulated SuperNodes, 3 rounds) once per setting, each a `flwr run .` on a
private SuperLink stopped by PID when it ends:

- `plain`: FedAvg, updates sent up in fp16 (the default);
- `plain-fp32`: FedAvg with updates sent up in fp32, what SecAgg+ starts from, so
  `secagg` against it isolates the protocol's own quantization;
- `secagg`: SecAgg+ (`privacy=secagg`);
- `dp-z<z>`: client-side clipping at `privacy.clipping_norm` with server-side
  Gaussian noise of multiplier z (`privacy=dp`), with epsilon at delta = 1e-5 after
  the run's rounds.

Reports, per setting: final exact-match accuracy and eval loss on the server's test
set, mean seconds per round, bytes up per client per round, and for DP the
epsilon and the largest update norm the server averaged. Writes OUT/results.json
and OUT/results.md and prints the results as one JSON object. Not a test:
~20 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell

ROOT = Path(__file__).resolve().parents[1]


def settings(noise: list[float]) -> dict[str, list[str]]:
    out = {"plain": [], "plain-fp32": ["compression.up=fp32"], "secagg": ["privacy=secagg"]}
    for z in noise:
        out[f"dp-z{z:g}"] = ["privacy=dp", f"privacy.noise_multiplier={z}"]
    return out


def run_job(sim: LocalSimulation, name: str, overrides: list[str], runs: Path) -> dict:
    print(f"[privacy] {name}: flwr run . {' '.join(overrides)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    result = sim.run(ROOT, overrides=" ".join([*overrides, f"run.output_dir={runs}", f"run.name={name}"]),
                     num_supernodes=2, timeout=3600)  # fmt: skip
    seconds = time.perf_counter() - t0
    folder = runs / name
    if result.returncode != 0 or not (folder / "summary.json").is_file():
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}")
    rows = read_metrics(folder)
    trained = rows[1:]
    last = rows[-1]
    privacy = json.loads((folder / "summary.json").read_text()).get("privacy") or {}
    return {
        "accuracy": last.get("accuracy"),
        "eval_loss": last.get("eval-loss"),
        "accuracy_round_0": rows[0].get("accuracy"),
        "seconds_per_round": round(sum(r["seconds"] for r in trained) / len(trained), 2),
        "bytes_up_per_client_per_round": round(sum(r["bytes-up"] / r["clients-ok"] for r in trained) / len(trained)),
        "epsilon": privacy.get("epsilon"),
        "delta": privacy.get("delta"),
        "noise_std": last.get("noise-std"),
        "update_norm_max": max((r["update-norm-max"] for r in trained if "update-norm-max" in r), default=None),
        "wall_seconds": round(seconds, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "| setting | accuracy (round 0) | eval loss | s / round | bytes up / client / round | epsilon (delta) "
        "| largest update norm averaged |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        eps = f"{cell(r['epsilon'], '.3g', '-')} ({r['delta']:g})" if r["epsilon"] is not None else "-"
        accuracy = f"{cell(r['accuracy'], '.3f', '-')} ({cell(r['accuracy_round_0'], '.3f', '-')})"
        lines.append(
            f"| {name} | {accuracy} | {cell(r['eval_loss'], '.4f', '-')} | {cell(r['seconds_per_round'], '.1f', '-')} "
            f"| {r['bytes_up_per_client_per_round']:,} | {eps} | {cell(r['update_norm_max'], '.3g', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--noise", default="0.01,0.1,1.0", help="comma-separated DP noise multipliers")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    try:
        noise = [float(z) for z in args.noise.split(",") if z]
    except ValueError:
        parser.error(f"--noise {args.noise!r}: give numbers separated by commas")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-privacy-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name, overrides in settings(noise).items():
            results[name] = run_job(sim, name, ["train.threads=1", *overrides, *args.extra], out / "runs")
            (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
