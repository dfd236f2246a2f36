"""FS-LLM's benchmarks, before and after a short federated run, on local data files.

    python benchmarks/instruction_benchmarks.py --data ../shared/data --out ~/fedllm-flwr/bench
        [--gsm8k-limit 200] [--dolly-limit 200] [--humaneval-limit 0] [--skip base,gsm8k,dolly]

1. Base model (no adapter): GSM8K 8-shot CoT accuracy on the first N test
   questions, HumanEval pass@1 (greedy) on all 164 problems, ROUGE-L on N held-out
   Dolly records (the `dolly` preset's test split for seed 0).
2. A short Fed-GSM8K-3 run (3 SuperNodes, iid) and a short Fed-Dolly run (8
   SuperNodes, one category each), LoRA, then the same evaluation of each final
   adapter (GSM8K accuracy; ROUGE-L and HumanEval for Dolly's adapter too, since
   instruction tuning can move code completion either way).

Every evaluation is `fedllm-flwr evaluate` and every run `flwr run` on a private
SuperLink stopped by PID. Prints one JSON object (and writes OUT/results.json and
OUT/results.md); each figure carries its run time. Not a test: it takes about an
hour on 2 CPU cores. `--data` is a folder laid out as gsm8k/{train,test}.jsonl,
dolly/databricks-dolly-15k.jsonl.gz.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell

ROOT = Path(__file__).resolve().parents[1]

#: Short runs: 3 rounds of local LoRA steps; the server keeps only the loss on 100
#: test records during training (generation metrics come after, from `evaluate`).
TRAIN = ["num_rounds=3", "train.batch_size=4", "dataset.max_seq_len=384", "dataset.metric=none",
         "eval.limit=100", "eval.every=3", "strategy.fraction_evaluate=0"]  # fmt: skip
RUNS = {
    "gsm8k": (3, ["dataset=gsm8k", "train.local_steps=10"]),
    "dolly": (8, ["dataset=dolly", "train.local_steps=5"]),
}


def evaluate(args: list[str], out: Path) -> dict:
    """One `fedllm-flwr evaluate` call in its own process; its JSON result."""
    cmd = [sys.executable, "-m", "fedllm_tools.cli", "evaluate", *args, "--out", str(out)]
    print("$ fedllm-flwr evaluate " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}", "command": cmd}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"metrics": result["metrics"], "seconds": result["seconds"], "file": str(out)}


def data_overrides(data: Path, name: str) -> list[str]:
    if name == "gsm8k":
        return [f"dataset.path={data / 'gsm8k/train.jsonl'}", f"dataset.test_path={data / 'gsm8k/test.jsonl'}"]
    return [f"dataset.path={data / 'dolly/databricks-dolly-15k.jsonl.gz'}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gsm8k-limit", type=int, default=200)
    parser.add_argument("--dolly-limit", type=int, default=200)
    parser.add_argument("--humaneval-limit", type=int, default=0)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: base, gsm8k, dolly")
    args = parser.parse_args()
    data, out = args.data.expanduser().resolve(), args.out.expanduser().resolve()
    if not (data / "gsm8k" / "test.jsonl").is_file():
        parser.error(f"--data {data}: no gsm8k/test.jsonl there")
    skip = set(filter(None, args.skip.split(",")))
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results: dict = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2) + "\n")

    gsm = ["--benchmark", "gsm8k", "--data", str(data / "gsm8k/test.jsonl"), "--limit", str(args.gsm8k_limit)]
    human = ["--benchmark", "humaneval", "--limit", str(args.humaneval_limit)]
    dolly = ["--benchmark", "rouge", "--limit", str(args.dolly_limit)]
    if "base" not in skip:
        results["base"] = {
            "gsm8k": evaluate(gsm, out / "base" / "gsm8k.json"),
            "humaneval": evaluate(human, out / "base" / "humaneval.json"),
            "rouge": evaluate([*dolly, "dataset=dolly", *data_overrides(data, "dolly")], out / "base" / "rouge.json"),
        }
        save()
    with tempfile.TemporaryDirectory(prefix="fedllm-bench-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name, (nodes, overrides) in RUNS.items():
            if name in skip:
                continue
            run_name = f"fed-{name}"
            all_overrides = [*overrides, *data_overrides(data, name), *TRAIN, f"run.output_dir={out}",
                             f"run.name={run_name}"]  # fmt: skip
            print(f"$ flwr run . ({nodes} SuperNodes) {' '.join(all_overrides)}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            sim.run(ROOT, overrides=" ".join(all_overrides), num_supernodes=nodes, timeout=3600)
            seconds = time.perf_counter() - t0
            summary_file = out / run_name / "summary.json"
            if not summary_file.is_file():
                results[run_name] = {"error": "run did not complete", "seconds": round(seconds, 1)}
                save()
                continue
            summary = json.loads(summary_file.read_text())
            adapter = out / run_name / "adapter" / "final"
            entry = {
                "supernodes": nodes,
                "overrides": all_overrides,
                "run-seconds": round(seconds, 1),
                "eval-loss-round-0": summary["eval-loss-round-0"],
                "eval-loss-final": summary["eval-loss-final"],
            }
            if name == "gsm8k":
                entry["gsm8k"] = evaluate([*gsm, "--adapter", str(adapter)], adapter / "eval_gsm8k.json")
            else:
                entry["rouge"] = evaluate([*dolly, "--adapter", str(adapter)], adapter / "eval_rouge.json")
                entry["humaneval"] = evaluate([*human, "--adapter", str(adapter)], adapter / "eval_humaneval.json")
            results[run_name] = entry
            save()
    (out / "results.md").write_text(markdown(results))
    print(json.dumps(results))
    return 0


def _cell(entry: dict | None, key: str) -> str:
    if not entry or "metrics" not in entry:
        return "n/a" if not entry else entry.get("error", "n/a")
    return f"{cell(entry['metrics'][key], '.3f')} ({cell(entry['seconds'], '.0f')} s)"


def markdown(results: dict) -> str:
    base = results.get("base", {})
    fed_gsm, fed_dolly = results.get("fed-gsm8k", {}), results.get("fed-dolly", {})
    lines = [
        "| evaluation | base model | after Fed-GSM8K-3 | after Fed-Dolly |",
        "|---|---|---|---|",
        f"| GSM8K 8-shot CoT accuracy | {_cell(base.get('gsm8k'), 'accuracy')} | "
        f"{_cell(fed_gsm.get('gsm8k'), 'accuracy')} | |",
        f"| HumanEval pass@1 | {_cell(base.get('humaneval'), 'pass@1')} | | "
        f"{_cell(fed_dolly.get('humaneval'), 'pass@1')} |",
        f"| Dolly ROUGE-L | {_cell(base.get('rouge'), 'rougeL')} | | {_cell(fed_dolly.get('rouge'), 'rougeL')} |",
    ]
    for name in ("fed-gsm8k", "fed-dolly"):
        run = results.get(name)
        if run and "run-seconds" in run:
            lines.append(
                f"\n{name}: {run['supernodes']} SuperNodes, {run['run-seconds']:.0f} s; test loss "
                f"{run['eval-loss-round-0']:.3f} -> {run['eval-loss-final']:.3f}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
