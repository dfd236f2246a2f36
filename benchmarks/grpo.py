"""Federated GRPO against continued federated SFT, from the default job's adapter; and two
sites that reward differently.

    python benchmarks/grpo.py --out ~/fedllm-flwr/grpo [--seeds 0,1,2] [--rounds 3] [--steps 5] [-- OVERRIDES]

On the default model and task (SmolLM2-135M-Instruct, the built-in task families over
2 SuperNodes), each job a `flwr run` on a private SuperLink stopped by PID at the end;
a job whose run folder holds a summary is read, not run again:

1. `sft`: the default job; its `adapter/final` starts every other job (`init.adapter`).
2. Per seed: `grpo-s<seed>` (task=grpo, exact-match reward, `--rounds` rounds of
   `--steps` steps of 4 prompts x 4 answers) and `sft-s<seed>`, continued SFT with as
   many steps a round as fit in the GRPO job's client seconds a round (from `sft`'s
   seconds a step): the same client CPU time.
3. `sites-local`, `sites-fed`: GRPO where site 0 rewards exact match and site 1 exact
   match plus brevity (`grpo.client_rewards`), each site scoring its own held-out
   answers (accuracy and length) after the last round.

Writes OUT/results.json and OUT/results.md, the results file the docs' tables are
generated from (`--results`, default benchmarks/results/grpo.json), and prints one JSON
object. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedllm_flwr.metrics import read_metrics
from fedllm_tools.simulation import LocalSimulation, stop_on_sigterm
from fedllm_tools.tables import cell, markdown_table

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("add", "subtract", "reverse", "sort", "uppercase", "km_to_m", "count_letters", "last_word")
GRPO = ["task=grpo", "train.batch_size=4", "grpo.group_size=4", "grpo.max_new_tokens=16"]


def summary(folder: Path) -> dict:
    rows = read_metrics(folder)
    first, last, trained = rows[0], rows[-1], rows[1:]
    clients = [r["clients-ok"] or 1 for r in trained]
    out = {
        "accuracy-round-0": first.get("accuracy"),
        "accuracy": last.get("accuracy"),
        "eval-loss": last.get("eval-loss"),
        "families": {f: last.get(f"accuracy-{f}") for f in FAMILIES if f"accuracy-{f}" in last},
        # the slowest client's training seconds a round (a round's `seconds` also hold its evaluation)
        "client-seconds-per-round": statistics.mean(r["train-seconds"] for r in trained),
        "bytes-up-per-client-round": statistics.mean(r["bytes-up"] / c for r, c in zip(trained, clients, strict=True)),
        "bytes-down-per-client-round": statistics.mean(
            r["bytes-down"] / c for r, c in zip(trained, clients, strict=True)
        ),
        "local-steps": None,
        "seconds": json.loads((folder / "summary.json").read_text())["seconds"],
    }
    for key in ("grpo-reward", "grpo-kl", "grpo-no-signal", "grpo-answer-tokens"):
        if key in last:
            out[key] = [r.get(key) for r in trained]
    sites = sorted({int(k.split("_")[1].split("-")[0]) for k in last if k.startswith("client_")})
    for metric in ("accuracy", "answer-tokens"):
        values = [last.get(f"client_{s}-held-out-{metric}") for s in sites]
        if any(v is not None for v in values):
            out[f"held-out-{metric}-per-site"] = values
    return out


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(result: dict) -> str:
    arms = result["arms"]
    families = [f for f in FAMILIES if any(f in j["families"] for jobs in arms.values() for j in jobs)]
    header = ["arm", "exact match: round 0 -> last", *families, "reward (last round)", "KL (last round)",
              "no-signal groups", "steps a round", "client s a round", "KB up / client / round"]  # fmt: skip
    body = []
    for arm, jobs in arms.items():
        if not jobs:
            continue
        fam = [mean_sd([j["families"].get(f) for j in jobs]) for f in families]

        def last(key: str, jobs: list[dict] = jobs) -> str:
            return mean_sd([j[key][-1] for j in jobs if key in j])

        body.append([
            arm, f"{mean_sd([j['accuracy-round-0'] for j in jobs])} -> {mean_sd([j['accuracy'] for j in jobs])}",
            *fam, last("grpo-reward"), last("grpo-kl"), last("grpo-no-signal"),
            str(jobs[0]["local-steps"]), f"{statistics.mean(j['client-seconds-per-round'] for j in jobs):.0f}",
            f"{statistics.mean(j['bytes-up-per-client-round'] for j in jobs) / 1024:.0f}",
        ])  # fmt: skip
    text = f"Seeds {', '.join(map(str, result['seeds']))} (mean ± sd over seeds).\n\n"
    text += "\n".join(markdown_table(header, body)) + "\n"
    if result.get("sites"):
        header = ["scenario", "site 0 (exact match): accuracy", "answer tokens",
                  "site 1 (exact match + brevity): accuracy", "answer tokens", "server's exact match"]  # fmt: skip
        rows = []
        for name, s in result["sites"].items():
            acc, length = s.get("held-out-accuracy-per-site", [None, None]), s.get("held-out-answer-tokens-per-site")
            length = length or [None, None]
            rows.append([name, cell(acc[0], ".3f", "-"), cell(length[0], ".2f", "-"), cell(acc[1], ".3f", "-"),
                         cell(length[1], ".2f", "-"), cell(s["accuracy"], ".3f", "-")])  # fmt: skip
        text += "\n" + "\n".join(markdown_table(header, rows)) + "\n"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="GRPO's local steps a round")
    parser.add_argument("--lr", type=float, default=2e-4, help="GRPO's learning rate")
    parser.add_argument("--no-sites", action="store_true", help="skip the two-site study")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "grpo.json")
    parser.add_argument("extra", nargs="*", help="Hydra overrides added to every job")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = args.out.expanduser().resolve()
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    result: dict = {"seeds": seeds, "rounds": args.rounds, "grpo-steps": args.steps, "grpo-lr": args.lr,
                    "arms": {"grpo": [], "sft": []}, "sites": {}}  # fmt: skip
    common = ["train.threads=1", f"num_rounds={args.rounds}", f"eval.every={args.rounds}", *args.extra]

    def save() -> None:
        (out / "results.json").write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory(prefix="fedllm-grpo-") as tmp, LocalSimulation(Path(tmp)) as sim:

        def run(name: str, overrides: list[str]) -> Path:
            return sim.run_once(ROOT, runs, name, overrides, num_supernodes=2, timeout=3 * 3600)

        sft = run("sft", ["train.threads=1", *args.extra])
        start = sft / "adapter" / "final"
        base_rows = read_metrics(sft)[1:]
        sft_step = statistics.mean(r["train-seconds"] for r in base_rows) / 10  # the default job's 10 steps a round
        result["sft-seconds-per-step"] = sft_step
        grpo_job = [*GRPO, f"train.local_steps={args.steps}", f"train.lr={args.lr}", f"init.adapter={start}"]
        for seed in seeds:
            job = summary(run(f"grpo-s{seed}", [*grpo_job, f"seed={seed}", *common]))
            job["local-steps"] = args.steps
            result["arms"]["grpo"].append(job)
            steps = max(1, round(job["client-seconds-per-round"] / sft_step))
            cont = summary(run(f"sft-s{seed}", [f"train.local_steps={steps}", f"init.adapter={start}", f"seed={seed}",
                                                *common]))  # fmt: skip
            cont["local-steps"] = steps
            result["arms"]["sft"].append(cont)
            save()
        if not args.no_sites:
            rewards = "grpo.client_rewards=[exact_match,exact_match+brevity]"
            sites = [*grpo_job, rewards, "eval.client_metric=true", "seed=0", *common]
            for scenario in ("local", "fed"):
                result["sites"][scenario] = summary(run(f"sites-{scenario}", [*sites, f"scenario={scenario}"]))
                save()
    save()
    (out / "results.md").write_text(markdown(result))
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(main())
