"""FedOT (offsite tuning) against federated LoRA on the default task.

    python benchmarks/fedot.py --out ~/fedllm-flwr/fedot [--supernodes 2] [-- OVERRIDES]

Runs, each `flwr run` of this app on a private SuperLink stopped by PID:
- fedot-drop0.2, fedot-drop0.5: FedOT, LoRA on the first and last 2 layers, the
  emulator dropping 20% / 50% of the middle layers (the FS-LLM paper's settings);
- the same with 200 steps of emulator distillation on the server (`-distill`);
- localot-drop0.2: the same as drop 0.2 with scenario=local (each client alone);
- fedot-drop0.0: FedOT's adapter on an emulator that drops nothing (the full
  model), separating the emulator's loss from the adapter's smaller size;
- fed-lora: plain federated LoRA on every layer.

Reports the server-side `full` (adapter plugged into the full model) and `emu`
(adapter on the emulator) scores, the one-off emulator broadcast and the
per-round adapter bytes per client. Prints one JSON object and writes
OUT/results.md. Not a test: about 25 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "fedot-drop0.2": ["algorithm=fedot", "algorithm.drop_rate=0.2"],
    "fedot-drop0.5": ["algorithm=fedot", "algorithm.drop_rate=0.5"],
    "fedot-drop0.2-distill": ["algorithm=fedot", "algorithm.drop_rate=0.2", "algorithm.distill_steps=200"],
    "fedot-drop0.5-distill": ["algorithm=fedot", "algorithm.drop_rate=0.5", "algorithm.distill_steps=200"],
    "localot-drop0.2": ["algorithm=fedot", "algorithm.drop_rate=0.2", "scenario=local"],
    "fedot-drop0.0": ["algorithm=fedot", "algorithm.drop_rate=0.0"],
    "fed-lora": [],
}


def rows_of(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every run")
    args = parser.parse_args()
    out = args.out.expanduser().resolve()
    names = [n for n in RUNS if not args.only or n in args.only.split(",")]
    base = ["eval.limit=40", f"strategy.min_available_nodes={args.supernodes}", *args.extra]
    with tempfile.TemporaryDirectory(prefix="fedllm-ot-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name in names:
            if (out / name / "summary.json").is_file():
                continue  # finished earlier: the script resumes
            overrides = [*base, *RUNS[name], f"run.output_dir={out}", f"run.name={name}"]
            print(f"$ flwr run . {' '.join(overrides)}", file=sys.stderr, flush=True)
            sim.run(ROOT, overrides=" ".join(overrides), num_supernodes=args.supernodes, timeout=3600)
    results = {name: collect(out / name, args.supernodes) for name in names}
    (out / "results.md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


def collect(run: Path, clients: int) -> dict:
    """The figures of one run from its summary.json and metrics.jsonl."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return {"status": "failed"}
    summary = json.loads(summary_path.read_text())
    rows = rows_of(run)
    fedot = summary.get("fedot") or {}
    trained = [r for r in rows[1:] if r.get("bytes-down")]
    return {
        "status": summary["status"],
        "accuracy-round-0": rows[0].get("accuracy"),
        "full-accuracy": rows[-1].get("accuracy"),
        "full-eval-loss": rows[-1].get("eval-loss"),
        "emu-accuracy-round-0": rows[0].get("emu-accuracy"),
        "emu-accuracy": rows[-1].get("emu-accuracy"),
        "emu-eval-loss": rows[-1].get("emu-eval-loss"),
        "train-loss-last": rows[-1].get("train-loss"),
        "distill-loss": [fedot.get("distill-loss-first"), fedot.get("distill-loss-last")] if fedot else None,
        "broadcast-bytes-per-client": fedot.get("broadcast-message-bytes"),
        "round-bytes-down-per-client": trained[-1]["bytes-down"] / clients if trained else None,
        "round-bytes-up-per-client": trained[-1]["bytes-up"] / clients if trained else None,
        "client-model-layers": rows[-1].get("model-layers"),
        "client-model-parameters": rows[-1].get("model-parameters"),
        "trainable-parameters": summary.get("trainable-parameters"),
        "seconds": summary.get("seconds"),
        "fedot": fedot or None,
    }


def markdown(results: dict) -> str:
    def mb(x):
        return f"{x / 1e6:.2f} MB" if isinstance(x, (int, float)) else "-"

    lines = [
        "| run | full acc | full loss | emu acc | emu loss | client layers | client params | trainable "
        "| broadcast / client | per round / client (down) | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r.get("status") != "completed":
            lines.append(f"| {name} | failed |" + " |" * 10)
            continue
        scores = [cell(r[k], ".3f", "-") for k in ("full-accuracy", "full-eval-loss", "emu-accuracy", "emu-eval-loss")]
        lines.append(
            f"| {name} | {' | '.join(scores)} | {cell(r['client-model-layers'], '.0f', '-')} "
            f"| {cell(r['client-model-parameters'], ',.0f', '-')} | {cell(r['trainable-parameters'], ',', '-')} "
            f"| {mb(r['broadcast-bytes-per-client'])} | {mb(r['round-bytes-down-per-client'])} "
            f"| {cell(r['seconds'], '.0f', '-')} |"
        )
    lines.append("")
    lines.append("Round 0 (before training): " + ", ".join(
        f"{n} full {cell(r.get('accuracy-round-0'), '.3f', '-')} / emu "
        f"{cell(r.get('emu-accuracy-round-0'), '.3f', '-')}"
        for n, r in results.items() if r.get("status") == "completed"
    ))  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
