"""Federated DPO: every `dpo_loss` in the fed and local scenarios on the offline pairs.

    python benchmarks/dpo.py --out ~/fedllm-flwr/dpo [--losses sigmoid,hinge,ipo,robust] [-- OVERRIDES]

Jobs on the default model (SmolLM2-135M-Instruct) and the offline preference pairs
that task=reward uses (the built-in task families, chosen = the right answer,
rejected = a plausible wrong one, split by family over 2 SuperNodes), each a `flwr
run` on a private SuperLink stopped by PID at the end; a job whose run folder holds a
summary is read, not run again. One more job runs sigmoid in fed under SecAgg+ with
int8 downlink messages. Then, in a fresh process each, the peak memory of one DPO
training step with the reference taken from the adapter-off model, and with a
second copy of the base held as the reference (what the toolkit avoids).

Tabulates per job: implicit-reward accuracy and margin and the loss on the server's
test pairs (round 0 and last; for `local`, the mean over the clients' own adapters),
on each client's held-out pairs, and how often greedy answers are closer (ROUGE-L)
to the chosen than to the rejected response, before and after. Writes OUT/results.md
and OUT/results.json and prints one JSON object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell, markdown_table

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("sigmoid", "hinge", "ipo", "robust")
EXTRA_JOB = ("sigmoid-fed-secagg-int8", ["dpo_loss=sigmoid", "scenario=fed", "privacy=secagg", "compression.down=int8"])


def job_row(folder: Path, name: str) -> dict:
    rows = read_metrics(folder)
    first, last = rows[0], rows[-1]
    clients = sorted(int(k.split("_")[1].split("-")[0]) for k in last if k.endswith("-held-out-preference-accuracy"))
    return {
        "job": name,
        "test-accuracy-round-0": first.get("preference-accuracy"),
        "test-accuracy": last.get("preference-accuracy"),
        "test-margin": last.get("margin"),
        "test-loss": last.get("eval-loss"),
        "held-out-accuracy": last.get("client-eval-preference-accuracy"),
        "held-out-accuracy-per-client": [last[f"client_{c}-held-out-preference-accuracy"] for c in clients],
        "held-out-margin": last.get("client-eval-margin"),
        "closer-round-0": first.get("closer-to-chosen"),
        "closer": last.get("closer-to-chosen"),
        "seconds": json.loads((folder / "summary.json").read_text())["seconds"],
    }


def measure_memory(reference: str) -> dict:
    """Peak RSS of building the DPO model and taking one training step on a batch of
    8 offline pairs (SmolLM2, bf16), the reference from the adapter-off model or from a second base."""
    import torch

    from fedllm_flwr.client import _setup
    from fedllm_flwr.config import load_cfg
    from fedllm_flwr.data.pairs import collate_pairs
    from fedllm_flwr.lm_loss import sequence_logps
    from fedllm_flwr.model import load_base_model
    from fedllm_flwr.tasks.dpo import dpo_loss

    torch.set_num_threads(2)
    cfg = load_cfg(["task=dpo"])
    bundle, data = _setup(cfg, 0, 2)
    batch = collate_pairs([data.train.example(i) for i in range(8)], bundle.tokenizer.pad_token_id)
    second = load_base_model(bundle.base_path, bundle.dtype, bundle.device) if reference == "second-model" else None
    policy, tokens = sequence_logps(bundle.model, batch)
    with torch.no_grad():
        if second is None:
            with bundle.model.disable_adapter():
                ref, _ = sequence_logps(bundle.model, batch)
        else:
            ref, _ = sequence_logps(second, batch)
    dpo_loss(policy, ref, tokens, cfg.dpo_loss).mean().backward()
    return {"reference": reference, "peak-rss-mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def markdown(rows: list[dict], memory: list[dict]) -> str:
    header = ["job", "test accuracy: round 0 -> last", "test margin", "test loss",
              "clients' held-out accuracy (mean; per client)", "held-out margin",
              "answers closer to chosen: round 0 -> last", "seconds"]  # fmt: skip
    body = []
    for r in rows:
        per = ", ".join(cell(x, ".2f", "-") for x in r["held-out-accuracy-per-client"])
        body.append([
            r["job"], f"{cell(r['test-accuracy-round-0'], '.2f', '-')} -> {cell(r['test-accuracy'], '.2f', '-')}",
            cell(r["test-margin"], ".3f", "-"), cell(r["test-loss"], ".4f", "-"),
            f"{cell(r['held-out-accuracy'], '.2f', '-')} ({per})", cell(r["held-out-margin"], ".3f", "-"),
            f"{cell(r['closer-round-0'], '.2f', '-')} -> {cell(r['closer'], '.2f', '-')}", f"{r['seconds']:.0f}",
        ])  # fmt: skip
    text = "\n".join(markdown_table(header, body)) + "\n"
    if memory:
        table = [[m["reference"], f"{m['peak-rss-mb']:.0f}", ", ".join(f"{x:.0f}" for x in m["runs"])] for m in memory]
        text += "\n" + "\n".join(markdown_table(["reference", "peak RSS of one DPO step (MB, median)", "runs"], table))
    return text + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--measure-memory", choices=("adapter-off", "second-model"), help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    if args.measure_memory:  # a child process: one measurement, printed as JSON
        print(json.dumps(measure_memory(args.measure_memory)))
        return 0
    losses = [x for x in args.losses.split(",") if x]
    if not losses or set(losses) - set(LOSSES):
        parser.error(f"--losses: choose from {', '.join(LOSSES)}")
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(f"{loss}-{scenario}", [f"dpo_loss={loss}", f"scenario={scenario}"])
            for loss in losses for scenario in ("fed", "local")]  # fmt: skip
    jobs.append(EXTRA_JOB)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedllm-dpo-") as tmp, LocalSimulation(Path(tmp)) as sim:
        for name, overrides in jobs:
            every = ["task=dpo", "train.threads=1", *overrides, *args.extra]
            folder = sim.run_once(ROOT, out / "runs", name, every, num_supernodes=2, timeout=3 * 3600)
            rows.append(job_row(folder, name))
            (out / "results.json").write_text(json.dumps({"jobs": rows}, indent=1))
    peaks: dict[str, list[float]] = {"adapter-off": [], "second-model": []}
    for _ in range(3):  # alternating, three times each: a process's peak RSS varies by ~100 MB run to run
        for reference, values in peaks.items():
            child = subprocess.run([sys.executable, __file__, "--out", str(out), "--measure-memory", reference],
                                   capture_output=True, text=True, check=True)  # fmt: skip
            values.append(json.loads(child.stdout.strip().splitlines()[-1])["peak-rss-mb"])
    memory = [{"reference": k, "peak-rss-mb": statistics.median(v), "runs": v} for k, v in peaks.items()]
    (out / "results.json").write_text(json.dumps({"jobs": rows, "memory": memory}, indent=1))
    (out / "results.md").write_text(markdown(rows, memory))
    print(json.dumps({"jobs": rows, "memory": memory}))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
